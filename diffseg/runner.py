"""The experiment runner behind ``python run.py``: dataset -> backbone -> segmentor(s) -> metric.

A run evaluates one or more segmentor settings ("variants": the method config plus
``sweep``/``variants`` overrides) on a dataset, with ONE Stable Diffusion attention pass per
image shared by all settings. It writes into its run dir (Hydra's output dir):

- ``config_resolved.yaml``: the resolved config; ``run.json``: what a resume must match.
- per setting (the run dir itself, or ``<setting name>/`` when several settings are swept):
  ``per_image.csv`` (one row per image, appended and fsync'ed as images finish, with the
  integer TP/FP/FN counts that make a resume exact), ``results.json`` (written atomically when
  the run completes), ``overlays/`` and, on request or for image folders, ``predictions/``.
- ``sweep_results.json``: one line per setting when several are swept.

Restarting on the same run dir resumes: finished images are skipped, their saved counts are
added back with ``HungarianMetrics.add_records``, and the final numbers equal an uninterrupted
run's. A torn last row (a kill mid-write) is dropped and recomputed.

Errors a user can cause (config values, missing data or weights, a run dir of another config)
raise :class:`RunError` with one clear message; ``main`` prints it and exits with status 2.
"""

from __future__ import annotations

import csv
import datetime as _dt
import inspect
import itertools
import json
import logging
import math
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

__all__ = [
    "CSV_COLUMNS",
    "ConfigError",
    "ResumeError",
    "RunError",
    "Variant",
    "build_variants",
    "main",
    "read_per_image",
    "run",
]

#: Columns of ``per_image.csv`` for labelled datasets (tp/fp/fn: JSON lists of per-class ints).
CSV_COLUMNS = ["id", "acc", "miou", "num_segments", "num_classes", "pixels", "tp", "fp", "fn"]
#: Columns for image folders (no labels, no metric).
CSV_COLUMNS_UNLABELLED = ["id", "num_segments"]

RESOLUTION_RANGE = (64, 1024)
METHODS = ("diffseg", "kmeans_c", "kmeans_s")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
RANDOM_WARNING = (
    "RANDOM WEIGHTS: this run used a backbone with random weights (tests, smoke runs, compute "
    "measurements). Its numbers say nothing about DiffSeg and must not be reported."
)


class RunError(Exception):
    """A problem the user can fix (bad config value, missing data or weights, run dir clash)."""


class ConfigError(RunError, ValueError):
    """A config value is invalid or the data/weights it points at cannot be used."""


class ResumeError(RunError):
    """The run dir holds a run of another configuration, or its files are damaged."""


# ---------------------------------------------------------------------------------------------
# Config checks
# ---------------------------------------------------------------------------------------------


def _plain(cfg: Any) -> Any:
    """A DictConfig/ListConfig (or anything) as resolved plain Python."""
    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; otherwise a torch device that must exist."""
    name = str(name).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(
            f"device={name!r} is not a device; use auto, cpu, cuda, cuda:<index> or mps"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device={name} but CUDA is not available here; use device=auto or cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device={name} but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ConfigError("device=mps but MPS is not available here; use device=auto or cpu")
    elif device.type != "cpu":
        raise ConfigError(f"device={name!r} is not supported; use auto, cpu, cuda[:N] or mps")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``float32`` (default, faithful), ``float16`` or ``bfloat16``."""
    key = str(name).strip().lower()
    if key not in DTYPES:
        raise ConfigError(f"dtype={name!r} is not supported; use float32, float16 or bfloat16")
    dtype = DTYPES[key]
    if dtype == torch.float16 and device.type == "cpu":
        log.warning("dtype=float16 on the CPU is slow and not faithful; float32 is recommended")
    return dtype


def _int_knob(cfg: DictConfig, key: str, minimum: int, allow_none: bool = False) -> int | None:
    value = cfg.get(key)
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        want = f"an integer >= {minimum}" + (" or null" if allow_none else "")
        raise ConfigError(f"{key}={value!r} is invalid; it must be {want}")
    return value


def check_config(cfg: DictConfig) -> dict[str, Any]:
    """Validate the top-level knobs; returns them resolved (device, dtype, ints)."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as err:  # MissingMandatoryValue, InterpolationResolutionError
        key = getattr(err, "full_key", None) or ""
        if "dataset.path" in str(key) or "dataset.path" in str(err):
            raise ConfigError(
                "dataset=folder needs the folder of images: add dataset.path=/path/to/images"
            ) from None
        raise ConfigError(f"config value missing or unresolvable: {key} ({err})") from None
    resolution = cfg.get("resolution")
    lo, hi = RESOLUTION_RANGE
    if (
        isinstance(resolution, bool)
        or not isinstance(resolution, int)
        or not lo <= resolution <= hi
    ):
        raise ConfigError(
            f"resolution={resolution!r} is invalid; it is the evaluation resolution in pixels, an "
            f"integer in [{lo}, {hi}] (the paper uses 320 and 512)"
        )
    device = resolve_device(cfg.get("device", "auto"))
    knobs = {
        "resolution": resolution,
        "device": device,
        "dtype": resolve_dtype(cfg.get("dtype", "float32"), device),
        "batch_size": _int_knob(cfg, "batch_size", 1),
        "limit": _int_knob(cfg, "limit", 1, allow_none=True),
        "num_workers": _int_knob(cfg, "num_workers", 0),
        "num_overlays": _int_knob(cfg, "num_overlays", 0),
        "seed": _int_knob(cfg, "seed", 0),
        "save_predictions": bool(cfg.get("save_predictions", False)),
    }
    method = cfg.method.get("name")
    if method not in METHODS:
        raise ConfigError(f"method.name={method!r} is unknown; use one of {', '.join(METHODS)}")
    return knobs


# ---------------------------------------------------------------------------------------------
# Segmentor settings (variants)
# ---------------------------------------------------------------------------------------------


def _fmt_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "-".join(_fmt_value(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


@dataclass
class Variant:
    """One segmentor setting: its method kwargs, name (subfolder) and output folder."""

    name: str | None  # None when the run has a single setting (outputs in the run dir)
    method: str
    params: dict[str, Any]
    overrides: dict[str, Any] = field(default_factory=dict)
    segmentor: Any = None
    out_dir: Path | None = None

    def describe(self) -> dict[str, Any]:
        return {"name": self.method, **self.params}


def build_variants(
    method_cfg: Mapping[str, Any],
    sweep: Mapping[str, Any] | None,
    variants: Sequence[Mapping[str, Any]] | None,
) -> list[Variant]:
    """The settings of a run: the cartesian product of the non-null ``sweep`` lists, then each
    ``variants`` entry, every one applied over the method config. None of them: just the method.

    Args:
        method_cfg: resolved method config (``name`` + constructor kwargs).
        sweep: ``{key: [values...] | None}``; a key must be a parameter of the method config.
        variants: ``[{key: value, ...}, ...]`` explicit overrides.
    """
    method_cfg = dict(method_cfg)
    method = method_cfg.pop("name")
    sweep = {k: v for k, v in (sweep or {}).items() if v is not None}
    for key, values in sweep.items():
        if key not in method_cfg:
            raise ConfigError(
                f"sweep.{key}: method {method} has no parameter {key!r} "
                f"(its parameters: {', '.join(method_cfg) or 'none'}); set sweep.{key}=null"
            )
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(
                f"sweep.{key} must be a non-empty list of values, e.g. sweep.{key}=[0.9,1.1]; "
                f"got {values!r}"
            )
    overrides: list[dict[str, Any]] = []
    if sweep:
        keys = list(sweep)
        for combo in itertools.product(*(sweep[k] for k in keys)):
            overrides.append(dict(zip(keys, combo, strict=True)))
    for entry in variants or []:
        if not isinstance(entry, Mapping) or not entry:
            raise ConfigError(
                f"each entry of variants must be a mapping of method keys, got {entry!r}"
            )
        for key in entry:
            if key not in method_cfg:
                raise ConfigError(
                    f"variants: method {method} has no parameter {key!r} "
                    f"(its parameters: {', '.join(method_cfg) or 'none'})"
                )
        overrides.append(dict(entry))
    if not overrides:
        return [Variant(name=None, method=method, params=method_cfg)]
    out: list[Variant] = []
    seen: set[str] = set()
    for over in overrides:
        name = ",".join(f"{k}={_fmt_value(v)}" for k, v in over.items())
        if name in seen:
            raise ConfigError(f"the setting {name} appears twice in sweep/variants")
        seen.add(name)
        out.append(Variant(name=name, method=method, params={**method_cfg, **over}, overrides=over))
    return out


def build_segmentor(method: str, params: Mapping[str, Any]) -> Any:
    """The segmentor object of a method name and its config parameters."""
    if method == "diffseg":
        from diffseg.segmentor import DiffSeg

        factory: Callable[..., Any] = DiffSeg
    else:
        from diffseg.baselines import KMeansSegmentor

        factory = KMeansSegmentor
    kwargs = dict(params)
    if method == "kmeans_s":
        if kwargs.get("num_clusters") is not None:
            raise ConfigError(
                "method=kmeans_s takes the number of clusters from each image's labels; "
                "leave method.num_clusters=null (or use method=kmeans_c)"
            )
        kwargs["num_clusters"] = None
    if method == "kmeans_c" and kwargs.get("num_clusters") is None:
        raise ConfigError("method=kmeans_c needs method.num_clusters (an integer, 6 in the paper)")
    try:
        sig = inspect.signature(factory)
        accepts_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
        unknown = [k for k in kwargs if k not in sig.parameters and not accepts_any]
    except (TypeError, ValueError):
        unknown = []
    if unknown:
        raise ConfigError(
            f"method.{unknown[0]} is not a parameter of {factory.__name__} "
            f"(it takes: {', '.join(p for p in inspect.signature(factory).parameters if p != 'self')})"
        )
    try:
        return factory(**kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"method={method} with {kwargs}: {err}") from err


# ---------------------------------------------------------------------------------------------
# Files: per_image.csv, atomic JSON
# ---------------------------------------------------------------------------------------------


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON (strict: nan -> null) to a temp file in the same folder, fsync, rename."""
    from eval.metrics import json_safe

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(json_safe(data), f, indent=2, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _parse_row(row: dict[str, str], columns: Sequence[str]) -> dict[str, Any]:
    """A CSV row back to a record; raises ValueError on anything malformed."""
    if None in row or any(row.get(c) is None for c in columns):
        raise ValueError("wrong number of fields")
    rec: dict[str, Any] = {"id": row["id"]}
    if not rec["id"]:
        raise ValueError("empty id")
    for key in ("acc", "miou"):
        if key in columns:
            rec[key] = float(row[key]) if row[key] != "" else None
    for key in ("num_segments", "num_classes", "pixels"):
        if key in columns:
            rec[key] = int(row[key])
    for key in ("tp", "fp", "fn"):
        if key in columns:
            values = json.loads(row[key])
            if not isinstance(values, list) or not all(isinstance(v, int) for v in values):
                raise ValueError(f"{key} is not a list of integers")
            rec[key] = values
    return rec


def read_per_image(path: Path, columns: Sequence[str], repair: bool = True) -> list[dict[str, Any]]:
    """Records saved in ``per_image.csv``, in file order.

    A trailing partial line (the process died mid-write) is cut off the file when ``repair``;
    a last complete row that does not parse is dropped the same way. Damage anywhere else
    raises :class:`ResumeError`.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    keep = data
    if data and not data.endswith(b"\n"):
        keep = data[: data.rfind(b"\n") + 1]  # rfind -1 -> b""
    lines = keep.decode("utf-8", errors="replace").splitlines()
    if not lines:
        if repair and keep != data:
            _truncate(path, 0)
        return []
    header = next(csv.reader([lines[0]]))
    if header != list(columns):
        raise ResumeError(
            f"{path} has columns {header}, expected {list(columns)}: it belongs to another kind of "
            "run. Use a new run dir (hydra.run.dir=...)."
        )
    records: list[dict[str, Any]] = []
    good_bytes = len(lines[0].encode("utf-8")) + 1
    for n, line in enumerate(lines[1:], start=2):
        try:
            row = next(csv.DictReader([line], fieldnames=list(columns)))
            rec = _parse_row(row, columns)
        except (ValueError, StopIteration, csv.Error) as err:
            if n == len(lines):  # the last row: a torn write that happened to end in a newline
                log.warning("%s: dropping its damaged last row (%s); it is recomputed", path, err)
                break
            raise ResumeError(
                f"{path} line {n} is damaged ({err}); fix or delete that line (the image is "
                "then recomputed) and run again"
            ) from None
        records.append(rec)
        good_bytes += len(line.encode("utf-8")) + 1
    if repair and good_bytes != len(data):
        log.warning("%s: removing an incomplete last row (interrupted write)", path)
        _truncate(path, good_bytes)
    return records


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)
        f.flush()
        os.fsync(f.fileno())


class RowWriter:
    """Appends rows to ``per_image.csv`` and makes each batch durable (flush + fsync)."""

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        self.path = path
        self.columns = list(columns)
        new = not path.exists() or path.stat().st_size == 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8", newline="")
        self._writer = csv.writer(self._file, lineterminator="\n")
        if new:
            self._writer.writerow(self.columns)
            self.sync()

    def write(self, record: Mapping[str, Any]) -> None:
        row = []
        for col in self.columns:
            value = record.get(col)
            if col in ("tp", "fp", "fn"):
                row.append(json.dumps([int(v) for v in value], separators=(",", ":")))
            elif value is None or (isinstance(value, float) and math.isnan(value)):
                row.append("")
            elif isinstance(value, float):
                row.append(repr(round(value, 6)))
            else:
                row.append(value)
        self._writer.writerow(row)

    def sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self.sync()
            self._file.close()


# ---------------------------------------------------------------------------------------------
# Run dir: fingerprint and resume
# ---------------------------------------------------------------------------------------------


def fingerprint(cfg: DictConfig, variants: Sequence[Variant], dtype: torch.dtype) -> dict[str, Any]:
    """What must not change when a run resumes: everything that changes the numbers."""
    ds = _plain(cfg.dataset)
    return {
        "dataset": {k: ds.get(k) for k in ("name", "split", "curated", "ids_file") if k in ds},
        "resolution": cfg.resolution,
        "backbone": {k: cfg.backbone.get(k) for k in ("name", "random_config", "timestep")},
        "dtype": str(dtype).replace("torch.", ""),
        "seed": cfg.seed,
        "settings": {v.name or "": v.describe() for v in variants},
    }


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    if old != new:
        return [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]
    return []


def check_resume(run_dir: Path, fp: dict[str, Any]) -> dict[str, Any] | None:
    """The saved ``run.json`` of a run dir (None for a new run); raises when its config differs."""
    path = run_dir / "run.json"
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ResumeError(f"{path} is unreadable ({err}); use a new run dir") from None
    diffs = _diff(saved.get("fingerprint"), json.loads(json.dumps(fp)))
    if diffs:
        raise ResumeError(
            f"refusing to resume: the run dir {run_dir} holds a run with another configuration:\n  "
            + "\n  ".join(diffs[:10])
            + "\nRun the original command to resume it, or choose a new dir (hydra.run.dir=...)."
        )
    return saved


def _backup_hydra_files(run_dir: Path, restore: bool) -> None:
    """Hydra rewrites ``.hydra/*.yaml`` at every start; keep the first start's copy, and put it
    back when a resume is refused so the run dir still describes its own run."""
    hydra_dir, keep = run_dir / ".hydra", run_dir / ".hydra" / "first_start"
    if not hydra_dir.is_dir():
        return
    if restore:
        if keep.is_dir():
            for f in keep.glob("*.yaml"):
                (hydra_dir / f.name).write_bytes(f.read_bytes())
        return
    if not keep.exists():
        keep.mkdir()
        for f in hydra_dir.glob("*.yaml"):
            (keep / f.name).write_bytes(f.read_bytes())


# ---------------------------------------------------------------------------------------------
# Building the pieces
# ---------------------------------------------------------------------------------------------


def build_dataset_from_config(ds_cfg: Mapping[str, Any], resolution: int) -> Any:
    """The dataset of a ``dataset`` config (images at 512 for SD, labels at ``resolution``)."""
    from diffseg.data import build_dataset

    ds = dict(ds_cfg)
    name = ds.pop("name")
    ds.pop("kl_threshold", None)
    kwargs: dict[str, Any] = {"image_size": 512, "label_size": resolution}
    if name == "folder":
        kwargs["path"] = ds.get("path")
    else:
        kwargs.update(
            {k: v for k, v in ds.items() if k in ("root", "split", "curated", "ids_file")}
        )
        if kwargs.get("ids_file") is None:
            kwargs.pop("ids_file", None)
    try:
        return build_dataset(name, **kwargs)
    except (FileNotFoundError, ValueError, TypeError, NotADirectoryError) as err:
        raise ConfigError(f"dataset={name}: {err}") from err


def build_backbone_from_config(
    bb_cfg: Mapping[str, Any], device: torch.device, dtype: torch.dtype, seed: int
) -> Any:
    """The backbone of a ``backbone`` config: pretrained from ``path``, or random weights."""
    from diffseg.backbone import StableDiffusionBackbone

    timestep = int(bb_cfg.get("timestep", 300))
    try:
        if bb_cfg.get("random_config"):
            return StableDiffusionBackbone.from_config(
                bb_cfg["random_config"], dtype=dtype, device=device, seed=seed, timestep=timestep
            )
        if not bb_cfg.get("path"):
            raise ConfigError(
                f"backbone={bb_cfg.get('name')} needs backbone.path (a hub id or folder)"
            )
        return StableDiffusionBackbone.from_pretrained(
            bb_cfg["path"], dtype=dtype, device=device, timestep=timestep
        )
    except (FileNotFoundError, ValueError) as err:
        if isinstance(err, RunError):
            raise
        hint = ""
        if isinstance(err, FileNotFoundError):
            hint = "\n(For an offline smoke run with random weights, use backbone=tiny.)"
        raise ConfigError(f"backbone={bb_cfg.get('name')}: {err}{hint}") from err


def _peak_memory(device: torch.device) -> dict[str, float | None]:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mb = rss / 1024 / 1024 if platform.system() == "Darwin" else rss / 1024  # bytes vs KiB
    cuda_mb = None
    if device.type == "cuda":
        cuda_mb = torch.cuda.max_memory_allocated(device) / 2**20
    return {
        "cpu_rss_mb": round(rss_mb, 1),
        "cuda_mb": None if cuda_mb is None else round(cuda_mb, 1),
    }


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("diffusers", "transformers", "diffseg"):
        try:
            out[mod] = getattr(__import__(mod), "__version__", "?")
        except ImportError:
            pass
    return out


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


@dataclass
class _VariantState:
    variant: Variant
    writer: RowWriter | None = None
    metrics: Any = None
    done: set[str] = field(default_factory=set)
    resumed: int = 0
    overlays: list[Path] = field(default_factory=list)


def _num_classes_per_image(labels: torch.Tensor) -> list[int]:
    """(B, S, S) labels -> distinct labelled classes per image (at least 1, for K-Means-S)."""
    return [max(1, int(torch.unique(lab[lab >= 0]).numel())) for lab in labels]


def run(
    cfg: DictConfig,
    run_dir: str | os.PathLike,
    on_batch: Callable[[int], None] | None = None,
    backbone: Any = None,
) -> dict[str, Any]:
    """Evaluate the configured method(s) on the configured dataset, writing into ``run_dir``.

    Args:
        cfg: the composed config (configs/config.yaml).
        run_dir: output folder; a folder holding an unfinished (or finished) run of the same
            config is resumed.
        on_batch: called with the number of images finished in this call after each batch
            (after its rows are durable); tests use it to interrupt a run.
        backbone: an already loaded backbone to use instead of building ``cfg.backbone``
            (to reuse one model across runs in Python); it must be the configured one.

    Returns:
        ``{"run_dir", "random_weights", "results": {setting name or "": results dict}}``.

    Raises:
        RunError: invalid config value, missing data/weights, run dir of another config.
    """
    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    knobs = check_config(cfg)
    device, dtype, resolution = knobs["device"], knobs["dtype"], knobs["resolution"]
    method_cfg = _plain(cfg.method)
    variants = build_variants(method_cfg, _plain(cfg.get("sweep")), _plain(cfg.get("variants")))
    for v in variants:  # cheap and catches bad method values before any loading
        v.segmentor = build_segmentor(v.method, v.params)
        v.out_dir = run_dir / v.name if v.name else run_dir

    dataset = build_dataset_from_config(_plain(cfg.dataset), resolution)
    labelled = bool(getattr(dataset, "has_labels", False))
    if not labelled and any(v.method == "kmeans_s" for v in variants):
        raise ConfigError(
            "method=kmeans_s needs ground-truth labels (clusters = classes per image); "
            f"dataset={cfg.dataset.name} has none: use method=kmeans_c or diffseg"
        )
    ids = list(dataset.ids)
    if knobs["limit"] is not None:
        ids = ids[: knobs["limit"]]
    id_set = set(ids)
    index_of = {image_id: k for k, image_id in enumerate(dataset.ids)}
    columns = CSV_COLUMNS if labelled else CSV_COLUMNS_UNLABELLED
    save_predictions = knobs["save_predictions"] or not labelled
    num_overlays = knobs["num_overlays"] if labelled else len(ids)

    # --- run dir: new or resume -------------------------------------------------------------
    fp = fingerprint(cfg, variants, dtype)
    try:
        saved = check_resume(run_dir, fp)
    except ResumeError:
        _backup_hydra_files(run_dir, restore=True)
        raise
    run_dir.mkdir(parents=True, exist_ok=True)
    _backup_hydra_files(run_dir, restore=False)
    states = [_VariantState(v) for v in variants]
    from eval.metrics import HungarianMetrics

    for st in states:
        records = read_per_image(st.variant.out_dir / "per_image.csv", columns)
        seen: set[str] = set()
        keep = []
        for rec in records:
            if rec["id"] in id_set and rec["id"] not in seen:
                seen.add(rec["id"])
                keep.append(rec)
        st.done = seen
        st.resumed = len(keep)
        if labelled:
            st.metrics = HungarianMetrics(num_classes=dataset.num_classes)
            try:
                st.metrics.add_records(keep)
            except ValueError as err:
                raise ResumeError(f"{st.variant.out_dir / 'per_image.csv'}: {err}") from None
    todo = [i for i in ids if not all(i in st.done for st in states)]
    resumed = min(st.resumed for st in states)
    if saved is not None:
        log.info(
            "resuming %s: %d of %d images done, %d to go",
            run_dir,
            len(ids) - len(todo),
            len(ids),
            len(todo),
        )
    if saved is None:
        saved = {"fingerprint": json.loads(json.dumps(fp)), "created": _now()}
    saved.setdefault("wandb_id", None)

    # --- backbone ----------------------------------------------------------------------------
    random_weights = bool(cfg.backbone.get("random_config"))
    if todo and backbone is None:
        backbone = build_backbone_from_config(_plain(cfg.backbone), device, dtype, knobs["seed"])
    if backbone is not None:
        random_weights = bool(getattr(backbone, "is_random", random_weights))
    if random_weights:
        _loud_warning()

    # --- tracker -----------------------------------------------------------------------------
    from diffseg.tracking import build_tracker

    tags = [str(cfg.dataset.name), variants[0].method, f"res{resolution}", str(cfg.backbone.name)]
    if random_weights:
        tags.append("random-weights")
    config_dict = _plain(cfg)
    config_dict["random_weights"] = random_weights
    try:
        tracker = build_tracker(
            _plain(cfg.get("logger")),
            run_dir,
            config_dict,
            tags=tags,
            run_id=saved.get("wandb_id"),
            name=_run_name(cfg, resolution),
        )
    except ValueError as err:
        raise ConfigError(str(err)) from err
    try:
        saved["wandb_id"] = tracker.run_id or saved.get("wandb_id")
        # Everything could be loaded: from here on the run dir belongs to this configuration.
        OmegaConf.save(cfg, run_dir / "config_resolved.yaml", resolve=True)
        write_json_atomic(run_dir / "run.json", saved)
        for st in states:
            st.writer = RowWriter(st.variant.out_dir / "per_image.csv", columns)
    except BaseException:
        tracker.finish(exit_code=1)
        raise

    # --- loop --------------------------------------------------------------------------------
    from torch.utils.data import DataLoader, Subset

    todo_idx = [index_of[i] for i in todo]
    loader = DataLoader(
        Subset(dataset, todo_idx),
        batch_size=knobs["batch_size"],
        shuffle=False,
        num_workers=knobs["num_workers"] if len(todo) > 1 else 0,
        pin_memory=device.type == "cuda",
    )
    log_every = int((_plain(cfg.get("logger")) or {}).get("log_every", 25) or 25)
    t_loop = time.perf_counter()
    processed = 0
    exit_code = 1
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    from tqdm import tqdm

    bar = tqdm(
        total=len(todo),
        unit="img",
        desc="DiffSeg",
        dynamic_ncols=True,
        disable=not todo,
        file=sys.stderr,
    )
    try:
        for batch in loader:
            _process_batch(
                batch,
                backbone,
                states,
                device,
                dtype,
                resolution,
                labelled,
                save_predictions,
                num_overlays,
                index_of,
            )
            processed += len(batch["id"])
            bar.update(len(batch["id"]))
            head = states[0]
            if labelled:
                running = head.metrics.compute()
                bar.set_postfix(acc=f"{running['acc']:.1f}", miou=f"{running['miou']:.1f}")
                done_now = resumed + processed
                if processed % log_every < len(batch["id"]) or processed == len(todo):
                    elapsed = time.perf_counter() - t_loop
                    metrics = {"images": done_now, "images_per_s": processed / max(elapsed, 1e-9)}
                    for st in states:
                        m = st.metrics.compute()
                        prefix = f"{st.variant.name}/" if st.variant.name else ""
                        metrics[f"{prefix}acc"] = m["acc"]
                        metrics[f"{prefix}miou"] = m["miou"]
                    tracker.log_metrics(metrics, step=done_now)
            if on_batch is not None:
                on_batch(processed)
        exit_code = 0
    finally:
        bar.close()
        for st in states:
            if st.writer is not None:
                st.writer.close()
        if exit_code:
            tracker.finish(exit_code=exit_code)
    loop_time = time.perf_counter() - t_loop

    try:
        # --- results -----------------------------------------------------------------------------
        common = {
            "dataset": {
                "name": str(cfg.dataset.name),
                **{
                    k: v
                    for k, v in (getattr(dataset, "describe", dict)() or {}).items()
                    if k != "name"
                },
                "curated": getattr(dataset, "curated", None),
            },
            "resolution": resolution,
            "backbone": {
                "name": str(cfg.backbone.name),
                "path": cfg.backbone.get("path"),
                "random_config": cfg.backbone.get("random_config"),
                "timestep": cfg.backbone.get("timestep"),
                "model": getattr(backbone, "name", None),
            },
            "random_weights": random_weights,
        }
        if random_weights:
            common = {"WARNING": RANDOM_WARNING, **common}
        timing = {
            "device": str(device),
            "dtype": str(dtype).replace("torch.", ""),
            "batch_size": knobs["batch_size"],
            "seed": knobs["seed"],
            "limit": knobs["limit"],
            "images_expected": len(ids),
            "images_this_session": processed,
            "images_resumed": resumed,
            "wall_time_s": round(time.perf_counter() - t_start, 3),
            "loop_time_s": round(loop_time, 3),
            "images_per_s": round(processed / loop_time, 4)
            if processed and loop_time > 0
            else None,
            "peak_memory": _peak_memory(device),
            "versions": _versions(),
            "run_dir": str(run_dir),
            "finished": _now(),
        }
        all_results: dict[str, dict[str, Any]] = {}
        for st in states:
            v = st.variant
            res: dict[str, Any] = dict(common)
            res["method"] = v.describe()
            if hasattr(v.segmentor, "describe"):
                res["segmentor"] = v.segmentor.describe()
            res["setting"] = v.name
            res["sweep_overrides"] = v.overrides or None
            if labelled:
                m = st.metrics.compute()
                res.update(
                    acc=m["acc"],
                    miou=m["miou"],
                    num_images=m["num_images"],
                    classes_counted=m["classes_counted"],
                    pixels=m["pixels"],
                    iou_per_class=dict(zip(dataset.class_names, m["iou_per_class"], strict=True)),
                    tp=m["tp"],
                    fp=m["fp"],
                    fn=m["fn"],
                    complete=m["num_images"] == len(ids),
                )
            else:
                res.update(
                    num_images=len(ids),
                    acc=None,
                    miou=None,
                    complete=True,
                    predictions=str(v.out_dir / "predictions"),
                )
            res["overlays"] = [str(p) for p in sorted((v.out_dir / "overlays").glob("**/*.png"))]
            res.update(timing)
            # this setting's images taken over from an earlier session of the run dir
            res["images_resumed"] = st.resumed
            write_json_atomic(v.out_dir / "results.json", res)
            all_results[v.name or ""] = res
        if len(states) > 1:
            write_json_atomic(
                run_dir / "sweep_results.json",
                {
                    **({"WARNING": RANDOM_WARNING} if random_weights else {}),
                    "settings": [
                        {
                            "setting": name,
                            "acc": r["acc"],
                            "miou": r["miou"],
                            "num_images": r["num_images"],
                            "method": r["method"],
                        }
                        for name, r in all_results.items()
                    ],
                },
            )

        # --- tracker summary and the screen summary -----------------------------------------------
        summary: dict[str, Any] = {
            "random_weights": random_weights,
            "images_per_s": timing["images_per_s"],
        }
        for name, r in all_results.items():
            prefix = f"{name}/" if name else ""
            summary[f"{prefix}acc"] = r["acc"]
            summary[f"{prefix}miou"] = r["miou"]
            summary[f"{prefix}num_images"] = r["num_images"]
            if labelled:
                tracker.log_class_table(
                    f"{prefix}iou_per_class",
                    list(r["iou_per_class"]),
                    list(r["iou_per_class"].values()),
                )
            tracker.log_images(f"{prefix}overlays", r["overlays"][:16])
        tracker.log_summary(summary)
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    tracker.finish(exit_code=0)
    print_summary(cfg, all_results, timing, random_weights, run_dir, labelled)
    return {"run_dir": str(run_dir), "random_weights": random_weights, "results": all_results}


def _process_batch(
    batch,
    backbone,
    states,
    device,
    dtype,
    resolution,
    labelled,
    save_predictions,
    num_overlays,
    index_of,
) -> None:
    """One attention pass for the batch, then every setting segments, scores and saves it."""
    from diffseg.overlay import save_overlay, save_segments_png

    ids: list[str] = list(batch["id"])
    images = batch["image"].to(device=device, dtype=dtype, non_blocking=True)
    with torch.inference_mode():
        maps = backbone.attention_maps(images)
    labels = batch["label"] if labelled else None
    for st in states:
        pending = [k for k, i in enumerate(ids) if i not in st.done]
        if not pending:
            continue
        # After a resume, a setting may already have some of the batch: segment only the rest.
        todo_maps = maps
        if len(pending) < len(ids):
            index = torch.tensor(pending, device=images.device)
            todo_maps = {r: m.index_select(0, index) for r, m in maps.items()}
        todo_labels = labels[pending] if labelled else None
        seg = st.variant.segmentor
        kwargs: dict[str, Any] = {}
        if getattr(seg, "needs_num_classes", False):
            kwargs["num_clusters"] = _num_classes_per_image(todo_labels)
        with torch.inference_mode():
            preds = seg.segment(todo_maps, output_size=resolution, **kwargs).cpu()
        records = st.metrics.update(preds, todo_labels) if labelled else None
        out_dir = st.variant.out_dir
        for j, k in enumerate(pending):
            image_id = ids[k]
            if save_predictions:
                save_segments_png(out_dir / "predictions" / f"{image_id}.png", preds[j])
            if index_of[image_id] < num_overlays:
                save_overlay(
                    out_dir / "overlays" / f"{image_id}.png",
                    batch["image"][k],
                    preds[j],
                    todo_labels[j] if labelled else None,
                )
            rec = (
                {"id": image_id, **records[j]}
                if labelled
                else {"id": image_id, "num_segments": int(torch.unique(preds[j]).numel())}
            )
            st.writer.write(rec)
            st.done.add(image_id)
        st.writer.sync()


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _run_name(cfg: DictConfig, resolution: int) -> str:
    return f"{cfg.dataset.name}-{cfg.method.name}-{resolution}-{cfg.backbone.name}"


def _loud_warning() -> None:
    bar = "!" * 78
    for line in (bar, "!!! " + RANDOM_WARNING, bar):
        log.warning(line)


def print_summary(
    cfg: DictConfig,
    results: Mapping[str, Mapping[str, Any]],
    timing: Mapping[str, Any],
    random_weights: bool,
    run_dir: Path,
    labelled: bool,
) -> None:
    """The one-screen summary at the end of a run (stdout and the log)."""
    first = next(iter(results.values()))
    ds = first["dataset"]
    rule = "=" * 72
    lines = [rule, "DiffSeg run summary", rule]
    if random_weights:
        lines += ["!!! " + RANDOM_WARNING, ""]
    lines.append(
        f"dataset   {ds['name']} ({ds.get('split') or '-'}"
        + (", curated" if ds.get("curated") else "")
        + f"), {timing['images_expected']} images, evaluated at {first['resolution']}x{first['resolution']}"
    )
    bb = first["backbone"]
    lines.append(
        f"backbone  {bb['name']} ({bb.get('path') or bb.get('random_config')}), "
        f"{timing['dtype']} on {timing['device']}"
    )
    params = {k: v for k, v in first["method"].items() if k != "name"}
    lines.append(
        f"method    {first['method']['name']} "
        + " ".join(f"{k}={_fmt_value(v)}" for k, v in params.items())
    )
    lines.append("-" * 72)
    if labelled:
        lines.append(f"{'setting':<40} {'images':>8} {'ACC':>8} {'mIoU':>8}")
        for name, r in results.items():
            flag = "" if r.get("complete") else " (partial)"
            lines.append(
                f"{(name or cfg.method.name) + flag:<40} {r['num_images']:>8} "
                f"{_pct(r['acc']):>8} {_pct(r['miou']):>8}"
            )
    else:
        lines.append(
            f"segmented {timing['images_expected']} images (no labels, no metric); "
            f"label PNGs in {first.get('predictions')}"
        )
    lines.append("-" * 72)
    rate = timing["images_per_s"]
    mem = timing["peak_memory"]
    lines.append(
        f"time      {timing['wall_time_s']:.1f} s, {timing['images_this_session']} images this "
        f"session"
        + (f" ({rate:.2f} img/s)" if rate else "")
        + (f", {timing['images_resumed']} resumed" if timing["images_resumed"] else "")
    )
    lines.append(
        f"memory    peak RSS {mem['cpu_rss_mb']:.0f} MiB"
        + (f", peak CUDA {mem['cuda_mb']:.0f} MiB" if mem.get("cuda_mb") is not None else "")
    )
    lines.append(f"outputs   {run_dir}")
    lines.append(rule)
    text = "\n".join(lines) + "\n"
    print(text, end="", flush=True)
    (run_dir / "summary.txt").write_text(text, encoding="utf-8")


def _pct(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def main(cfg: DictConfig) -> float | None:
    """Entry point for ``run.py`` (inside ``@hydra.main``): runs in Hydra's output dir, turns
    user errors into one line on stderr and exit status 2, Ctrl-C into a resume hint (130).

    Returns the first setting's mIoU (for Hydra sweepers), None without labels.
    """
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        out = run(cfg, run_dir)
    except RunError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.debug("run failed: %s", err)
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(
            f"\nInterrupted. Finished images are saved in {run_dir}; run the same command with "
            f"hydra.run.dir={run_dir} to continue.",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(130) from None
    first = next(iter(out["results"].values()))
    miou = first.get("miou")
    return None if miou is None else float(miou)


def iter_results(paths: Iterable[str | os.PathLike]) -> Iterable[Path]:
    """Every ``results.json`` under the given files/folders (recursively), sorted."""
    for p in paths:
        p = Path(p)
        if p.is_file() and p.name == "results.json":
            yield p
        elif p.is_dir():
            yield from sorted(p.rglob("results.json"))
