"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, attention on four token grids.

Three ways to build one::

    StableDiffusionBackbone.from_pretrained("CompVis/stable-diffusion-v1-4")  # real weights
    StableDiffusionBackbone.from_config("sd14")   # the real architecture, RANDOM weights
    StableDiffusionBackbone.from_config("tiny")   # a few channels, same token grids, RANDOM

then ``maps = backbone.attention_maps(images)`` with images ``(B, 3, 512, 512)`` in [-1, 1]
(DiffSeg's input: one pass at t = 300, the empty prompt, no noise), or
``backbone.extract(images, request)`` for any :class:`diffseg.features.FeatureRequest`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import Tensor

from .base import DEFAULT_TIMESTEP, DiffusionBackbone, default_scheduler
from .configs import model_configs, tiny_clip_tokenizer
from .weights import load_vae_unet, loading, move_modules, resolve_weights

__all__ = ["DEFAULT_MODEL_ID", "StableDiffusionBackbone"]

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "CompVis/stable-diffusion-v1-4"


def load_scheduler(source: str, local_only: bool):
    """The model folder's own noise schedule (only ``add_noise`` is used), or the default one
    when the folder has no ``scheduler/`` config."""
    from diffusers import DDPMScheduler

    try:
        return DDPMScheduler.from_pretrained(
            source, subfolder="scheduler", local_files_only=local_only
        )
    except (OSError, ValueError):
        log.info("%s has no scheduler config; using SD's scaled-linear schedule", source)
        return default_scheduler()


class StableDiffusionBackbone(DiffusionBackbone):
    """SD 1.x / 2.x as a feature extractor.

    Args:
        vae: a diffusers ``AutoencoderKL`` (8x downsampling, 4 latent channels).
        unet: a diffusers ``UNet2DConditionModel``.
        text_encoder: a transformers ``CLIPTextModel`` (its last hidden state conditions the
            UNet); kept in float32 (it runs once per prompt).
        tokenizer: the matching ``CLIPTokenizer``.
        timestep: the default timestep (300 as in DiffSeg).
        **kwargs: see :class:`diffseg.backbones.base.DiffusionBackbone`.
    """

    family = "sd"

    def __init__(
        self,
        vae: torch.nn.Module,
        unet: torch.nn.Module,
        text_encoder: torch.nn.Module,
        tokenizer,
        timestep: int = DEFAULT_TIMESTEP,
        **kwargs: Any,
    ) -> None:
        if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
            raise ValueError(
                f"unet.cross_attention_dim={unet.config.cross_attention_dim} != "
                f"text_encoder.hidden_size={text_encoder.config.hidden_size}"
            )
        devices = {p.device for m in (vae, unet, text_encoder) for p in m.parameters()}
        if len(devices) != 1:
            raise ValueError(f"vae, unet and text_encoder must be on one device; got {devices}")
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        text_encoder.eval().requires_grad_(False)
        super().__init__(vae, unet, timestep=timestep, **kwargs)
        self._pipeline = None

    # ---------------------------------------------------------------- builders

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str | os.PathLike = DEFAULT_MODEL_ID,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        timestep: int = DEFAULT_TIMESTEP,
        vae_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> StableDiffusionBackbone:
        """Load ``vae/``, ``unet/``, ``text_encoder/``, ``tokenizer/`` (and ``scheduler/``) from a
        hub id (default ``CompVis/stable-diffusion-v1-4``; SD 1.5 and 2.x ids work too) or a local
        folder in the diffusers layout. ``dtype`` is the UNet's precision, ``vae_dtype`` the VAE's
        (default: ``dtype``).

        Raises :class:`WeightsNotFoundError` (a ``FileNotFoundError``) before loading anything when
        the weights can't be had, naming the id and how to fix it. ``kwargs`` go to the constructor.
        """
        from transformers import CLIPTextModel, CLIPTokenizer

        source, local_only = resolve_weights(model_id_or_path, "sd")
        vae_dtype = vae_dtype or dtype
        log.info("loading Stable Diffusion weights from %s", source)
        with loading(source, "sd"):
            vae, unet = load_vae_unet(source, local_only, dtype, vae_dtype, device)
            common = {"local_files_only": local_only}
            text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **common)
            tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common)
        move_modules(text_encoder, device=device, dtype=torch.float32)
        kwargs.setdefault("scheduler", load_scheduler(source, local_only))
        backbone = cls(vae, unet, text_encoder, tokenizer, timestep, name=str(source), **kwargs)
        backbone.model_id = str(model_id_or_path)
        return backbone

    @classmethod
    def from_config(
        cls,
        name: str = "sd14",
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        seed: int = 0,
        timestep: int = DEFAULT_TIMESTEP,
        vae_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> StableDiffusionBackbone:
        """Build a named architecture with RANDOM weights, no download.

        ``"sd14"``: the real SD v1.4 UNet, VAE and CLIP ViT-L/14 text encoder (compute and memory
        benchmarks). ``"tiny"``: a few channels, the same block layout, so 512 px images give the
        64/32/16/8 token grids and 16 self-attention layers (5/5/5/1) of SD v1 (tests and smoke
        runs). The tokenizer is :func:`tiny_clip_tokenizer` (it encodes the empty prompt with the
        real ids). Weights come from ``seed`` without touching the global RNG.
        """
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        configs = model_configs(name)
        if "text_encoder_2" in configs:
            raise ValueError(f"{name!r} is an SDXL-family config; use SDXLBackbone.from_config")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = UNet2DConditionModel(**configs["unet"])
            vae = AutoencoderKL(**configs["vae"])
            text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
        move_modules(unet, device=device, dtype=dtype)
        move_modules(vae, device=device, dtype=vae_dtype or dtype)
        move_modules(text_encoder, device=device, dtype=torch.float32)
        return cls(
            vae,
            unet,
            text_encoder,
            tiny_clip_tokenizer(),
            timestep,
            name=f"{name} (RANDOM WEIGHTS)",
            is_random=True,
            **kwargs,
        )

    # ---------------------------------------------------------------- conditioning

    def _modules(self, vae, unet) -> list[torch.nn.Module]:
        return [vae, unet, self.text_encoder]

    @property
    def pipeline(self):
        """A diffusers ``StableDiffusionPipeline`` over this backbone's modules (built once, no
        copies), whose ``encode_prompt`` builds the conditioning."""
        if self._pipeline is None:
            from diffusers import StableDiffusionPipeline

            self._pipeline = StableDiffusionPipeline(
                vae=self.vae,
                text_encoder=self.text_encoder,
                tokenizer=self.tokenizer,
                unet=self.unet,
                scheduler=self.scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        return self._pipeline

    @torch.inference_mode()
    def prompt_embedding(self, prompt: str = "") -> Tensor:
        """The text encoder's last hidden state for ``prompt``: ``(1, 77, D)`` in the UNet's dtype.

        The empty prompt is BOS (49406) then EOS (49407) x 76 with SD v1's tokenizer. Built with the
        pipeline's ``encode_prompt`` once per (prompt, device, dtype) and cached.
        """
        key = (prompt, str(self.device), self.dtype)
        if key not in self._conditioning_cache:
            embeds, _ = self.pipeline.encode_prompt(
                prompt, self.device, 1, do_classifier_free_guidance=False
            )
            self._conditioning_cache[key] = embeds.to(dtype=self.dtype)
        return self._conditioning_cache[key]

    def conditioning(self, batch: int, prompt: str = "") -> dict[str, Any]:
        return {"encoder_hidden_states": self.prompt_embedding(prompt).expand(batch, -1, -1)}
