"""Diffusion backbones by family, and a registry of named builders.

::

    from diffseg.backbones import build_backbone
    backbone = build_backbone("ssd1b", device="cuda", dtype=torch.float16)   # hub weights
    backbone = build_backbone("tiny_sdxl")                                   # random, offline

Every name of :data:`BACKBONES` builds the same way; ``path=`` points a name at a local folder
(or another hub id) of the same family. Families: :class:`StableDiffusionBackbone` (SD 1.x/2.x)
and :class:`SDXLBackbone` (SDXL, SSD-1B, Vega). Adding a model of a known family is one entry
here and one file in ``configs/backbone/``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from .base import DEFAULT_TIMESTEP, DiffusionBackbone, validate_images
from .configs import config_family, config_names, model_configs, tiny_clip_tokenizer
from .mmdit import FluxBackbone, MMDiTBackbone, SD3Backbone
from .sd import DEFAULT_MODEL_ID, StableDiffusionBackbone
from .sdxl import SDXLBackbone
from .weights import WeightsNotFoundError, resolve_weights

__all__ = [
    "BACKBONES",
    "DEFAULT_MODEL_ID",
    "DEFAULT_TIMESTEP",
    "BackboneSpec",
    "DiffusionBackbone",
    "FluxBackbone",
    "MMDiTBackbone",
    "SD3Backbone",
    "SDXLBackbone",
    "StableDiffusionBackbone",
    "WeightsNotFoundError",
    "build_backbone",
    "config_names",
    "model_configs",
    "resolve_weights",
    "tiny_clip_tokenizer",
    "validate_images",
]


@dataclass(frozen=True)
class BackboneSpec:
    """A named backbone: its family, where its weights come from, and its native input side."""

    family: str  # "sd", "sdxl" (UNets), "sd3" or "flux" (MM-DiTs)
    model_id: str | None  # hub id; None for random weights
    image_size: int
    random_config: str | None = None  # a config of diffseg.backbones.configs (random weights)
    note: str = ""


#: The registered backbones (``backbone=<name>`` on the command line).
BACKBONES: dict[str, BackboneSpec] = {
    "sd14": BackboneSpec("sd", "CompVis/stable-diffusion-v1-4", 512, note="DiffSeg's backbone"),
    "sd15": BackboneSpec("sd", "stable-diffusion-v1-5/stable-diffusion-v1-5", 512),
    "sd21base": BackboneSpec("sd", "stabilityai/stable-diffusion-2-1-base", 512),
    "sd21": BackboneSpec("sd", "stabilityai/stable-diffusion-2-1", 768),
    "sdxl": BackboneSpec("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", 1024),
    "ssd1b": BackboneSpec("sdxl", "segmind/SSD-1B", 1024, note="DiffCut's backbone"),
    "vega": BackboneSpec("sdxl", "segmind/Segmind-Vega", 1024),
    "tiny": BackboneSpec("sd", None, 512, "tiny", "random weights: tests and smoke runs"),
    "tiny_sdxl": BackboneSpec("sdxl", None, 1024, "tiny_sdxl", "random weights: tests"),
    "sd14_random": BackboneSpec("sd", None, 512, "sd14", "random weights: compute benchmarks"),
    "sdxl_random": BackboneSpec("sdxl", None, 1024, "sdxl", "random weights: compute benchmarks"),
    # MM-DiTs (transformer backbones; Seg4Diff's family)
    "sd3": BackboneSpec(
        "sd3", "stabilityai/stable-diffusion-3-medium-diffusers", 1024, note="Seg4Diff's backbone"
    ),
    "sd35": BackboneSpec("sd3", "stabilityai/stable-diffusion-3.5-medium", 1024),
    "flux": BackboneSpec("flux", "black-forest-labs/FLUX.1-dev", 1024),
    "flux_schnell": BackboneSpec("flux", "black-forest-labs/FLUX.1-schnell", 1024),
    "tiny_sd3": BackboneSpec("sd3", None, 1024, "tiny_sd3", "random weights: tests"),
    "tiny_sd35": BackboneSpec("sd3", None, 1024, "tiny_sd35", "random weights: tests"),
    "tiny_flux": BackboneSpec("flux", None, 1024, "tiny_flux", "random weights: tests"),
    "sd3_random": BackboneSpec("sd3", None, 1024, "sd3", "random weights: compute benchmarks"),
    "flux_random": BackboneSpec("flux", None, 1024, "flux", "random weights: compute benchmarks"),
}

_FAMILIES = {
    "sd": StableDiffusionBackbone,
    "sdxl": SDXLBackbone,
    "sd3": SD3Backbone,
    "flux": FluxBackbone,
}


def build_backbone(
    name: str,
    path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype | None = None,
    attention_dtype: torch.dtype = torch.float32,
    timestep: int = DEFAULT_TIMESTEP,
    seed: int = 0,
    random_config: str | None = None,
    **kwargs: Any,
) -> DiffusionBackbone:
    """Build a registered backbone.

    Args:
        name: a key of :data:`BACKBONES`.
        path: a local folder or hub id to load instead of the registered id (same family).
        device: where the modules go.
        dtype: the UNet's precision; ``vae_dtype`` the VAE's (None: ``dtype`` for SD 1.x/2.x,
            float32 for the SDXL family, whose VAE overflows in float16); ``attention_dtype``
            the captured attention probabilities' (float32).
        timestep: the default timestep of feature requests that do not name one.
        seed: the seed of random weights (random configs only).
        random_config: build this architecture with random weights instead (overrides the
            registry's choice; e.g. ``random_config=sd14`` for compute measurements).

    Raises:
        ValueError: an unknown name. WeightsNotFoundError: weights that cannot be had.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    spec = BACKBONES[name]
    random_config = random_config or (None if path else spec.random_config)
    family = config_family(random_config) if random_config else spec.family
    cls = _FAMILIES[family]
    if vae_dtype is None and family == "sdxl":
        vae_dtype = torch.float32
    common = dict(dtype=dtype, device=device, timestep=timestep, vae_dtype=vae_dtype)
    kwargs["attention_dtype"] = attention_dtype
    if random_config:
        return cls.from_config(random_config, seed=seed, **common, **kwargs)
    source = path or spec.model_id
    if source is None:
        raise ValueError(f"backbone {name} has no weights to load; give backbone.path")
    return cls.from_pretrained(source, **common, **kwargs)
