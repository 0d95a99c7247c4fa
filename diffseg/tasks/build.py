"""Building a run's dataset and backbone from their configs (``_target_`` + arguments)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..engine.config import RunOptions
from ..errors import ConfigError, DataError, RunError

__all__ = [
    "build_backbone_from_config",
    "build_dataset_from_config",
    "backbone_family",
    "is_random_config",
    "native_image_size",
]

#: Keys of a dataset config that describe the benchmark rather than build the loader.
DATASET_META_KEYS = ("name",)
#: Keys of a backbone config that describe it rather than build it.
BACKBONE_META_KEYS = ("image_size",)


def _instantiate(cfg: dict[str, Any], **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` with the cause of a failure unwrapped."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(cfg, _convert_="all", **kwargs)
    except InstantiationException as err:
        raise (err.__cause__ or err) from None


def native_image_size(bb_cfg: dict[str, Any]) -> int:
    """The model input side of a backbone config, from the registry (no weights loaded)."""
    from ..backbones import BACKBONES
    from ..backbones.configs import model_configs

    if bb_cfg.get("random_config"):
        configs = model_configs(bb_cfg["random_config"])
        if "transformer" in configs:  # MM-DiTs: the VAE's native side
            return int(configs["vae"]["sample_size"])
        return int(configs["unet"]["sample_size"]) * 8
    name = bb_cfg.get("name")
    if name not in BACKBONES:
        raise ConfigError(f"backbone.name={name!r} is unknown; registered: {', '.join(BACKBONES)}")
    return int(bb_cfg.get("image_size") or BACKBONES[name].image_size)


def backbone_family(bb_cfg: dict[str, Any]) -> str:
    """The family of a backbone config (``sd``, ``sdxl``, ...), from the registry."""
    from ..backbones import BACKBONES
    from ..backbones.configs import config_family

    if bb_cfg.get("random_config"):
        return str(config_family(bb_cfg["random_config"]))
    spec = BACKBONES.get(bb_cfg.get("name"))
    return "" if spec is None else str(spec.family)


def is_random_config(bb_cfg: dict[str, Any]) -> bool:
    """Whether a backbone config builds random weights (before building it)."""
    from ..backbones import BACKBONES

    spec = BACKBONES.get(bb_cfg.get("name"))
    return bool(
        bb_cfg.get("random_config") or (spec and spec.random_config and not bb_cfg.get("path"))
    )


def build_dataset_from_config(
    ds_cfg: dict[str, Any], image_size: int, resolution: int, preprocessing: str
) -> Any:
    """The dataset of a ``dataset`` config: images at the backbone's input size, labels at the
    evaluation size ``resolution``, preprocessed by the named protocol."""
    cfg = {k: v for k, v in ds_cfg.items() if k not in DATASET_META_KEYS}
    try:
        return _instantiate(
            cfg, image_size=image_size, label_size=resolution, preprocessing=preprocessing
        )
    except RunError:
        raise
    except (FileNotFoundError, NotADirectoryError, ValueError, TypeError) as err:
        kind = DataError if isinstance(err, FileNotFoundError | NotADirectoryError) else ConfigError
        raise kind(f"dataset={ds_cfg.get('name')}: {err}") from err


@dataclass(frozen=True)
class BackboneOptions:
    """Where and in which precision a backbone runs (the part of :class:`RunOptions` a
    backbone needs; the generation task builds one of its own)."""

    device: torch.device
    dtype: torch.dtype
    vae_dtype: torch.dtype | None = None
    attention_dtype: torch.dtype = torch.float32
    seed: int = 0


def build_backbone_from_config(
    bb_cfg: dict[str, Any], options: RunOptions | BackboneOptions
) -> Any:
    """The backbone of a ``backbone`` config, on the run's device and precision."""
    cfg = {k: v for k, v in bb_cfg.items() if k not in BACKBONE_META_KEYS}
    try:
        return _instantiate(
            cfg,
            device=options.device,
            dtype=options.dtype,
            vae_dtype=options.vae_dtype,
            attention_dtype=options.attention_dtype,
            seed=options.seed,
        )
    except (FileNotFoundError, ValueError) as err:
        hint = ""
        if isinstance(err, FileNotFoundError):
            hint = (
                " (For an offline smoke run with random weights: backbone=tiny or tiny_sdxl, "
                "or make demo BACKBONE=tiny.)"
            )
        raise ConfigError(f"backbone={bb_cfg.get('name')}: {err}{hint}") from err
