"""MM-DiT backbones: SD3 / SD3.5 (joint blocks) and FLUX (double + single blocks).

A backbone owns diffusers' modules under the pipelines' component names (``transformer``,
``vae``, ``scheduler`` = the model's ``FlowMatchEulerDiscreteScheduler``, ``text_encoder``,
``text_encoder_2``, ``tokenizer``, ``tokenizer_2``; FLUX's T5 is its ``text_encoder_2``) and
serves :class:`diffseg.features.FeatureRequest` s with one transformer pass:

1. latent z = (VAE posterior **mean** - shift_factor) x scaling_factor;
2. the noise level: the ``noise_step``-th timestep from the end of the scheduler's
   ``num_steps``-step schedule (its shift from its own config; FLUX's resolution-dependent shift
   from the image-token count), or an explicit ``timestep`` (sigma = t / 1000);
3. with ``noise_seed`` set: x_t = sigma e + (1 - sigma) z, with e ONE draw from a generator on the
   model's device seeded ``noise_seed``, shared by the batch (rectified flow, not DDPM noising);
4. the prompt's conditioning from the pipeline's own ``encode_prompt`` (SD3: two CLIPs and no T5,
   ``max_sequence_length=77``, so 77 CLIP + 77 zero tokens; FLUX: T5 at 77 tokens + pooled
   CLIP-L);
5. the transformer, with the capture of :mod:`diffseg.backbones.mmdit_capture`, stopped after the
   last block the request needs. It receives the timestep in its own units (SD3: 0..1000, FLUX:
   sigma).

Image tokens form a ``grid x grid`` row-major grid, ``grid = image_size / 16`` (64 at 1024 px).
"""

from __future__ import annotations

import copy
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..features import FeatureRequest, Features
from .base import ModuleProperties, validate_images
from .configs import model_configs, tiny_clip_tokenizer
from .mmdit_capture import JointAttentionCapture
from .weights import loading, move_modules, resolve_weights

__all__ = ["FluxBackbone", "MMDiTBackbone", "SD3Backbone", "default_layer", "tiny_t5_tokenizer"]

log = logging.getLogger(__name__)


def default_layer(num_joint_blocks: int) -> int:
    """The documented default block of a model for the new rows: floor(3/8 x its joint (SD3) or
    double (FLUX) block count): 9 on SD3-medium (24), 7 on FLUX (19)."""
    return (3 * int(num_joint_blocks)) // 8


#: Text length of every MM-DiT conditioning here (CLIP's 77; Seg4Diff's ``max_sequence_length``).
MAX_SEQUENCE_LENGTH = 77
_BLOCK_ALIAS = re.compile(r"^block\.(\d+)$")


def tiny_t5_tokenizer():
    """A T5-like fast tokenizer over a few words (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2), appending
    ``</s>`` as T5's does: the empty prompt is ``[1, 0, 0, ...]`` at padding length, as with the
    real tokenizer. Enough for tests, not for real prompts."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({w: 3 + i for i, w in enumerate("a an the cat dog photo of".split())})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
    )


class MMDiTBackbone(ModuleProperties):
    """One MM-DiT pass per image batch, returning the features a request asks for.

    Args:
        transformer, vae, scheduler: the diffusers modules.
        text_encoder, text_encoder_2, tokenizer, tokenizer_2: the text side (see subclasses).
        name: a label for logs and results.
        is_random: random weights (tests, compute benchmarks); logged loudly.
        num_steps, noise_step: the default noise level (``noise_step``-th timestep from the end
            of a ``num_steps`` schedule).
        attention_dtype: precision of captured probabilities (float32).
        layer: the block that methods without their own choice read (the DiffSeg / DiffCut
            rows); None = floor(3/8 x the joint / double block count): 9 on SD3's 24 blocks,
            Seg4Diff's expert block, and 7 on FLUX's 19 double blocks.
    """

    family = "mmdit"
    #: FLUX puts text tokens first in the joint sequence; SD3 puts them last.
    text_first = False
    default_num_steps = 28
    default_noise_step = 8

    def __init__(
        self,
        transformer: torch.nn.Module,
        vae: torch.nn.Module,
        scheduler,
        text_encoder: torch.nn.Module,
        text_encoder_2: torch.nn.Module,
        tokenizer,
        tokenizer_2,
        *,
        name: str | None = None,
        is_random: bool = False,
        attention_dtype: torch.dtype = torch.float32,
        layer: int | None = None,
        timestep: Any = None,  # UNet backbones' knob; MM-DiTs use noise_step (accepted, unused)
        seed: int = 0,  # the run's seed, as for every backbone; MM-DiT noise seeds its requests
    ) -> None:
        self.transformer, self.vae, self.scheduler = transformer, vae, scheduler
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        for module in self._modules():
            module.eval()
            module.requires_grad_(False)
        self.is_random = bool(is_random)
        self.name = name or type(transformer).__name__
        if self.is_random and "RANDOM" not in self.name:
            self.name = f"{self.name} (RANDOM WEIGHTS)"
        self.attention_dtype = attention_dtype
        self.model_id: str | None = None
        self.check_inputs = True
        self._pipeline = None
        self._conditioning_cache: dict[tuple, Any] = {}
        joint = len(self.transformer.transformer_blocks)
        self.default_layer = default_layer(joint) if layer is None else int(layer)
        if not 0 <= self.default_layer < self.num_blocks:
            raise ValueError(
                f"layer={layer} does not exist: the model has {self.num_blocks} blocks"
            )
        if self.is_random:
            log.warning(
                "!!! backbone %s has RANDOM WEIGHTS: its features and any segmentation from them "
                "are meaningless (compute/plumbing checks only) !!!",
                self.name,
            )

    def _modules(self) -> list[torch.nn.Module]:
        return [self.transformer, self.vae, self.text_encoder, self.text_encoder_2]

    #: The diffusers pipeline class over these modules, and its component names.
    pipeline_class: str = ""
    components: tuple[str, ...] = (
        "transformer", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2",
        "tokenizer_2",
    )  # fmt: skip

    @property
    def pipeline(self):
        """The model's diffusers pipeline over these modules (built once; its
        ``encode_prompt`` makes the conditioning)."""
        if self._pipeline is None:
            import diffusers

            cls = getattr(diffusers, self.pipeline_class)
            self._pipeline = cls(**{name: getattr(self, name) for name in self.components})
        return self._pipeline

    # ---------------------------------------------------------------- properties (and those of
    # ModuleProperties: device, dtype, vae_dtype, vae_scale_factor)

    @property
    def denoiser(self) -> torch.nn.Module:
        """The transformer."""
        return self.transformer

    @property
    def patch_size(self) -> int:
        """Latent cells per image token and side (2 for both: SD3 patches, FLUX 2x2 packing)."""
        return 2

    @property
    def image_size(self) -> int:
        """The native input side (1024 for every supported model)."""
        return int(self.vae.config.sample_size)

    def grid_of(self, image_size: int | None = None) -> int:
        """Image tokens per side for square inputs of ``image_size`` (64 at 1024 px)."""
        return (image_size or self.image_size) // (self.vae_scale_factor * self.patch_size)

    @property
    def blocks(self) -> list[torch.nn.Module]:
        """Every block in execution order (global block numbers index this list)."""
        return list(self.transformer.transformer_blocks)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def describe(self) -> dict[str, Any]:
        """JSON-able summary for logs and results."""
        return {
            "name": self.name,
            "family": self.family,
            "model_id": self.model_id,
            "is_random": self.is_random,
            "image_size": self.image_size,
            "num_blocks": self.num_blocks,
            "default_layer": self.default_layer,
            "schedule": {
                "num_steps": self.default_num_steps,
                "noise_step": self.default_noise_step,
                "shift": float(self.scheduler.config.get("shift", 1.0)),
            },
            "precision": {
                "transformer": str(self.dtype).replace("torch.", ""),
                "vae": str(self.vae_dtype).replace("torch.", ""),
                "attention": str(self.attention_dtype).replace("torch.", ""),
            },
            "device": str(self.device),
            "grids": [self.grid_of()],
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, device={self.device}, dtype={self.dtype})"
        )

    # ---------------------------------------------------------------- noise level

    def _set_schedule(self, scheduler, num_steps: int, image_size: int) -> None:
        scheduler.set_timesteps(num_steps, device="cpu")

    def noise_level(
        self, num_steps: int | None = None, noise_step: int | None = None, image_size: int = 0
    ) -> tuple[float, float]:
        """``(sigma, timestep)`` of the ``noise_step``-th timestep from the end of the scheduler's
        ``num_steps`` schedule (defaults: the backbone's), from a copy of the scheduler. SD3 at
        28 / 8: index 20, sigma 0.5150721, t 515.0721."""
        num_steps = int(num_steps or self.default_num_steps)
        noise_step = int(noise_step or self.default_noise_step)
        if not 1 <= noise_step <= num_steps:
            raise ValueError(f"noise_step must be in [1, {num_steps}], got {noise_step}")
        scheduler = copy.deepcopy(self.scheduler)
        self._set_schedule(scheduler, num_steps, image_size or self.image_size)
        index = num_steps - noise_step
        return float(scheduler.sigmas[index]), float(scheduler.timesteps[index])

    def _request_level(self, request: FeatureRequest, image_size: int) -> tuple[float, float]:
        if request.timestep is not None:
            t = float(request.timestep)
            return t / float(self.scheduler.config.num_train_timesteps), t
        return self.noise_level(request.num_steps, request.noise_step, image_size)

    # ---------------------------------------------------------------- computation

    @torch.inference_mode()
    def encode(self, images: Tensor) -> Tensor:
        """``(mean - shift_factor) x scaling_factor`` of the VAE posterior: ``(B, 16, S/8, S/8)``
        float32 on the backbone's device. ``images`` ``(B, 3, S, S)`` in [-1, 1]."""
        if self.check_inputs:
            validate_images(images)
        posterior = self.vae.encode(images.to(device=self.device, dtype=self.vae_dtype))
        latent = posterior.latent_dist.mean.float()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latent - shift) * self.vae.config.scaling_factor

    def add_noise(self, latent: Tensor, sigma: float, seed: int) -> Tensor:
        """x_t = sigma e + (1 - sigma) z, e ONE float32 draw ``(1, C, h, w)`` from a generator on
        the model's device seeded ``seed``, shared by the batch."""
        generator = torch.Generator(device=self.device).manual_seed(int(seed))
        noise = torch.randn(
            (1, *latent.shape[1:]), generator=generator, device=self.device, dtype=torch.float32
        )
        return sigma * noise + (1.0 - sigma) * latent.float()

    def conditioning(self, batch: int, prompt: str = "") -> dict[str, Any]:
        """The transformer's text keyword arguments for ``prompt``, expanded to ``batch``."""
        raise NotImplementedError

    def transformer_inputs(self, x_t: Tensor, timestep: float) -> dict[str, Any]:
        """The transformer's image and timestep keyword arguments (its own units)."""
        raise NotImplementedError

    def block_index(self, name: str) -> int:
        """The global block number of a module request: ``"block.9"``, ``"transformer_blocks.9"``
        or (FLUX) ``"single_transformer_blocks.3"``."""
        match = _BLOCK_ALIAS.match(name)
        if match:
            index = int(match.group(1))
        else:
            module = None
            try:
                module = self.transformer.get_submodule(name)
            except AttributeError:
                pass
            index = next((i for i, b in enumerate(self.blocks) if b is module), -1)
        if not 0 <= index < self.num_blocks:
            raise ValueError(
                f"{self.name} has no block {name!r}; blocks are block.0 .. "
                f"block.{self.num_blocks - 1}"
            )
        return index

    def _capture_for(self, request: FeatureRequest) -> JointAttentionCapture:
        if request.self_attention is not None or request.cross_attention:
            raise ValueError(
                f"{self.name} is an MM-DiT: it has joint attention, not UNet self/cross-attention "
                "(request joint_blocks / joint_tokens / joint_image instead)"
            )
        for b in request.joint_blocks:
            if not 0 <= b < self.num_blocks:
                raise ValueError(
                    f"{self.name} has no block {b}; its blocks are 0 .. {self.num_blocks - 1}"
                )
        if request.joint_tokens and max(request.joint_tokens) >= MAX_SEQUENCE_LENGTH:
            raise ValueError(f"joint_tokens must be < {MAX_SEQUENCE_LENGTH} (the text length)")
        outputs = {alias: self.block_index(alias) for alias in request.modules}
        return JointAttentionCapture(
            self.blocks,
            request.joint_blocks,
            request.joint_tokens,
            request.joint_image,
            outputs,
            text_first=self.text_first,
            text_len=MAX_SEQUENCE_LENGTH,
        )

    def check_request(self, request: FeatureRequest, image_size: int | None = None) -> None:
        """Raise ``ValueError`` unless this backbone can serve ``request``."""
        self._capture_for(request)
        size = image_size or self.image_size
        if size % (self.vae_scale_factor * self.patch_size * 4):
            raise ValueError(
                f"{self.name} needs an image side that is a multiple of 64; got {size}"
            )

    @torch.inference_mode()
    def extract(self, images: Tensor, request: FeatureRequest) -> Features:
        """One transformer pass over ``images`` ``(B, 3, S, S)`` in [-1, 1] serving ``request``.

        Returns a :class:`Features` with ``joint_text`` ``{block: (B, grid**2, T)}``,
        ``joint_image`` ``{block: (B, grid**2, grid**2)}`` and ``modules`` ``{alias: (B,
        grid**2, C)}`` (image tokens of a block's output), all float32, plus the noise level.
        """
        capture = self._capture_for(request)
        latent = self.encode(images)
        sigma, t = self._request_level(request, images.shape[-1])
        if request.noise_seed is not None:
            latent = self.add_noise(latent, sigma, request.noise_seed)
        batch = latent.shape[0]
        kwargs = self.transformer_inputs(latent.to(self.dtype), t)
        kwargs.update(self.conditioning(batch, request.prompt))
        with capture.installed():
            capture.run(self.transformer, **kwargs, return_dict=False)
        store = capture.store
        cast = self.attention_dtype
        return Features(
            modules=store.outputs,
            images=images,
            timestep=t,
            noise_seed=request.noise_seed,
            prompt=request.prompt,
            layers={"modules": {a: f"block.{b}" for a, b in capture.outputs.items()}},
            joint_text={b: v.to(cast) for b, v in store.text.items()},
            joint_image={b: v.to(cast) for b, v in store.image.items()},
            joint_tokens=request.joint_tokens,
            sigma=sigma,
        )


def _overridden_configs(
    name: str, overrides: Mapping[str, Mapping[str, Any]] | None
) -> dict[str, Any]:
    """The per-part configs of ``name`` with ``overrides`` (``{part: {key: value}}``) applied,
    e.g. ``{"transformer": {"num_layers": 2}}``: a truncated block stack of the real shapes."""
    configs = model_configs(name)
    parts = sorted(k for k, v in configs.items() if isinstance(v, dict))
    for part, values in (overrides or {}).items():
        if part not in parts:
            raise ValueError(f"config_overrides: {name!r} has no part {part!r}; its parts: {parts}")
        configs[part] = {**configs[part], **values}
    return configs


def _random_modules(name: str, seed: int, overrides: Mapping[str, Mapping[str, Any]] | None = None):
    """Random-weight transformer, VAE and scheduler of a named config (no download), with
    ``overrides`` applied to its parts (see :func:`_overridden_configs`)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
    )

    configs = _overridden_configs(name, overrides)
    family = configs["family"]
    cls = SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = cls(**configs["transformer"])
        vae = AutoencoderKL(**configs["vae"])
        encoders = _random_text_encoders(configs)
    scheduler = FlowMatchEulerDiscreteScheduler(**configs["scheduler"])
    return configs, transformer, vae, scheduler, encoders


def _random_text_encoders(configs: dict[str, Any]):
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    if configs["family"] == "sd3":
        return (
            CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder"])),
            CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"])),
        )
    return (
        CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
        T5EncoderModel(T5Config(**configs["text_encoder_2"])),
    )


class SD3Backbone(MMDiTBackbone):
    """SD3-medium / SD3.5: joint blocks, image tokens then 77 CLIP + 77 zero-T5 text tokens.

    T5 is not loaded (``text_encoder_3=None``): the pipeline fills its slot with zeros, 77 tokens
    long (``max_sequence_length=77``, as Seg4Diff). CLIP encoders stay float32.
    """

    family = "sd3"
    text_first = False
    text_encoder_3 = None
    tokenizer_3 = None
    pipeline_class = "StableDiffusion3Pipeline"  # without T5: text_encoder_3 stays None
    components = (*MMDiTBackbone.components, "text_encoder_3", "tokenizer_3")

    @torch.inference_mode()
    def prompt_conditioning(self, prompt: str = "") -> tuple[Tensor, Tensor]:
        """``(prompt_embeds (1, 154, joint_dim), pooled (1, P))`` from the pipeline's
        ``encode_prompt`` with ``max_sequence_length=77``, in the transformer's dtype (cached)."""
        key = (prompt, str(self.device), self.dtype)
        if key not in self._conditioning_cache:
            embeds, _, pooled, _ = self.pipeline.encode_prompt(
                prompt=prompt,
                prompt_2=None,
                prompt_3=None,
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
                max_sequence_length=MAX_SEQUENCE_LENGTH,
            )
            self._conditioning_cache[key] = (embeds.to(self.dtype), pooled.to(self.dtype))
        return self._conditioning_cache[key]

    def conditioning(self, batch: int, prompt: str = "") -> dict[str, Any]:
        embeds, pooled = self.prompt_conditioning(prompt)
        return {
            "encoder_hidden_states": embeds.expand(batch, -1, -1),
            "pooled_projections": pooled.expand(batch, -1),
        }

    def transformer_inputs(self, x_t: Tensor, timestep: float) -> dict[str, Any]:
        t = torch.full((x_t.shape[0],), timestep, device=x_t.device, dtype=torch.float32)
        return {"hidden_states": x_t, "timestep": t}

    @classmethod
    def from_config(
        cls,
        name: str = "tiny_sd3",
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        seed: int = 0,
        vae_dtype: torch.dtype | None = None,
        config_overrides: Mapping[str, Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> SD3Backbone:
        """An SD3-layout model with RANDOM weights: ``tiny_sd3``, ``tiny_sd35`` (tests) or
        ``sd3`` (the real shapes: compute benchmarks). ``config_overrides`` changes parts of the
        named config, e.g. ``{"transformer": {"num_layers": 10}}`` (a truncated stack)."""
        _, transformer, vae, scheduler, (te1, te2) = _random_modules(name, seed, config_overrides)
        move_modules(transformer, device=device, dtype=dtype)
        move_modules(vae, device=device, dtype=vae_dtype or dtype)
        move_modules(te1, te2, device=device, dtype=torch.float32)
        tok = tiny_clip_tokenizer()
        return cls(transformer, vae, scheduler, te1, te2, tok, tok,
                   name=f"{name} (RANDOM WEIGHTS)", is_random=True, **kwargs)  # fmt: skip

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str | os.PathLike = "stabilityai/stable-diffusion-3-medium-diffusers",
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        vae_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> SD3Backbone:
        """Load SD3 / SD3.5 without T5 from the hub or a local folder in the diffusers layout.
        Raises :class:`WeightsNotFoundError` before loading anything when the weights can't be
        had."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        source, local_only = resolve_weights(model_id_or_path, "sd3")
        common = {"local_files_only": local_only}
        log.info("loading SD3-family weights (no T5) from %s", source)
        with loading(source, "sd3"):
            transformer = SD3Transformer2DModel.from_pretrained(
                source, subfolder="transformer", torch_dtype=dtype, **common
            )
            vae = AutoencoderKL.from_pretrained(
                source, subfolder="vae", torch_dtype=vae_dtype or dtype, **common
            )
            scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
                source, subfolder="scheduler", **common
            )
            te1 = CLIPTextModelWithProjection.from_pretrained(
                source, subfolder="text_encoder", **common
            )
            te2 = CLIPTextModelWithProjection.from_pretrained(
                source, subfolder="text_encoder_2", **common
            )
            tok1 = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common)
            tok2 = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **common)
        move_modules(transformer, device=device, dtype=dtype)
        move_modules(vae, device=device, dtype=vae_dtype or dtype)
        move_modules(te1, te2, device=device, dtype=torch.float32)
        backbone = cls(transformer, vae, scheduler, te1, te2, tok1, tok2, name=str(source),
                       **kwargs)  # fmt: skip
        backbone.model_id = str(model_id_or_path)
        return backbone


class FluxBackbone(MMDiTBackbone):
    """FLUX.1 (dev / schnell): 77 T5 tokens first, then the 2x2-packed image tokens; double
    blocks ``0 .. n-1``, then single blocks numbered ``n ...`` (the release's numbering).

    The schedule is FLUX's: ``num_steps`` sigmas linspace(1, 1/num_steps), shifted by mu from the
    image-token count (4096 at 1024 px; the release's mu from 16 is a bug, not reproduced). The
    transformer gets sigma as its timestep and, for guidance-distilled models (dev), guidance
    3.5. T5 runs in the transformer's precision, CLIP-L in float32.
    """

    family = "flux"
    text_first = True
    pipeline_class = "FluxPipeline"
    default_num_steps = 50
    guidance_scale = 3.5

    @property
    def blocks(self) -> list[torch.nn.Module]:
        return list(self.transformer.transformer_blocks) + list(
            self.transformer.single_transformer_blocks
        )

    @property
    def num_double_blocks(self) -> int:
        return len(self.transformer.transformer_blocks)

    def _set_schedule(self, scheduler, num_steps: int, image_size: int) -> None:
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        cfg = scheduler.config
        mu = calculate_shift(
            self.grid_of(image_size) ** 2,
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        scheduler.set_timesteps(sigmas=sigmas, mu=mu, device="cpu")

    @torch.inference_mode()
    def prompt_conditioning(self, prompt: str = "") -> tuple[Tensor, Tensor, Tensor]:
        """``(T5 embeds (1, 77, D), pooled CLIP-L (1, 768), txt_ids (77, 3))`` (cached)."""
        key = (prompt, str(self.device), self.dtype)
        if key not in self._conditioning_cache:
            embeds, pooled, text_ids = self.pipeline.encode_prompt(
                prompt=prompt,
                prompt_2=None,
                device=self.device,
                num_images_per_prompt=1,
                max_sequence_length=MAX_SEQUENCE_LENGTH,
            )
            self._conditioning_cache[key] = (
                embeds.to(self.dtype),
                pooled.to(self.dtype),
                text_ids.to(self.dtype),
            )
        return self._conditioning_cache[key]

    def conditioning(self, batch: int, prompt: str = "") -> dict[str, Any]:
        embeds, pooled, text_ids = self.prompt_conditioning(prompt)
        return {
            "encoder_hidden_states": embeds.expand(batch, -1, -1),
            "pooled_projections": pooled.expand(batch, -1),
            "txt_ids": text_ids,
        }

    def transformer_inputs(self, x_t: Tensor, timestep: float) -> dict[str, Any]:
        from diffusers import FluxPipeline

        b, c, h, w = x_t.shape
        packed = FluxPipeline._pack_latents(x_t, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x_t.device, x_t.dtype)
        # the pipeline passes timestep / 1000 (sigma); the model scales it back itself
        out = {
            "hidden_states": packed,
            "timestep": torch.full((b,), timestep / 1000.0, device=x_t.device, dtype=x_t.dtype),
            "img_ids": img_ids,
        }
        if self.transformer.config.guidance_embeds:
            out["guidance"] = torch.full((b,), self.guidance_scale, device=x_t.device,
                                         dtype=torch.float32)  # fmt: skip
        return out

    @classmethod
    def from_config(
        cls,
        name: str = "tiny_flux",
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        seed: int = 0,
        vae_dtype: torch.dtype | None = None,
        config_overrides: Mapping[str, Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> FluxBackbone:
        """A FLUX-layout model with RANDOM weights: ``tiny_flux`` (tests) or ``flux`` (the real
        shapes: compute benchmarks). ``config_overrides`` changes parts of the named config, e.g.
        ``{"transformer": {"num_layers": 2, "num_single_layers": 1}}`` (a truncated stack)."""
        _, transformer, vae, scheduler, (te1, te2) = _random_modules(name, seed, config_overrides)
        move_modules(transformer, te2, device=device, dtype=dtype)
        move_modules(vae, device=device, dtype=vae_dtype or dtype)
        move_modules(te1, device=device, dtype=torch.float32)
        return cls(transformer, vae, scheduler, te1, te2, tiny_clip_tokenizer(),
                   tiny_t5_tokenizer(), name=f"{name} (RANDOM WEIGHTS)", is_random=True,
                   **kwargs)  # fmt: skip

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str | os.PathLike = "black-forest-labs/FLUX.1-dev",
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
        vae_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> FluxBackbone:
        """Load FLUX.1 from the hub or a local folder in the diffusers layout."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

        source, local_only = resolve_weights(model_id_or_path, "flux")
        common = {"local_files_only": local_only}
        log.info("loading FLUX weights from %s", source)
        with loading(source, "flux"):
            transformer = FluxTransformer2DModel.from_pretrained(
                source, subfolder="transformer", torch_dtype=dtype, **common
            )
            vae = AutoencoderKL.from_pretrained(
                source, subfolder="vae", torch_dtype=vae_dtype or dtype, **common
            )
            scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
                source, subfolder="scheduler", **common
            )
            te1 = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **common)
            te2 = T5EncoderModel.from_pretrained(
                source, subfolder="text_encoder_2", torch_dtype=dtype, **common
            )
            tok1 = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common)
            # the folder's own tokenizer class (T5TokenizerFast on the hub)
            tok2 = AutoTokenizer.from_pretrained(source, subfolder="tokenizer_2", **common)
        move_modules(transformer, te2, device=device, dtype=dtype)
        move_modules(vae, device=device, dtype=vae_dtype or dtype)
        move_modules(te1, device=device, dtype=torch.float32)
        backbone = cls(transformer, vae, scheduler, te1, te2, tok1, tok2, name=str(source),
                       **kwargs)  # fmt: skip
        backbone.model_id = str(model_id_or_path)
        return backbone
