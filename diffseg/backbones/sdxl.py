"""The SDXL family (SDXL base, SSD-1B, Segmind-Vega): two text encoders, attention on two grids.

At 1024 px the latent is 128 x 128 and the UNet has attention on its two coarser levels only
(64 and 32 tokens per side). Conditioning is what ``StableDiffusionXLPipeline`` builds: the
penultimate hidden states of both text encoders concatenated (2048 channels for SDXL), the pooled
embedding of the second, and the six ``add_time_ids`` (original size, crop corner, target size).
The pipeline's own ``encode_prompt`` and ``_get_add_time_ids`` do it; nothing is rewritten here.
The VAE runs in float32 by default: SDXL's VAE overflows in float16.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import Tensor

from .base import DEFAULT_TIMESTEP, DiffusionBackbone
from .configs import model_configs, tiny_clip_tokenizer
from .sd import load_scheduler
from .weights import load_vae_unet, loading, move_modules, resolve_weights

__all__ = ["SDXLBackbone"]

log = logging.getLogger(__name__)


class SDXLBackbone(DiffusionBackbone):
    """An SDXL-family model as a feature extractor.

    Args:
        vae, unet: the diffusers modules (the UNet has ``addition_embed_type="text_time"``).
        text_encoder: ``CLIPTextModel`` (CLIP ViT-L); text_encoder_2: ``CLIPTextModelWithProjection``
            (OpenCLIP bigG; its projection is the pooled embedding). Kept in float32.
        tokenizer, tokenizer_2: their tokenizers.
        timestep: the default timestep.
        **kwargs: see :class:`diffseg.backbones.base.DiffusionBackbone`.
    """

    family = "sdxl"

    def __init__(
        self,
        vae: torch.nn.Module,
        unet: torch.nn.Module,
        text_encoder: torch.nn.Module,
        text_encoder_2: torch.nn.Module,
        tokenizer,
        tokenizer_2,
        timestep: int = DEFAULT_TIMESTEP,
        **kwargs: Any,
    ) -> None:
        if getattr(unet.config, "addition_embed_type", None) != "text_time":
            raise ValueError(
                "an SDXL-family UNet has addition_embed_type='text_time'; got "
                f"{getattr(unet.config, 'addition_embed_type', None)!r} (an SD 1.x/2.x model? use "
                "StableDiffusionBackbone)"
            )
        width = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
        if unet.config.cross_attention_dim != width:
            raise ValueError(
                f"unet.cross_attention_dim={unet.config.cross_attention_dim} != {width}, the two "
                "text encoders' hidden sizes together"
            )
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        super().__init__(vae, unet, timestep=timestep, **kwargs)
        self._pipeline = None

    def _modules(self, vae, unet) -> list[torch.nn.Module]:
        return [vae, unet, self.text_encoder, self.text_encoder_2]

    # ---------------------------------------------------------------- builders

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str | os.PathLike = "segmind/SSD-1B",
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        timestep: int = DEFAULT_TIMESTEP,
        vae_dtype: torch.dtype | None = torch.float32,
        **kwargs: Any,
    ) -> SDXLBackbone:
        """Load an SDXL-family model (``stabilityai/stable-diffusion-xl-base-1.0``,
        ``segmind/SSD-1B``, ``segmind/Segmind-Vega``) from the hub or a local folder in the
        diffusers layout. ``dtype`` is the UNet's precision; the VAE stays float32 unless
        ``vae_dtype`` says otherwise. Raises :class:`WeightsNotFoundError` before loading anything
        when the weights can't be had."""
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        source, local_only = resolve_weights(model_id_or_path, "sdxl")
        vae_dtype = vae_dtype or dtype
        log.info("loading SDXL-family weights from %s", source)
        common = {"local_files_only": local_only}
        with loading(source, "sdxl"):
            vae, unet = load_vae_unet(source, local_only, dtype, vae_dtype, device)
            te1 = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **common)
            te2 = CLIPTextModelWithProjection.from_pretrained(
                source, subfolder="text_encoder_2", **common
            )
            tok1 = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common)
            tok2 = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **common)
        move_modules(te1, te2, device=device, dtype=torch.float32)
        kwargs.setdefault("scheduler", load_scheduler(source, local_only))
        backbone = cls(vae, unet, te1, te2, tok1, tok2, timestep, name=str(source), **kwargs)
        backbone.model_id = str(model_id_or_path)
        return backbone

    @classmethod
    def from_config(
        cls,
        name: str = "tiny_sdxl",
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        seed: int = 0,
        timestep: int = DEFAULT_TIMESTEP,
        vae_dtype: torch.dtype | None = torch.float32,
        **kwargs: Any,
    ) -> SDXLBackbone:
        """Build an SDXL-family architecture with RANDOM weights, no download: ``"sdxl"`` (the
        real SDXL base shapes, for compute benchmarks) or ``"tiny_sdxl"`` (a few channels, the
        same levels and grids: tests)."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        configs = model_configs(name)
        if "text_encoder_2" not in configs:
            raise ValueError(f"{name!r} is an SD 1.x/2.x config; use StableDiffusionBackbone")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = UNet2DConditionModel(**configs["unet"])
            vae = AutoencoderKL(**configs["vae"])
            te1 = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
            te2 = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))
        move_modules(unet, device=device, dtype=dtype)
        move_modules(vae, device=device, dtype=vae_dtype or dtype)
        move_modules(te1, te2, device=device, dtype=torch.float32)
        tok = tiny_clip_tokenizer()
        return cls(
            vae,
            unet,
            te1,
            te2,
            tok,
            tok,
            timestep,
            name=f"{name} (RANDOM WEIGHTS)",
            is_random=True,
            **kwargs,
        )

    # ---------------------------------------------------------------- conditioning

    @property
    def pipeline(self):
        """A diffusers ``StableDiffusionXLPipeline`` over this backbone's modules (built once)."""
        if self._pipeline is None:
            from diffusers import StableDiffusionXLPipeline

            self._pipeline = StableDiffusionXLPipeline(
                vae=self.vae,
                text_encoder=self.text_encoder,
                text_encoder_2=self.text_encoder_2,
                tokenizer=self.tokenizer,
                tokenizer_2=self.tokenizer_2,
                unet=self.unet,
                scheduler=self.scheduler,
                add_watermarker=False,
            )
        return self._pipeline

    @torch.inference_mode()
    def prompt_conditioning(self, prompt: str = "") -> tuple[Tensor, Tensor, Tensor]:
        """``(prompt_embeds (1, 77, D), pooled (1, P), add_time_ids (1, 6))`` in the UNet's dtype,
        from the pipeline's ``encode_prompt`` and ``_get_add_time_ids`` for a square image of the
        native size, no crop: time ids ``(S, S, 0, 0, S, S)``. Cached per (prompt, device, dtype)."""
        key = (prompt, str(self.device), self.dtype)
        if key not in self._conditioning_cache:
            pipe = self.pipeline
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompt,
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
            )
            size = (self.image_size, self.image_size)
            time_ids = pipe._get_add_time_ids(
                size,
                (0, 0),
                size,
                dtype=self.dtype,
                text_encoder_projection_dim=self.text_encoder_2.config.projection_dim,
            ).to(self.device)
            self._conditioning_cache[key] = (
                embeds.to(self.dtype),
                pooled.to(self.dtype),
                time_ids,
            )
        return self._conditioning_cache[key]

    def conditioning(self, batch: int, prompt: str = "") -> dict[str, Any]:
        embeds, pooled, time_ids = self.prompt_conditioning(prompt)
        return {
            "encoder_hidden_states": embeds.expand(batch, -1, -1),
            "added_cond_kwargs": {
                "text_embeds": pooled.expand(batch, -1),
                "time_ids": time_ids.expand(batch, -1),
            },
        }
