"""The evaluation task behind ``python run.py``: dataset -> backbone -> method settings -> metric.

:func:`evaluate` reads top to bottom: check the options, build the settings, the dataset and the
run directory, restore what an earlier session finished, load the backbone, run the loop, write
the report. :func:`main` turns a user's mistake into one ``error:`` line and exit status 2.

What a run dir holds (``outputs/<dataset>/<method>_<resolution>/<date>_<time>/`` by default):
``config_resolved.yaml``, ``run.json`` (fingerprint, sessions), ``run.log``, and per setting (the
run dir itself, or ``<setting>/`` when several are swept) ``per_image.csv`` (durable rows),
``results.json``, ``overlays/`` and, on request or for image folders, ``predictions/``.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..engine.config import check_config, plain
from ..engine.evaluators import MetricEvaluator, OverlayWriter, PredictionWriter, SegmentCounter
from ..engine.loop import SettingRun, StageTimes, run_loop
from ..engine.report import (
    RANDOM_WARNING,
    peak_memory,
    print_summary,
    timing_summary,
    versions,
    write_sweep_results,
)
from ..engine.rundir import RunDir, now, write_json_atomic
from ..engine.settings import build_settings
from ..errors import ConfigError, DataError, RunError
from .build import (
    build_backbone_from_config,
    build_dataset_from_config,
    is_random_config,
    native_image_size,
)
from .progress import Progress

__all__ = ["evaluate", "main"]

log = logging.getLogger(__name__)


def evaluate(
    cfg: DictConfig, run_dir: str | Path, backbone: Any = None, on_batch=None
) -> dict[str, Any]:
    """Evaluate the configured method setting(s) on the configured dataset into ``run_dir``.

    Args:
        cfg: the composed config (configs/config.yaml).
        run_dir: output folder; one holding a run of the same config is resumed.
        backbone: an already loaded backbone to use instead of building ``cfg.backbone``.
        on_batch: called as ``on_batch(images_done, ids)`` after each durable batch (tests use it
            to interrupt a run).

    Returns:
        ``{"run_dir", "random_weights", "results": {setting name or "": results dict}}``.
    """
    t_start, started = time.perf_counter(), now()
    knobs = check_config(cfg)
    run_dir = Path(run_dir)
    settings = build_settings(
        plain(cfg.method), plain(cfg.get("sweep")), plain(cfg.get("variants")), run_dir
    )
    image_size = knobs["image_size"] or native_image_size(plain(cfg.backbone))
    dataset = build_dataset_from_config(
        plain(cfg.dataset), image_size, knobs["resolution"], cfg.get("preprocessing", "diffseg")
    )
    ids = _select_ids(dataset, knobs["limit"])
    _warn_about_shapes(dataset)
    random_weights = is_random_config(plain(cfg.backbone))
    rundir = RunDir(run_dir, _fingerprint(cfg, knobs, settings, dataset, ids)).open()
    runs = [_setting_run(s, dataset, ids, knobs, random_weights, cfg) for s in settings]
    for run in runs:
        for evaluator in run.evaluators:
            evaluator.reset()
    todo = [i for i in ids if not all(i in r.records.done for r in runs)]
    if rundir.resumed:
        log.info(
            "resuming %s: %d of %d images done, %d to go",
            run_dir,
            len(ids) - len(todo),
            len(ids),
            len(todo),
        )
    if todo and backbone is None:
        backbone = build_backbone_from_config(plain(cfg.backbone), knobs)
    if backbone is not None:
        random_weights = bool(backbone.is_random)
    if random_weights:
        _loud_warning()
    tracker = _tracker(cfg, rundir, settings, knobs, random_weights)
    try:
        if backbone is not None:  # a later session with nothing to do reports it from here
            rundir.state["backbone"] = backbone.describe()
        rundir.claim(OmegaConf.to_yaml(cfg, resolve=True))
        for run in runs:
            run.records.open()
        progress = Progress(len(todo), len(ids) - len(todo), runs, tracker, on_batch)
        stages = StageTimes()
        try:
            _loop(dataset, todo, backbone, runs, knobs, progress, stages)
        except BaseException:  # Ctrl-C or an error: the images finished keep their session
            if progress.done:
                session = _session(started, t_start, progress.done, stages, knobs)
                rundir.add_session({**session, "interrupted": True})
            raise
        rundir.state["skipped"] = stages.skipped
        if progress.done or not rundir.state["sessions"]:
            rundir.add_session(_session(started, t_start, progress.done, stages, knobs))
        results = _report(cfg, knobs, dataset, ids, runs, rundir, backbone, random_weights)
        _log_to_tracker(tracker, results, random_weights)
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    finally:
        for run in runs:
            for evaluator in run.evaluators:
                evaluator.close()
    tracker.finish(exit_code=0)
    print_summary(results, run_dir)
    return {"run_dir": str(run_dir), "random_weights": random_weights, "results": results}


def _select_ids(dataset, limit: int | None) -> list[str]:
    """The ids a run evaluates: the dataset's, or its first ``limit``."""
    return list(dataset.ids) if limit is None else list(dataset.ids)[:limit]


def _warn_about_shapes(dataset) -> None:
    """Image folders: one warning with counts for far-from-square or tiny photos."""
    if dataset.name != "folder":
        return
    from ..data.folder import count_unusual_shapes

    warning = count_unusual_shapes(dataset).warning(dataset.crop, dataset.image_size)
    if warning:
        log.warning("%s", warning[0].upper() + warning[1:])


def _fingerprint(cfg, knobs, settings, dataset, ids) -> dict[str, Any]:
    """What must not change when a run resumes: everything that changes its numbers or files."""
    ds = plain(cfg.dataset)
    keep = ("name", "split", "curated", "ids_file", "crop", "void_as_background", "other_as_class")
    return {
        "dataset": {k: ds.get(k) for k in keep if k in ds},
        "dataset_size": len(dataset),
        "limit": knobs["limit"],
        "resolution": knobs["resolution"],
        "preprocessing": dataset.preprocessing,
        "image_size": dataset.image_size,
        "backbone": {k: cfg.backbone.get(k) for k in ("name", "random_config", "timestep")},
        "dtype": str(knobs["dtype"]).replace("torch.", ""),
        "seed": knobs["seed"],
        "save_predictions": knobs["save_predictions"],
        "settings": {s.name or "": s.describe() for s in settings},
    }


def _setting_run(setting, dataset, ids, knobs, random_weights: bool, cfg) -> SettingRun:
    """A setting with its evaluators: predictions and overlays first, the records last."""
    out, labelled = setting.out_dir, bool(dataset.has_labels)
    meta = {
        "method": setting.method_name,
        "setting": setting.name or "",
        "backbone": str(cfg.backbone.name),
        "random_weights": random_weights,
    }
    folder = dataset.name == "folder"
    index_of = {image_id: k for k, image_id in enumerate(dataset.ids)}
    evaluators = []
    if knobs["save_predictions"] or not labelled:
        evaluators.append(PredictionWriter(out, meta, original_size=folder))
    shown = ids if folder else ids[: knobs["num_overlays"]]
    if shown:
        photo = (lambda image_id: dataset.load_rgb(index_of[image_id])) if folder else None
        evaluators.append(OverlayWriter(out, shown, meta, load_photo=photo))
    if labelled:
        evaluators.append(MetricEvaluator(out, ids, dataset.class_names, random_weights))
    else:
        evaluators.append(SegmentCounter(out, ids, random_weights))
    return SettingRun(setting, evaluators)


def _loop(dataset, todo, backbone, runs, knobs, progress, stages):
    """The data loader over the images still to do, then :func:`run_loop` with a progress bar."""
    import torch
    from torch.utils.data import DataLoader, Subset

    index_of = {image_id: k for k, image_id in enumerate(dataset.ids)}
    loader = DataLoader(
        Subset(dataset, [index_of[i] for i in todo]),
        batch_size=knobs["batch_size"],
        shuffle=False,
        num_workers=knobs["num_workers"] if len(todo) > 1 else 0,
        pin_memory=knobs["device"].type == "cuda",
    )
    if knobs["device"].type == "cuda":
        torch.cuda.reset_peak_memory_stats(knobs["device"])
    with progress:
        return run_loop(
            loader,
            backbone,
            runs,
            knobs["resolution"],
            knobs["device"],
            knobs["dtype"],
            on_batch=progress.update,
            background=_background(dataset),
            times=stages,
        )


def _background(dataset) -> tuple[int, int] | None:
    """``(background class, classes)`` of a dataset with a background class, else None."""
    index = getattr(dataset, "background_index", None)
    return None if index is None else (int(index), int(dataset.num_classes))


def _session(started: str, t_start: float, images: int, stages, knobs) -> dict[str, Any]:
    return {
        "started": started,
        "finished": now(),
        "images": images,
        "wall_time_s": round(time.perf_counter() - t_start, 3),
        "stages": stages.as_dict(),
        "device": str(knobs["device"]),
        "batch_size": knobs["batch_size"],
        "peak_memory": peak_memory(knobs["device"]),
        "versions": versions(),
    }


def _dataset_summary(cfg, dataset, ids) -> dict[str, Any]:
    desc = {k: v for k, v in dataset.describe().items() if k != "name"}
    full = len(ids) == len(dataset) and getattr(dataset, "curated", True) is not False
    return {
        "name": str(cfg.dataset.name),
        **desc,
        "size": len(dataset),
        "num_images_run": len(ids),
        "full_benchmark": bool(full and not cfg.dataset.get("ids_file")),
        "curated": getattr(dataset, "curated", None),
    }


def _report(cfg, knobs, dataset, ids, runs, rundir, backbone, random_weights) -> dict[str, Any]:
    """``results.json`` for every setting (and ``sweep_results.json`` for several)."""
    common = {
        "dataset": _dataset_summary(cfg, dataset, ids),
        "resolution": knobs["resolution"],
        "backbone": rundir.state.get("backbone") or plain(cfg.backbone),
        "random_weights": random_weights,
        "limit": knobs["limit"],
        "seed": knobs["seed"],
        "timing": timing_summary(rundir.state["sessions"]),
        "peak_memory": peak_memory(knobs["device"]),
        "versions": versions(),
        "run_dir": str(rundir.path),
        "finished": now(),
    }
    if random_weights:
        common = {"WARNING": RANDOM_WARNING, **common}
    results = {}
    for run in runs:
        res = dict(common, method=run.setting.describe(), setting=run.setting.name)
        res["sweep_overrides"] = run.setting.overrides or None
        for evaluator in run.evaluators:
            res.update(evaluator.evaluate())
        res["complete"] = len(run.records.done) == len(ids)
        if rundir.state.get("skipped"):
            res["skipped"] = rundir.state["skipped"]
        res["images_resumed"] = run.records.resumed
        write_json_atomic(run.setting.out_dir / "results.json", res)
        results[run.setting.name or ""] = res
    if len(runs) > 1:
        write_sweep_results(rundir.path, results, random_weights)
    return results


def _tracker(cfg, rundir: RunDir, settings, knobs, random_weights: bool):
    from ..tracking import build_tracker

    tags = [str(cfg.dataset.name), settings[0].method_name, f"res{knobs['resolution']}"]
    tags += [str(cfg.backbone.name)] + (["random-weights"] if random_weights else [])
    config = dict(plain(cfg), random_weights=random_weights)
    name = f"{cfg.dataset.name}-{settings[0].method_name}-{knobs['resolution']}-{cfg.backbone.name}"
    try:
        tracker = build_tracker(
            plain(cfg.get("logger")),
            rundir.path,
            config,
            tags=tags,
            run_id=rundir.state.get("wandb_id"),
            name=name,
        )
    except ValueError as err:
        raise ConfigError(str(err)) from err
    rundir.state["wandb_id"] = tracker.run_id or rundir.state.get("wandb_id")
    return tracker


def _log_to_tracker(tracker, results: dict[str, Any], random_weights: bool) -> None:
    summary: dict[str, Any] = {"random_weights": random_weights}
    for name, r in results.items():
        prefix = f"{name}/" if name else ""
        summary.update({f"{prefix}{k}": r[k] for k in ("acc", "miou", "num_images")})
        if r.get("iou_per_class"):
            iou = r["iou_per_class"]
            tracker.log_class_table(f"{prefix}iou_per_class", list(iou), list(iou.values()))
        tracker.log_images(f"{prefix}overlays", r.get("overlays", [])[:16])
    summary["images_per_s"] = next(iter(results.values()))["timing"]["images_per_s"]
    tracker.log_summary(summary)


def _loud_warning() -> None:
    bar = "!" * 78
    for line in (bar, "!!! " + RANDOM_WARNING, bar):
        log.warning(line)


def _log_error_to_files(message: str) -> None:
    """Put ``error: message`` into the run's log file (not on the console: main prints it)."""
    record = logging.LogRecord(__name__, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _remove_if_unstarted(run_dir: Path) -> None:
    """A run that failed before its run dir was claimed leaves nothing behind (Hydra made the
    folder and an empty log before the config was checked)."""
    import shutil

    if run_dir.is_dir() and not (run_dir / "run.json").exists():
        logging.shutdown()
        shutil.rmtree(run_dir, ignore_errors=True)


def resume_hint(run_dir: Path) -> str:
    """The command that continues an interrupted run or multirun (quoted for a POSIX shell).

    A multirun job's own overrides are one combination of the sweep, so the hint repeats the
    command line's sweep (``sys.argv``) with the sweep dir pinned."""
    import shlex

    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    if hc.mode is not None and hc.mode.name == "MULTIRUN":
        args = [
            a
            for a in sys.argv[1:]
            if a not in ("-m", "--multirun") and not a.startswith("hydra.sweep.dir=")
        ]
        sweep_dir = Path(str(hc.sweep.dir)).absolute()
        return shlex.join(["python", "run.py", "-m", *args, f"hydra.sweep.dir={sweep_dir}"])
    args = list(hc.overrides.task)
    return shlex.join(["python", "run.py", *args, f"hydra.run.dir={run_dir}"])


def main(cfg: DictConfig) -> float | None:
    """Entry point for ``run.py`` (inside ``@hydra.main``): runs in Hydra's output dir; a user's
    mistake (bad option, missing or damaged data, no weights) becomes one ``error:`` line on
    stderr and in the run's log, exit status 2; Ctrl-C prints the command that resumes (130).

    Returns the first setting's mIoU (for Hydra sweepers), None without labels.
    """
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        out = evaluate(cfg, run_dir)
    except (RunError, DataError) as err:
        message = f"error: {err}"
        _log_error_to_files(message)
        print(message, file=sys.stderr, flush=True)
        _remove_if_unstarted(run_dir)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(
            f"\nInterrupted. Finished images are saved in {run_dir}; to continue, run:\n  "
            + resume_hint(run_dir),
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(130) from None
    miou = next(iter(out["results"].values())).get("miou")
    return None if miou is None else float(miou)
