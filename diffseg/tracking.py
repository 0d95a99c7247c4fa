"""Experiment tracking for the runner: Weights & Biases, or nothing.

``build_tracker`` picks the mode without ever prompting for a login: online when an API key is
available (``WANDB_API_KEY``, ``~/.netrc`` or the key wandb stored), otherwise offline with one
line saying how to upload the run later (``wandb sync <dir>``). ``WANDB_MODE`` in the
environment wins over the config.
"""

from __future__ import annotations

import logging
import math
import netrc
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = [
    "NullTracker",
    "Tracker",
    "WandbTracker",
    "build_tracker",
    "null_tracker",
    "wandb_logged_in",
    "wandb_tracker",
]


class Tracker:
    """Interface of a tracker; this base class does nothing (``logger=none``)."""

    name = "none"
    run_id: str | None = None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Running metrics (e.g. ``{"acc": 70.1, "miou": 40.2, "images_per_s": 1.3}``)."""

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """Final numbers (shown in the run's summary)."""

    def log_class_table(self, key: str, class_names: Sequence[str], iou: Sequence[float]) -> None:
        """Per-class IoU (percent, nan where undefined) as a table."""

    def log_images(self, key: str, paths: Sequence[str | os.PathLike]) -> None:
        """PNG files (overlays)."""

    def finish(self, exit_code: int = 0) -> None:
        """Close the run (``exit_code`` != 0 marks it failed or interrupted)."""


class NullTracker(Tracker):
    """``logger=none``: tracking off."""


def wandb_logged_in() -> bool:
    """Whether an API key for W&B is available without asking: WANDB_API_KEY, the netrc entry
    ``wandb login`` writes, or the key wandb itself resolves. Never prompts."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
        if os.path.isfile(path) and netrc.netrc(path).authenticators(host):
            return True
    except (OSError, netrc.NetrcParseError):
        pass
    try:
        import wandb

        return bool(wandb.api.api_key)
    except Exception:
        return False


def _resolve_mode(requested: str | None) -> tuple[str, str | None]:
    """(mode, note): mode in online/offline/disabled; note is a line for the user or None."""
    env = os.environ.get("WANDB_MODE")
    mode = (env or requested or "auto").strip().lower()
    if mode == "dryrun":
        mode = "offline"
    if mode == "auto":
        if wandb_logged_in():
            return "online", None
        return "offline", "not logged in to W&B"
    if mode not in ("online", "offline", "disabled"):
        raise ValueError(
            f"logger.mode must be auto, online, offline or disabled, got {mode!r}"
            + (" (from WANDB_MODE)" if env else "")
        )
    if mode == "online" and not wandb_logged_in():
        raise ValueError(
            "logger.mode=online but no W&B API key was found (WANDB_API_KEY or `wandb login`); "
            "log in first, or use logger.mode=auto/offline, or logger=none"
        )
    return mode, None


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class WandbTracker(Tracker):
    """A W&B run in ``run_dir`` (its files go to ``run_dir/wandb/``).

    Args:
        run_dir: the runner's output folder.
        config: the resolved run config (JSON-able dict).
        project, entity, group: W&B names (entity None = the user's default).
        tags: e.g. ``["coco_stuff27", "diffseg", "res512"]``; "random-weights" is added by the
            runner for random backbones.
        mode: auto / online / offline / disabled (``WANDB_MODE`` wins).
        run_id: resume this W&B run id (the runner keeps one per run dir); None = new id.
        name: display name of the run.
    """

    name = "wandb"

    def __init__(
        self,
        run_dir: str | os.PathLike,
        config: Mapping[str, Any],
        project: str = "diffseg",
        entity: str | None = None,
        group: str | None = None,
        tags: Sequence[str] = (),
        mode: str | None = "auto",
        run_id: str | None = None,
        name: str | None = None,
    ) -> None:
        import wandb

        self._wandb = wandb
        mode, note = _resolve_mode(mode)
        self.mode = mode
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(
            mode=mode,
            silent=True,
            console="off",
            disable_git=True,
            save_code=False,
            x_disable_stats=True,
        )
        self.run = wandb.init(
            project=project,
            entity=entity,
            group=group,
            name=name,
            dir=str(run_dir),
            config=dict(config),
            tags=[t[:64] for t in tags],
            id=run_id,
            resume="allow" if run_id else None,
            settings=settings,
            reinit="create_new",
        )
        self.run_id = self.run.id
        self.run_dir = Path(self.run.dir).parent if self.run.dir else run_dir
        if mode == "offline":
            reason = f"{note}; " if note else ""
            log.info(
                "W&B: %slogging offline. Upload later with: wandb sync %s", reason, self.run_dir
            )
        self._step = 0

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        data = {k: _clean(v) for k, v in metrics.items()}
        self.run.log(data, step=step)

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        for key, value in summary.items():
            self.run.summary[key] = _clean(value)

    def log_class_table(self, key: str, class_names: Sequence[str], iou: Sequence[float]) -> None:
        table = self._wandb.Table(columns=["class", "iou"])
        for name, value in zip(class_names, iou, strict=True):
            table.add_data(name, _clean(float(value)) if value is not None else None)
        self.run.log({key: table})

    def log_images(self, key: str, paths: Sequence[str | os.PathLike]) -> None:
        if paths:
            images = [self._wandb.Image(str(p), caption=Path(p).stem) for p in paths]
            self.run.log({key: images})

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


#: The W&B tag of a run that is not the whole benchmark (a ``limit``, a subset, a partial copy).
PARTIAL_TAG = "partial"


def coverage_tags(coverage: Mapping[str, Any]) -> list[str]:
    """Tags for a dataset's :meth:`~diffseg.data.base.ImageDataset.benchmark_coverage`:
    ``["partial"]`` unless the run covers the full benchmark."""
    return [] if coverage.get("full_benchmark", True) else [PARTIAL_TAG]


def coverage_summary(dataset_summary: Mapping[str, Any]) -> dict[str, Any]:
    """The W&B summary keys that say what a run covers (results.json's ``dataset`` part):
    ``full_benchmark``, ``images_found`` and ``images_expected`` (None when not known)."""
    keys = ("full_benchmark", "images_found", "images_expected")
    return {f"dataset/{k}": dataset_summary.get(k) for k in keys}


def build_tracker(
    logger_cfg: Mapping[str, Any] | None,
    run_dir: str | os.PathLike,
    config: Mapping[str, Any],
    tags: Sequence[str] = (),
    run_id: str | None = None,
    name: str | None = None,
) -> Tracker:
    """The tracker a ``logger`` config asks for: its ``_target_`` (a factory such as
    :func:`wandb_tracker` or :func:`null_tracker`, called with the run's ``run_dir``, ``config``,
    ``tags``, ``run_id`` and ``name``), or the older ``name: wandb | none``."""
    cfg = dict(logger_cfg or {})
    if "_target_" in cfg:
        from hydra.utils import get_method

        factory = get_method(str(cfg.pop("_target_")))
        tags = [*tags, *(cfg.pop("tags", None) or [])]
        cfg.pop("log_every", None)  # read by the progress bar, not by the tracker
        cfg.pop("name", None)
        return factory(run_dir=run_dir, config=config, tags=tags, run_id=run_id, name=name, **cfg)
    kind = str(cfg.get("name", "none")).lower()
    if kind in ("none", "null", "off", "false"):
        return NullTracker()
    if kind != "wandb":
        raise ValueError(f"logger.name must be wandb or none, got {kind!r}")
    mode, _ = _resolve_mode(cfg.get("mode"))
    if mode == "disabled":
        return NullTracker()
    return WandbTracker(
        run_dir,
        config,
        project=cfg.get("project") or "diffseg",
        entity=cfg.get("entity"),
        group=cfg.get("group"),
        tags=[*tags, *(cfg.get("tags") or [])],
        mode=cfg.get("mode"),
        run_id=run_id,
        name=name,
    )


def null_tracker(**_: Any) -> Tracker:
    """No tracking (``logger=none``)."""
    return NullTracker()


def wandb_tracker(
    run_dir: str | os.PathLike,
    config: Mapping[str, Any],
    tags: Sequence[str] = (),
    run_id: str | None = None,
    name: str | None = None,
    project: str = "diffseg",
    entity: str | None = None,
    group: str | None = None,
    mode: str | None = "auto",
) -> Tracker:
    """A :class:`WandbTracker` (``logger=wandb``), or none when the mode resolves to disabled."""
    if _resolve_mode(mode)[0] == "disabled":
        return NullTracker()
    return WandbTracker(
        run_dir, config, project=project or "diffseg", entity=entity, group=group, tags=tags,
        mode=mode, run_id=run_id, name=name,
    )  # fmt: skip
