"""SeeDiff: one Stable Diffusion generation -> an image and the binary mask of its class.

The denoising loop is diffusers' own ``StableDiffusionPipeline``; SeeDiff asks for the attention
it needs as a :class:`~diffseg.features.TrajectoryRequest` (served by :mod:`diffseg.attention`,
the capture code evaluation uses) for the call, then turns the recorded attention into a mask
(:mod:`diffseg.methods.seediff.algorithm`)::

    from diffseg.methods.seediff import SeeDiff
    seediff = SeeDiff()                                     # the released demo's constants
    image, mask, info = seediff.generate(pipe, "dog", seed=200000)
    # image: uint8 (512, 512, 3) RGB; mask: bool (512, 512); info: prompt, seed, area, ...
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...attention import TRAJECTORY_CHUNK_ELEMENTS as DEFAULT_CHUNK_ELEMENTS
from ...features import TrajectoryRequest
from ..base import GenerationMethod, ParameterError, check_int, check_number
from .algorithm import FLAT_LAYER_WEIGHT, VARIANCE_FLOOR, refine_mask
from .algorithm import soft_mask as _soft_mask
from .tokens import MULTI_TOKEN_RULES, class_token_positions, format_prompt

__all__ = [
    "CROSS_LAYERS",
    "SD_SCHEDULER_CONFIG",
    "SELF_LAYERS",
    "SeeDiff",
    "as_pipeline",
    "sd_scheduler",
    "trajectory_request",
]

_BLOCK = "transformer_blocks.0"
#: The class token's cross-attention layers at 16x16 (SD v1, 512 px), in SeeDiff's order.
CROSS_LAYERS = (
    f"up_blocks.1.attentions.0.{_BLOCK}.attn2",
    f"up_blocks.1.attentions.1.{_BLOCK}.attn2",
    f"up_blocks.1.attentions.2.{_BLOCK}.attn2",
    f"down_blocks.2.attentions.0.{_BLOCK}.attn2",
    f"down_blocks.2.attentions.1.{_BLOCK}.attn2",
)
#: The one self-attention layer per grid whose probabilities are the descriptor (grid at 512 px).
SELF_LAYERS = {
    16: f"up_blocks.1.attentions.0.{_BLOCK}.attn1",
    32: f"up_blocks.2.attentions.0.{_BLOCK}.attn1",
    64: f"up_blocks.3.attentions.0.{_BLOCK}.attn1",
}

#: SD v1.4's scheduler (scheduler/scheduler_config.json on the hub): PNDM, PLMS steps only.
SD_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "skip_prk_steps": True,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def sd_scheduler():
    """A fresh ``PNDMScheduler`` configured as SD v1.4's."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(**SD_SCHEDULER_CONFIG)


def as_pipeline(model) -> Any:
    """A ``StableDiffusionPipeline`` from a pipeline (returned as is) or from anything holding
    ``vae``, ``unet``, ``text_encoder`` and ``tokenizer`` (e.g. a
    :class:`~diffseg.backbones.StableDiffusionBackbone`), with SD v1.4's PNDM scheduler and no
    safety checker (the release runs none)."""
    from diffusers import StableDiffusionPipeline

    if isinstance(model, StableDiffusionPipeline):
        return model
    parts = ("vae", "unet", "text_encoder", "tokenizer")
    if not all(hasattr(model, p) for p in parts):
        raise TypeError(
            f"expected a StableDiffusionPipeline or an object with {', '.join(parts)}; "
            f"got {type(model).__name__}"
        )
    pipe = StableDiffusionPipeline(
        vae=model.vae,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        unet=model.unet,
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class SeeDiff(GenerationMethod):
    """SeeDiff's generation settings; every default is the released demo's.

    Args:
        threshold: on the soft mask before refinement (0.3).
        refine: PAMR refinement (the demo) or not (the batch script: ``soft > unrefined_threshold``).
        refine_threshold: on the min-max normalised PAMR output (0.8).
        unrefined_threshold: on the soft mask when ``refine`` is False (0.5).
        pamr_iterations, pamr_sigma: PAMR's iterations (5000) and sigma factor (0.2).
        prompt_template: with a ``{class}`` placeholder ("A photo of a {class}"; the batch script
            uses "A long shot of a {class}").
        num_inference_steps, guidance_scale: the pipeline's steps (50) and CFG scale (7).
        multi_token: which sub-tokens of a split class name are recorded, see
            :mod:`diffseg.methods.seediff.tokens` ("all", "first", "last").
        image_size: side of the generated image (512; the recorded grids are size / 32, / 16, / 8).
        variance_floor, flat_weight: the flat-layer rule of the seed map (1e-4, 0.01).
        chunk_elements: bound on the float32 attention scores held at once while recording.
    """

    threshold: float = 0.3
    refine: bool = True
    refine_threshold: float = 0.8
    unrefined_threshold: float = 0.5
    pamr_iterations: int = 5000
    pamr_sigma: float = 0.2
    prompt_template: str = "A photo of a {class}"
    num_inference_steps: int = 50
    guidance_scale: float = 7.0
    multi_token: str = "all"
    image_size: int = 512
    variance_floor: float = VARIANCE_FLOOR
    flat_weight: float = FLAT_LAYER_WEIGHT
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
    _pipelines: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    name = "seediff"
    backbone_families = ("sd",)

    def __post_init__(self) -> None:
        """Every parameter checked: :class:`~diffseg.methods.base.ParameterError` naming it."""
        for key in ("threshold", "refine_threshold", "unrefined_threshold"):
            check_number(key, getattr(self, key), 0, 1, hi_open=True)
        if not isinstance(self.refine, bool):
            raise ParameterError(f"refine={self.refine!r} is invalid: it must be true or false")
        check_int("num_inference_steps", self.num_inference_steps, lo=1)
        check_int("pamr_iterations", self.pamr_iterations, lo=0)
        check_number("pamr_sigma", self.pamr_sigma, 0, lo_open=True)
        check_number("guidance_scale", self.guidance_scale)
        if check_int("image_size", self.image_size, lo=64) % 64:
            raise ParameterError(
                f"image_size={self.image_size!r} is invalid: it must be a multiple of 64"
            )
        if self.multi_token not in MULTI_TOKEN_RULES:
            raise ParameterError(
                f"multi_token={self.multi_token!r} is invalid: it must be one of "
                f"{', '.join(MULTI_TOKEN_RULES)}"
            )
        check_number("variance_floor", self.variance_floor, lo=0)
        check_number("flat_weight", self.flat_weight, lo=0)
        check_int("chunk_elements", self.chunk_elements, lo=1)
        format_prompt(self.prompt_template, "x")  # raises without the {class} placeholder

    def settings(self) -> dict[str, Any]:
        """The settings as a JSON-able dict (written with every generated image)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    # ------------------------------------------------------------------ the mask

    def soft_mask(
        self, cross16: Tensor, self_attention: dict[int, Tensor], size: int = 512
    ) -> Tensor:
        """The soft mask: float32 (size, size) in [0, 1] on the descriptors' device.

        Args:
            cross16: (L, 16, 16) the class token's head-summed, step-averaged cross-attention of
                the recorded layers (``up_blocks[1]`` x3 then ``down_blocks[2]`` x2).
            self_attention: ``{16: (256, 256), 32: (1024, 1024), 64: (4096, 4096)}``
                head-summed descriptors.
        """
        return _soft_mask(cross16, self_attention, size, self.variance_floor, self.flat_weight)

    def mask(self, soft: Tensor, image: Any) -> Tensor:
        """The binary mask: bool (size, size) on the soft mask's device.

        ``refine``: ``soft > threshold``, then PAMR over ``image`` (uint8-valued RGB (H, W, 3),
        numpy or tensor), min-max, ``> refine_threshold``. Otherwise ``soft > unrefined_threshold``.
        """
        if not self.refine:
            return soft > self.unrefined_threshold
        rgb = torch.as_tensor(np.asarray(image) if not isinstance(image, Tensor) else image)
        return refine_mask(
            soft > self.threshold,
            rgb,
            num_iter=self.pamr_iterations,
            sigma_scale=self.pamr_sigma,
            threshold=self.refine_threshold,
        )

    # ------------------------------------------------------------------ generation

    def pipeline(self, model) -> Any:
        """The pipeline for ``model`` (built once per backbone object and cached)."""
        key = id(model)
        if key not in self._pipelines:
            self._pipelines[key] = (model, as_pipeline(model))
        return self._pipelines[key][1]

    def initial_latent(self, pipe, seed: int) -> Tensor:
        """``torch.randn((1, C, size/8, size/8))`` from a CPU generator seeded with ``seed``, in
        float32 (the same draw whatever the model's dtype or device), then moved to the UNet."""
        side = self.image_size // pipe.vae_scale_factor
        generator = torch.Generator().manual_seed(int(seed))
        latent = torch.randn((1, pipe.unet.config.in_channels, side, side), generator=generator)
        return latent.to(device=pipe.device, dtype=pipe.unet.dtype)

    def feature_request(self, model, class_name: str) -> TrajectoryRequest:
        """The attention recorded while generating ``class_name``: its token(s)' cross-attention
        and the self-attention descriptors (:func:`trajectory_request`)."""
        pipe = self.pipeline(model)
        positions = class_token_positions(
            pipe.tokenizer, self.prompt_template, class_name, self.multi_token
        )
        guided = pipe_uses_guidance(pipe, self.guidance_scale)
        return trajectory_request(positions, guided, self.chunk_elements)

    def generate(self, model, class_name: str, seed: int) -> tuple[np.ndarray, Tensor, dict]:
        """Generate one image of ``class_name`` and its mask.

        Args:
            model: a ``StableDiffusionPipeline`` or a :class:`~diffseg.backbones.StableDiffusionBackbone`.
            class_name: e.g. "dog", "potted plant".
            seed: seeds the CPU generator of the initial latent.

        Returns:
            ``(image, mask, info)``: uint8 (size, size, 3) RGB numpy; bool (size, size) CPU tensor;
            a JSON-able dict (prompt, seed, token positions and strings, UNet calls, mask area,
            recorded bytes, seconds, random_weights).
        """
        start = time.perf_counter()
        pipe = self.pipeline(model)
        prompt = format_prompt(self.prompt_template, class_name)
        request = self.feature_request(pipe, class_name)
        positions = list(request.cross_attention)
        guided = request.guidance
        with torch.inference_mode():
            # encoded here so a float32 text encoder can drive a float16 UNet
            cond, uncond = pipe.encode_prompt(prompt, pipe.device, 1, guided)
            dtype = pipe.unet.dtype
            cond, uncond = cond.to(dtype), None if uncond is None else uncond.to(dtype)
        capture = request.capture(pipe.unet, "Stable Diffusion v1-shaped (SeeDiff's layers)")
        with torch.inference_mode(), capture as recorder, _embeddings_kept(pipe):
            out = pipe(
                prompt_embeds=cond,
                negative_prompt_embeds=uncond,
                height=self.image_size,
                width=self.image_size,
                num_inference_steps=self.num_inference_steps,
                guidance_scale=self.guidance_scale,
                latents=self.initial_latent(pipe, seed),
                output_type="np",
            )
        # the pipeline's own PIL conversion: round(x * 255)
        image = (out.images[0] * 255).round().astype(np.uint8)
        with torch.inference_mode():
            selfs = {r: m[0] for r, m in recorder.self_maps().items()}
            soft = self.soft_mask(recorder.cross_maps()[0], selfs, size=self.image_size)
            mask = self.mask(soft, torch.from_numpy(image)).cpu()
        info = {
            "class": class_name,
            "prompt": prompt,
            "seed": int(seed),
            "token_positions": positions,
            "tokens": [pipe.tokenizer.decode([i]) for i in _prompt_ids(pipe, prompt, positions)],
            "unet_calls": recorder.num_calls,
            "mask_area": float(mask.float().mean()),
            "recorded_bytes": recorder.nbytes(),
            "seconds": round(time.perf_counter() - start, 3),
            "random_weights": bool(getattr(model, "is_random", False)),
        }
        return image, mask, info


@contextlib.contextmanager
def _embeddings_kept(pipe) -> Iterator[None]:
    """During the pipeline call, hide a text encoder whose dtype is not the UNet's: diffusers
    casts given prompt embeddings to the text encoder's dtype, which would feed float32
    embeddings to a float16 UNet (the backbones keep their text encoders in float32)."""
    encoder = pipe.text_encoder
    if encoder is None or encoder.dtype == pipe.unet.dtype:
        yield
        return
    pipe.text_encoder = None
    try:
        yield
    finally:
        pipe.text_encoder = encoder


def trajectory_request(
    positions: list[int], guidance: bool, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
) -> TrajectoryRequest:
    """SeeDiff's feature request: the class token(s)' cross-attention on :data:`CROSS_LAYERS`
    and the self-attention descriptors of :data:`SELF_LAYERS`, conditional half, every call."""
    return TrajectoryRequest(
        cross_attention=tuple(positions),
        cross_layers=CROSS_LAYERS,
        self_layers=tuple(SELF_LAYERS.values()),
        guidance=guidance,
        chunk_elements=chunk_elements,
    )


def pipe_uses_guidance(pipe, guidance_scale: float) -> bool:
    """Whether diffusers' pipeline batches ``[unconditional, conditional]`` at this scale (its
    ``do_classifier_free_guidance``: scale > 1 and no guidance-embedding UNet)."""
    return guidance_scale > 1 and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None


def _prompt_ids(pipe, prompt: str, positions: list[int]) -> list[int]:
    ids = pipe.tokenizer(prompt, truncation=True).input_ids
    return [ids[p] for p in positions]
