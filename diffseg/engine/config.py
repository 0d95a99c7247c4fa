"""Top-level run options: checked once, before anything is loaded, into plain values."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ..errors import ConfigError
from ..precision import DTYPES, resolve_device, resolve_dtype

__all__ = ["DTYPES", "RunOptions", "check_config", "plain", "resolve_device", "resolve_dtype"]

log = logging.getLogger(__name__)

#: Evaluation sizes accepted (pixels per side of labels and predictions).
RESOLUTION_RANGE = (32, 2048)


def plain(cfg: Any) -> Any:
    """A DictConfig/ListConfig (or anything) as resolved plain Python."""
    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


@dataclass(frozen=True)
class RunOptions:
    """The run's top-level options, checked and resolved (configs/config.yaml documents each)."""

    resolution: int
    device: torch.device
    dtype: torch.dtype
    vae_dtype: torch.dtype | None
    attention_dtype: torch.dtype
    image_size: int | None
    batch_size: int
    limit: int | None
    num_workers: int
    num_overlays: int
    seed: int
    save_predictions: bool
    overlap: bool
    num_shards: int = 1
    shard_index: int = 0
    matching: str = "image"
    background_merge: bool = True


def _int_knob(cfg: DictConfig, key: str, minimum: int, allow_none: bool = False) -> int | None:
    value = cfg.get(key)
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        want = f"an integer >= {minimum}" + (" or null" if allow_none else "")
        raise ConfigError(f"{key}={value!r} is invalid; it must be {want}")
    return value


def _overlap(value: Any, device: torch.device) -> bool:
    """Score on a background thread while the device works: null = on for CUDA devices."""
    if value is None:
        return device.type == "cuda"
    if not isinstance(value, bool):
        raise ConfigError(f"overlap={value!r} is invalid; use true, false or null (auto)")
    return value


def _image_size(value: Any) -> int | None:
    """The model input side: None = the backbone's native size; else a multiple of 64."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 64 or value % 64:
        raise ConfigError(
            f"image_size={value!r} is invalid; it is the model's input side in pixels, a "
            "multiple of 64 (null = the backbone's native size)"
        )
    return value


def check_config(cfg: DictConfig) -> RunOptions:
    """Validate the top-level options; returns them resolved (device, dtypes, ints)."""
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
            f"resolution={resolution!r} is invalid; it is the evaluation size in pixels (labels "
            f"and predictions), an integer in [{lo}, {hi}] (each protocol sets its own: configs/protocol/)"
        )
    device = resolve_device(cfg.get("device", "auto"))
    dtype = resolve_dtype(cfg.get("dtype", "float32"), device)
    precision = cfg.get("precision") or {}
    vae = precision.get("vae")
    return RunOptions(
        **{
            "resolution": resolution,
            "device": device,
            "dtype": dtype,
            "vae_dtype": None if vae is None else resolve_dtype(vae, device),
            "attention_dtype": resolve_dtype(precision.get("attention") or "float32", device),
            "image_size": _image_size(cfg.get("image_size")),
            "batch_size": _int_knob(cfg, "batch_size", 1),
            "limit": _int_knob(cfg, "limit", 1, allow_none=True),
            "num_workers": _int_knob(cfg, "num_workers", 0),
            "num_overlays": _int_knob(cfg, "num_overlays", 0),
            "seed": _int_knob(cfg, "seed", 0),
            "save_predictions": bool(cfg.get("save_predictions", False)),
            "overlap": _overlap(cfg.get("overlap"), device),
            "num_shards": _int_knob(cfg, "num_shards", 1) if "num_shards" in cfg else 1,
            "shard_index": _int_knob(cfg, "shard_index", 0) if "shard_index" in cfg else 0,
            "matching": _matching((cfg.get("eval") or {}).get("matching", "image")),
            "background_merge": _background_merge(cfg.get("eval") or {}),
        }
    )


def _background_merge(eval_cfg: Any) -> bool:
    """``eval.background_merge`` (each protocol sets it; true when absent)."""
    value = eval_cfg.get("background_merge", True)
    if not isinstance(value, bool):
        raise ConfigError(f"eval.background_merge={value!r} is invalid; use true or false")
    return value


def _matching(value: Any) -> str:
    """``eval.matching``: image (the default) or row (Seg4Diff's released evaluator)."""
    from eval.metrics import MATCHINGS

    if value not in MATCHINGS:
        raise ConfigError(
            f"eval.matching={value!r} is invalid; use image (per-image Hungarian matching) or "
            "row (each pixel row on its own, as Seg4Diff's released evaluator)"
        )
    return value
