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

import dataclasses
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ..engine.config import RunOptions, check_config, plain
from ..engine.distributed import Dist, from_env, shard
from ..engine.evaluators import EvaluatorContext, MetricEvaluator, SegmentCounter
from ..engine.lock import RunDirLocked
from ..engine.loop import SettingRun, StageTimes, run_loop
from ..engine.report import (
    RANDOM_WARNING,
    combine_sessions,
    peak_memory,
    print_summary,
    timing_summary,
    versions,
    write_results,
    write_sweep_results,
)
from ..engine.rundir import RunDir, now
from ..engine.settings import build_settings
from ..errors import ConfigError, RunError
from ..methods.base import MethodContext
from ..tracking import NullTracker, coverage_summary
from .build import (
    backbone_family,
    build_backbone_from_config,
    build_dataset_from_config,
    is_random_config,
    native_image_size,
)
from .entry import random_weights_banner, run_task
from .progress import Progress

__all__ = ["evaluate", "main"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunConfig:
    """The composed config, read once: the checked options and each group as plain data.

    Attributes:
        options: the top-level options (:class:`RunOptions`).
        dataset, backbone, method: the groups' configs (``_target_`` + arguments).
        sweep, variants: the method settings to evaluate (``sweep.<key>`` lists, explicit ones).
        evaluators: factories of the evaluators (``_target_`` entries).
        logger: the tracker's config; preprocessing: the protocol's preprocessing name.
        resolved: the whole config, resolved (sent to the tracker); yaml: the same as YAML.
    """

    options: RunOptions
    dataset: dict[str, Any]
    backbone: dict[str, Any]
    method: dict[str, Any]
    sweep: dict[str, Any]
    variants: list[Any]
    evaluators: list[Any]
    logger: dict[str, Any] | None
    preprocessing: str
    resolved: dict[str, Any]
    yaml: str

    @classmethod
    def read(cls, cfg: DictConfig) -> RunConfig:
        """Check the options (every interpolation resolves) and take each group once."""
        options = check_config(cfg)
        resolved = plain(cfg)
        return cls(
            options=options,
            dataset=resolved["dataset"],
            backbone=resolved["backbone"],
            method=resolved["method"],
            sweep=resolved.get("sweep") or {},
            variants=resolved.get("variants") or [],
            evaluators=resolved.get("evaluators") or [],
            logger=resolved.get("logger"),
            preprocessing=str(resolved.get("preprocessing") or "diffseg"),
            resolved=resolved,
            yaml=OmegaConf.to_yaml(cfg, resolve=True),
        )


@dataclass
class _Prepared:
    """What a run is, before any model is loaded: options, settings, data, run dir, evaluators."""

    options: RunOptions
    settings: list
    dataset: Any
    ids: list[str]
    rundir: RunDir
    runs: list[SettingRun]
    dist: Dist
    random_weights: bool

    def todo(self) -> list[str]:
        """The images this process segments: its shard of what no setting has finished."""
        left = [i for i in self.ids if not all(i in r.records.done for r in self.runs)]
        if self.dist.group:  # torchrun: shards of what is left, so any world size resumes
            return shard(left, self.dist.rank, self.dist.world_size)
        done = set(self.ids) - set(left)  # independent jobs: shards of the whole list
        return [i for i in shard(self.ids, self.dist.rank, self.dist.world_size) if i not in done]


def evaluate(
    cfg: DictConfig,
    run_dir: str | Path,
    backbone: Any = None,
    on_batch=None,
    merge_only: bool = False,
) -> dict[str, Any]:
    """Evaluate the configured method setting(s) on the configured dataset into ``run_dir``.

    Args:
        cfg: the composed config (configs/config.yaml).
        run_dir: output folder; one holding a run of the same config is resumed.
        backbone: an already loaded backbone to use instead of building ``cfg.backbone``.
        on_batch: called as ``on_batch(images_done, ids)`` after each durable batch (tests use it
            to interrupt a run).
        merge_only: segment nothing; write the results from the records already there (the
            merge step of independent shard jobs).

    Returns:
        ``{"run_dir", "random_weights", "results": {setting name or "": results dict}}``
        (``results`` is empty on the processes that do not write them).
    """
    t_start, started = time.perf_counter(), now()
    rc = RunConfig.read(cfg)
    prep = _prepare(rc, Path(run_dir))
    try:  # (the run dir's lock is let go whatever happens)
        todo = [] if merge_only else prep.todo()
        if todo and backbone is None:
            backbone = build_backbone_from_config(rc.backbone, prep.options)
        if backbone is not None:
            prep.random_weights = bool(backbone.is_random)
            _check_requests(backbone, prep)
        if prep.random_weights and prep.dist.is_main:
            _loud_warning()
        tracker = _tracker(rc, prep) if prep.dist.is_main else NullTracker()
    except BaseException:
        prep.rundir.unlock()
        raise
    try:
        _claim(rc, prep, backbone)
        stages, done = _segment_all(prep, todo, backbone, tracker, on_batch, (started, t_start))
        results = _finish(rc, prep, stages, done, (started, t_start))
        if results:
            _log_to_tracker(tracker, results, prep.random_weights)
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    finally:
        for run in prep.runs:
            for evaluator in run.evaluators:
                evaluator.close()
        prep.rundir.unlock()
    tracker.finish(exit_code=0)
    if results:
        print_summary(results, prep.rundir.path)
    return {"run_dir": str(run_dir), "random_weights": prep.random_weights, "results": results}


def _prepare(rc: RunConfig, run_dir: Path) -> _Prepared:
    """Check the options, build the settings and the dataset, open the run dir and restore what
    earlier sessions finished. Nothing heavy is loaded yet."""
    options = rc.options
    dist = from_env(options.num_shards, options.shard_index, options.device.type)
    if dist.group and options.device.type == "cuda" and options.device.index is None:
        options = dataclasses.replace(options, device=torch.device("cuda", dist.local_rank))
    context = MethodContext(
        dataset=str(rc.dataset.get("name", "")),
        backbone=str(rc.backbone.get("name", "")),
        backbone_family=backbone_family(rc.backbone),
    )
    settings = build_settings(rc.method, rc.sweep, rc.variants, run_dir, context)
    image_size = options.image_size or native_image_size(rc.backbone)
    dataset = build_dataset_from_config(
        rc.dataset, image_size, options.resolution, rc.preprocessing
    )
    _check_output_shapes(settings, dataset)
    ids = _select_ids(dataset, options.limit)
    if dist.is_main:
        _warn_about_shapes(dataset)
    random_weights = is_random_config(rc.backbone)
    rundir = _lock(RunDir(run_dir, _fingerprint(rc, options, settings, dataset, ids)), dist)
    try:  # the lock is let go by evaluate() once prepared; here if preparing fails
        rundir.open()
        runs = [
            _setting_run(s, dataset, ids, options, random_weights, rc, dist.suffix)
            for s in settings
        ]
        for run in runs:
            for evaluator in run.evaluators:
                evaluator.reset()
    except BaseException:
        rundir.unlock()
        raise
    prep = _Prepared(options, settings, dataset, ids, rundir, runs, dist, random_weights)
    if rundir.resumed and dist.is_main:
        left = sum(1 for i in ids if not all(i in r.records.done for r in runs))
        log.info("resuming %s: %d of %d images done, %d to go", run_dir, len(ids) - left,
                 len(ids), left)  # fmt: skip
    dist.barrier()  # every process has read the records before anyone appends to them
    return prep


def _lock(rundir: RunDir, dist: Dist) -> RunDir:
    """This session's lock on the run dir, before anything there is read: torchrun's main
    process takes it for the whole job and tells the others whether it got it; an independent
    shard job takes its own shard's."""
    refusal = None
    if dist.is_main or not dist.group:
        try:
            rundir.lock(dist.rank if dist.world_size > 1 and not dist.group else None)
        except RunDirLocked as err:
            refusal = str(err)
    refusal = dist.broadcast(refusal)
    if refusal is not None:
        rundir.unlock()
        raise RunDirLocked(refusal)
    return rundir


def _check_requests(backbone, prep: _Prepared) -> None:
    """Every setting's feature request fits the backbone (its modules exist, its grids are
    there), checked before the run dir is claimed."""
    for setting in prep.settings:
        try:
            setting.method.check_backbone(backbone)
            backbone.check_request(setting.method.feature_request(), prep.dataset.image_size)
        except ValueError as err:
            raise ConfigError(f"method {setting.method_name}: {err}") from None


def _claim(rc: RunConfig, prep: _Prepared, backbone) -> None:
    """From here on the run dir belongs to this configuration (the main process, or every
    independent shard job, writes the resolved config and run.json); then every process opens
    its own records."""
    if prep.dist.is_main or not prep.dist.group:
        if backbone is not None:  # a later session with nothing to do reports it from here
            prep.rundir.backbone = backbone.describe()
        prep.rundir.claim(rc.yaml)
    prep.dist.barrier()
    for run in prep.runs:
        run.records.open()


def _segment_all(prep: _Prepared, todo, backbone, tracker, on_batch, clock):
    """The loop over this process's images; an interrupted session keeps its stage times."""
    resumed = sum(1 for i in prep.ids if all(i in r.records.done for r in prep.runs))
    progress = Progress(len(todo), resumed, prep.runs, tracker, on_batch, prep.dist)
    stages = StageTimes()
    try:
        _loop(prep.dataset, todo, backbone, prep.runs, prep.options, progress, stages)
    except BaseException as err:  # Ctrl-C or an error: the images finished keep their session
        if isinstance(err, RunError):  # this process's own images: it says so itself
            err.own_images = True
        if progress.done and (prep.dist.is_main or not prep.dist.group):
            session = _session(*clock, progress.done, stages, prep.options)
            prep.rundir.add_session({**session, "interrupted": True})
        raise
    return stages, progress.done


def _finish(rc: RunConfig, prep: _Prepared, stages, done: int, clock) -> dict[str, Any]:
    """Every process's session into run.json; the main process folds the records and writes the
    results (independent shard jobs leave that to ``python -m diffseg.tasks.merge``)."""
    session = _session(*clock, done, stages, prep.options)
    sessions = prep.dist.gather({**session, "skipped": stages.skipped})
    if not prep.dist.is_main and prep.dist.group:
        return {}
    prep.rundir.skipped = [s for ses in sessions for s in ses.pop("skipped")]
    if any(s["images"] for s in sessions) or not prep.rundir.sessions:
        prep.rundir.add_session(combine_sessions(sessions))
    if prep.dist.world_size > 1 and not prep.dist.group:
        log.info(
            "shard %d of %d done; when every shard is, write the results with: "
            "python -m diffseg.tasks.merge %s",
            prep.dist.rank, prep.dist.world_size, prep.rundir.path,
        )  # fmt: skip
        return {}
    for run in prep.runs:
        run.records.gather(prep.ids)
    return _report(rc, prep)


def _check_output_shapes(settings, dataset) -> None:
    """A preprocessing that evaluates each image at its own aspect (``seg4diff``) needs methods
    that predict (h, w) label maps; refuse the others before anything is claimed."""
    if not dataset.per_image_size:
        return
    square = [s.method_name for s in settings if not s.method.any_output_shape]
    if square:
        raise ConfigError(
            f"method {square[0]} predicts square label maps only, but preprocessing="
            f"{dataset.preprocessing} evaluates every image at its own resized size; run it "
            "with preprocessing=diffseg or diffcut"
        )


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


def _fingerprint(rc: RunConfig, options, settings, dataset, ids) -> dict[str, Any]:
    """What must not change when a run resumes: everything that changes its numbers or files."""
    ds = rc.dataset
    keep = (
        "name",
        "split",
        "curated",
        "ids_file",
        "crop",
        "void_as_background",
        "other_as_class",
        "classes",
    )
    chosen = {k: ds.get(k) for k in keep if k in ds and k != "classes"}
    counts = dataset.info.class_counts if getattr(dataset, "info", None) else ()
    if counts:
        chosen |= _unless_default("classes", ds.get("classes") or counts[0], counts[0])
    return {
        "dataset": chosen,
        "dataset_size": len(dataset),
        "limit": options.limit,
        "resolution": options.resolution,
        "preprocessing": dataset.preprocessing,
        "image_size": dataset.image_size,
        "backbone": {k: rc.backbone.get(k) for k in ("name", "path", "random_config", "timestep")},
        "dtype": str(options.dtype).replace("torch.", ""),
        "precision": {
            "vae": None if options.vae_dtype is None else str(options.vae_dtype),
            "attention": str(options.attention_dtype),
        },
        "seed": options.seed,
        "save_predictions": options.save_predictions,
        **_unless_default("matching", options.matching, "image"),
        **_unless_default("background_merge", options.background_merge, True),
        "settings": {s.name or "": s.describe() for s in settings},
    }


def _unless_default(key: str, value: Any, default: Any) -> dict[str, Any]:
    """``{key: value}`` for the fingerprint, or nothing at the option's default: options added
    after a run dir was made must not stop it from resuming."""
    return {} if value == default else {key: value}


def _setting_run(
    setting,
    dataset,
    ids,
    options: RunOptions,
    random_weights: bool,
    rc: RunConfig,
    suffix: str = "",
) -> SettingRun:
    """A setting with its evaluators: the configured ones (``evaluators:``, in order), then the
    records (metric rows for labelled data, segment counts otherwise)."""
    meta = {
        "method": setting.method_name,
        "setting": setting.name or "",
        "backbone": str(rc.backbone["name"]),
        "random_weights": random_weights,
    }
    ctx = EvaluatorContext(
        setting.out_dir, list(ids), dataset, meta, options.save_predictions, options.num_overlays
    )
    writers = [w for w in (factory(ctx) for factory in _evaluator_factories(rc)) if w]
    if dataset.has_labels:
        records = MetricEvaluator(
            setting.out_dir, ids, dataset.class_names, random_weights, suffix, options.matching
        )
    else:
        records = SegmentCounter(setting.out_dir, ids, random_weights, suffix)
    return SettingRun(setting, writers, records)


def _evaluator_factories(rc: RunConfig) -> list:
    """The ``evaluators:`` list of the config: factories ``(EvaluatorContext) -> Evaluator or
    None`` (``_target_`` + arguments, built as partials)."""
    from hydra.utils import instantiate

    out = []
    for entry in rc.evaluators:
        if not isinstance(entry, dict) or "_target_" not in entry:
            raise ConfigError(f"each entry of evaluators needs a _target_: {entry!r}")
        try:
            out.append(instantiate({**entry, "_partial_": True}))
        except Exception as err:
            raise ConfigError(f"evaluators: {entry['_target_']}: {err}") from None
    return out


def _loop(dataset, todo, backbone, runs, options, progress, stages):
    """The data loader over the images still to do, then :func:`run_loop` with a progress bar."""
    import torch
    from torch.utils.data import DataLoader, Subset

    from ..data.collate import collate_items

    index_of = {image_id: k for k, image_id in enumerate(dataset.ids)}
    loader = DataLoader(
        Subset(dataset, [index_of[i] for i in todo]),
        batch_size=options.batch_size,
        shuffle=False,
        collate_fn=collate_items,
        num_workers=options.num_workers if len(todo) > 1 else 0,
        pin_memory=options.device.type == "cuda",
    )
    if options.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(options.device)
    with progress:
        return run_loop(
            loader,
            backbone,
            runs,
            options.resolution,
            options.device,
            on_batch=progress.update,
            background=_background(dataset) if options.background_merge else None,
            overlap=options.overlap,
            times=stages,
        )


def _background(dataset) -> tuple[int, int] | None:
    """``(background class, classes)`` of a dataset with a background class, else None."""
    index = getattr(dataset, "background_index", None)
    return None if index is None else (int(index), int(dataset.num_classes))


def _background_note(dataset, options) -> dict[str, Any]:
    """``{"background_merge": bool}`` for a dataset with a background class, else nothing."""
    if _background(dataset) is None:
        return {}
    return {"background_merge": options.background_merge}


def _session(started: str, t_start: float, images: int, stages, options) -> dict[str, Any]:
    return {
        "started": started,
        "finished": now(),
        "images": images,
        "wall_time_s": round(time.perf_counter() - t_start, 3),
        "stages": stages.as_dict(),
        "device": str(options.device),
        "batch_size": options.batch_size,
        "peak_memory": peak_memory(options.device),
        "versions": versions(),
    }


def _dataset_summary(rc: RunConfig, dataset, ids) -> dict[str, Any]:
    desc = {k: v for k, v in dataset.describe().items() if k != "name"}
    return {
        "name": str(rc.dataset["name"]),
        **desc,
        "size": len(dataset),
        "num_images_run": len(ids),
        # the dataset says: full_benchmark, images_found / images_expected, incomplete
        **dataset.benchmark_coverage(ids),
        "curated": getattr(dataset, "curated", None),
    }


def _report(rc: RunConfig, prep: _Prepared) -> dict[str, Any]:
    """``results.json`` for every setting (and ``sweep_results.json`` for several)."""
    options, dataset, ids, runs = prep.options, prep.dataset, prep.ids, prep.runs
    rundir, random_weights = prep.rundir, prep.random_weights
    common = {
        "dataset": _dataset_summary(rc, dataset, ids),
        "resolution": options.resolution,
        "backbone": rundir.backbone or rc.backbone,
        "backbone_name": str(rc.backbone["name"]),
        "random_weights": random_weights,
        "limit": options.limit,
        "seed": options.seed,
        **_background_note(dataset, options),
        "timing": timing_summary(rundir.sessions),
        "peak_memory": peak_memory(options.device),
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
        if rundir.skipped:
            res["skipped"] = rundir.skipped
        res["images_resumed"] = run.records.resumed
        res = write_results(run.setting.out_dir / "results.json", res)  # kept if unchanged
        results[run.setting.name or ""] = res
    if len(runs) > 1:
        write_sweep_results(rundir.path, results, random_weights)
    return results


def _tracker(rc: RunConfig, prep: _Prepared):
    from ..tracking import build_tracker, coverage_tags

    rundir, settings, options = prep.rundir, prep.settings, prep.options
    random_weights = prep.random_weights
    tags = [str(rc.dataset["name"]), settings[0].method_name, f"res{options.resolution}"]
    tags += [str(rc.backbone["name"])] + (["random-weights"] if random_weights else [])
    tags += coverage_tags(prep.dataset.benchmark_coverage(prep.ids))  # "partial"
    config = dict(rc.resolved, random_weights=random_weights)
    name = (
        f"{rc.dataset['name']}-{settings[0].method_name}-{options.resolution}-{rc.backbone['name']}"
    )
    try:
        tracker = build_tracker(
            rc.logger,
            rundir.path,
            config,
            tags=tags,
            run_id=rundir.wandb_id,
            name=name,
        )
    except ValueError as err:
        raise ConfigError(str(err)) from err
    rundir.wandb_id = tracker.run_id or rundir.wandb_id
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
    summary.update(coverage_summary(next(iter(results.values()))["dataset"]))
    tracker.log_summary(summary)


def _loud_warning() -> None:
    random_weights_banner(RANDOM_WARNING, log)


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
    out = run_task(
        lambda: evaluate(cfg, run_dir),
        run_dir,
        claimed=lambda: (run_dir / "run.json").exists(),
        clean_up_to=Path.cwd(),
        interrupted=lambda: (
            f"\nInterrupted. Finished images are saved in {run_dir}; to continue, run:\n  "
            + resume_hint(run_dir)
        ),
    )
    if not out["results"]:  # a process that leaves the results to the main one
        return None
    miou = next(iter(out["results"].values())).get("miou")
    return None if miou is None else float(miou)
