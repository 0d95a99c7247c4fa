"""What every diffusion backbone does: encode, condition, run one UNet pass, capture features.

A backbone owns the modules of one model (VAE, UNet, text encoder(s), scheduler) and turns images
into :class:`diffseg.features.Features` for a :class:`diffseg.features.FeatureRequest`:

1. latent = VAE posterior **mean** x scaling factor (no sampling), in the VAE's own precision;
2. optionally ``scheduler.add_noise(latent, noise, t)`` with noise from a seeded generator on the
   model's device, one draw shared by the batch;
3. the prompt's conditioning, built by the diffusers pipeline of the family (subclasses);
4. one UNet pass at timestep ``t`` with capture installed; it stops after the last module any
   request needs.

Families subclass it: :class:`diffseg.backbones.sd.StableDiffusionBackbone` (SD 1.x/2.x) and
:class:`diffseg.backbones.sdxl.SDXLBackbone` (SDXL, SSD-1B, Vega).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor

from ..attention import cross_attention_layers, self_attention_layers
from ..features import ALL, LAST_ENCODER_SELF_ATTENTION, FeatureCapture, FeatureRequest, Features

__all__ = [
    "DEFAULT_TIMESTEP",
    "DiffusionBackbone",
    "ModuleProperties",
    "default_scheduler",
    "validate_images",
]

log = logging.getLogger(__name__)

DEFAULT_TIMESTEP = 300
# Slack on the [-1, 1] range check: x / 127.5 - 1 in float16/bfloat16 rounds a little past 1.
RANGE_TOLERANCE = 1e-2


def default_scheduler():
    """The noise schedule every supported model was trained with (scaled-linear betas 0.00085 ->
    0.012 over 1000 steps); only its ``add_noise`` is used. Loaded models use their own
    ``scheduler/`` config when the folder has one."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
    )


def validate_images(images: Any, tolerance: float = RANGE_TOLERANCE) -> None:
    """Raise ``ValueError`` unless ``images`` is a float tensor ``(B, 3, H, W)`` with ``H == W``
    a multiple of 64, finite, in ``[-1, 1]`` (``x / 127.5 - 1`` of 8-bit RGB, within
    ``tolerance``). 512 is what SD v1 and DiffSeg expect; other sizes give other token grids
    (``H/8, H/16, H/32, H/64``)."""
    expected = "expected images of shape (B, 3, S, S), float, values in [-1, 1] (x / 127.5 - 1)"
    if not isinstance(images, Tensor):
        raise ValueError(f"{expected}; got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{expected}; got shape {tuple(images.shape)}")
    b, _, h, w = images.shape
    if b == 0:
        raise ValueError(f"{expected}; got an empty batch, shape {tuple(images.shape)}")
    if h != w or h % 64 != 0:
        raise ValueError(
            f"{expected}; got shape {tuple(images.shape)}: height and width must be equal and a "
            "multiple of 64 (centre-crop and resize first, see diffseg.data.transforms)"
        )
    if not images.is_floating_point():
        raise ValueError(f"{expected}; got dtype {images.dtype} (convert with x / 127.5 - 1)")
    lo, hi = images.amin().item(), images.amax().item()
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{expected}; got non-finite values (NaN or inf)")
    if lo < -1 - tolerance or hi > 1 + tolerance:
        raise ValueError(
            f"{expected}; got values in [{lo:.4g}, {hi:.4g}]"
            + (" (looks like 0..255: use x / 127.5 - 1)" if hi > 2 else "")
            + (" (looks like 0..1: use 2 * x - 1)" if lo >= 0 and hi <= 1 and hi > 0 else "")
        )


# --------------------------------------------------------------------------------------------
# Weights


class ModuleProperties:
    """What every backbone reads off its modules: the device and precision of its denoiser (the
    UNet, or the MM-DiT transformer: :attr:`denoiser`), and its VAE's precision and scale."""

    vae: torch.nn.Module

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network of the denoising pass (subclasses: ``unet`` or ``transformer``)."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        """Device of the denoiser's parameters."""
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Precision of the denoiser's parameters (captured attention has its own)."""
        return next(self.denoiser.parameters()).dtype

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (8 for every supported model)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


class DiffusionBackbone(ModuleProperties):
    """One UNet pass per image batch, returning the features a request asks for.

    Args:
        vae: a diffusers ``AutoencoderKL``.
        unet: a diffusers ``UNet2DConditionModel``.
        scheduler: a diffusers scheduler (for ``add_noise``); None = :func:`default_scheduler`.
        timestep: the timestep of requests that do not name one (DiffSeg: 300).
        name: a label for logs and results; defaults to the UNet's class name.
        is_random: True when the weights are random (compute benchmarks, tests); logged loudly.
        chunk_elements, attention_output: the self-attention capture's settings, see
            :class:`diffseg.attention.SelfAttentionCaptureProcessor`.
        attention_dtype: precision of the captured attention probabilities (float32 by default,
            whatever the UNet's precision).

    Subclasses implement :meth:`conditioning` and set ``family``. Modules are put in eval mode
    with gradients off; device and precision are the caller's (the builders take them).
    """

    family = "base"

    def __init__(
        self,
        vae: torch.nn.Module,
        unet: torch.nn.Module,
        scheduler=None,
        timestep: int = DEFAULT_TIMESTEP,
        *,
        name: str | None = None,
        is_random: bool = False,
        chunk_elements: int | None = None,
        attention_output: str = "probs",
        attention_dtype: torch.dtype = torch.float32,
    ) -> None:
        for module in self._modules(vae, unet):
            module.eval()
            module.requires_grad_(False)
        if unet.config.in_channels != vae.config.latent_channels:
            raise ValueError(
                f"unet.in_channels={unet.config.in_channels} != "
                f"vae.latent_channels={vae.config.latent_channels}"
            )
        if not 0 <= int(timestep) < 1000:
            raise ValueError(f"timestep must be in [0, 1000), got {timestep}")
        if attention_output not in ("probs", "sdpa"):
            raise ValueError(
                f"attention_output must be 'probs' or 'sdpa', got {attention_output!r}"
            )
        self.vae, self.unet = vae, unet
        self.scheduler = scheduler if scheduler is not None else default_scheduler()
        self.timestep = int(timestep)
        self.is_random = bool(is_random)
        self.name = name or type(unet).__name__
        if self.is_random and "RANDOM" not in self.name:
            self.name = f"{self.name} (RANDOM WEIGHTS)"
        self.chunk_elements = chunk_elements
        self.attention_output = attention_output
        self.attention_dtype = attention_dtype
        self.model_id: str | None = None
        #: Check images (shape, range) before encoding; the engine turns it off after the first
        #: batch, since the range check waits for the device.
        self.check_inputs = True
        self.layer_inventory: dict[int, list[str]] = {}
        self._conditioning_cache: dict[tuple, Any] = {}
        if self.is_random:
            log.warning(
                "!!! backbone %s has RANDOM WEIGHTS: its features and any segmentation from them "
                "are meaningless (compute/plumbing checks only) !!!",
                self.name,
            )

    def _modules(self, vae, unet) -> list[torch.nn.Module]:
        return [vae, unet]

    # ---------------------------------------------------------------- properties

    @property
    def denoiser(self) -> torch.nn.Module:
        """The UNet."""
        return self.unet

    @property
    def image_size(self) -> int:
        """The model's native input side: 512 (SD 1.x, 2.1-base), 768 (SD 2.1), 1024 (SDXL)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def _grid_of(self, layer: str, image_size: int) -> int:
        """Token-grid side of a UNet layer for square inputs of ``image_size``.

        ``down_blocks.i`` runs at ``latent / 2**i``, ``mid_block`` at the coarsest level and
        ``up_blocks.j`` at ``latent / 2**(levels - 1 - j)``; strided convolutions round up.
        """
        levels = len(self.unet.down_blocks)
        parts = layer.split(".")
        if parts[0] == "down_blocks":
            level = int(parts[1])
        elif parts[0] == "up_blocks":
            level = levels - 1 - int(parts[1])
        elif parts[0] == "mid_block":
            level = levels - 1
        else:
            raise RuntimeError(f"cannot place layer {layer} in the UNet")
        grid = image_size // self.vae_scale_factor
        for _ in range(level):
            grid = -(-grid // 2)
        return grid

    def expected_layers(self, image_size: int | None = None) -> dict[int, list[str]]:
        """The self-attention layers (processor names) per token-grid side for square images of
        ``image_size`` (default: the native size), largest grid first.

        SD v1 at 512: ``{64: 5 layers, 32: 5, 16: 5, 8: 1}``; SDXL at 1024: ``{64: ..., 32: ...}``.
        """
        size = image_size or self.image_size
        found: dict[int, list[str]] = {}
        for name in self_attention_layers(self.unet):
            found.setdefault(self._grid_of(name, size), []).append(name)
        return {g: found[g] for g in sorted(found, reverse=True)}

    @property
    def grids(self) -> list[int]:
        """Token-grid sides of the self-attention layers at the native size, largest first."""
        return list(self.expected_layers())

    @property
    def resolutions(self) -> list[int]:
        """Former name of :attr:`grids`, kept for scripts written against it."""
        return self.grids

    def resolve_module(self, name: str) -> str:
        """A module name of the UNet for a requested name or alias (raises ``ValueError``)."""
        if name == LAST_ENCODER_SELF_ATTENTION:
            down = [n for n in self_attention_layers(self.unet) if n.startswith("down_blocks.")]
            if not down:
                raise ValueError(f"{self.name} has no self-attention in its down blocks")
            return down[-1].removesuffix(".processor")
        try:
            self.unet.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the UNet of {self.name} has no module {name!r}") from None
        return name

    def describe(self) -> dict[str, Any]:
        """JSON-able summary for logs and results."""
        return {
            "name": self.name,
            "family": self.family,
            "model_id": self.model_id,
            "is_random": self.is_random,
            "timestep": self.timestep,
            "image_size": self.image_size,
            "precision": {
                "unet": str(self.dtype).replace("torch.", ""),
                "vae": str(self.vae_dtype).replace("torch.", ""),
                "attention": str(self.attention_dtype).replace("torch.", ""),
            },
            "device": str(self.device),
            "grids": self.grids,
            "layers_per_grid": {str(g): len(v) for g, v in self.expected_layers().items()},
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, timestep={self.timestep}, "
            f"device={self.device}, dtype={self.dtype})"
        )

    # ---------------------------------------------------------------- computation

    @torch.inference_mode()
    def encode(self, images: Tensor) -> Tensor:
        """VAE latent of ``images``: the posterior **mean** times ``vae.config.scaling_factor``.

        Args:
            images: ``(B, 3, S, S)`` float in [-1, 1], S a multiple of 64, any device.
        Returns:
            ``(B, 4, S/8, S/8)`` in the UNet's dtype on the backbone's device. Deterministic: no
            sampling from the posterior. The VAE runs in its own precision (float32 for the SDXL
            family, whose VAE overflows in float16).
        """
        if self.check_inputs:
            validate_images(images)
        posterior = self.vae.encode(images.to(device=self.device, dtype=self.vae_dtype))
        latent = posterior.latent_dist.mean
        shift = getattr(self.vae.config, "shift_factor", None)
        if shift is not None:
            latent = latent - shift
        return latent * self.vae.config.scaling_factor

    def add_noise(self, latent: Tensor, timestep: int, seed: int) -> Tensor:
        """``scheduler.add_noise(latent, noise, t)`` with ONE noise draw ``(1, C, h, w)`` from a
        generator on the model's device seeded ``seed``, shared by every image of the batch (so
        CPU and CUDA give different noise, as with the release)."""
        generator = torch.Generator(device=self.device).manual_seed(int(seed))
        noise = torch.randn(
            (1, *latent.shape[1:]), generator=generator, device=self.device, dtype=torch.float32
        )
        t = torch.tensor([int(timestep)], device=self.device)
        return self.scheduler.add_noise(latent.float(), noise.expand_as(latent), t)

    def conditioning(self, batch: int, prompt: str = "") -> dict[str, Any]:
        """The UNet's keyword arguments for ``prompt``: ``encoder_hidden_states`` and, for SDXL,
        ``added_cond_kwargs``, each expanded to ``batch``. Subclasses build them with their
        family's diffusers pipeline."""
        raise NotImplementedError

    def _capture_for(self, request: FeatureRequest, image_size: int) -> FeatureCapture:
        if request.joint_blocks:
            raise ValueError(
                f"{self.name} is a UNet: joint attention needs an MM-DiT backbone "
                "(backbone=sd3, sd35, flux, flux_schnell; tiny_sd3 offline)"
            )
        layers = self.expected_layers(image_size)
        if request.self_attention == ALL:
            self_layers = [n for names in layers.values() for n in names]
        elif request.self_attention:
            missing = [g for g in request.self_attention if g not in layers]
            if missing:
                raise ValueError(
                    f"{self.name} has no self-attention on grids {missing} at {image_size} px; "
                    f"its grids: {list(layers)}"
                )
            self_layers = [n for g in request.self_attention for n in layers[g]]
        else:
            self_layers = []
        cross = list(cross_attention_layers(self.unet)) if request.cross_attention else []
        modules = {alias: self.resolve_module(alias) for alias in request.modules}
        return FeatureCapture(
            self.unet,
            self_layers,
            cross,
            request.cross_attention,
            modules,
            chunk_elements=self.chunk_elements,
            output=self.attention_output,
            scores_dtype=self.attention_dtype,
        )

    def check_request(self, request: FeatureRequest, image_size: int | None = None) -> None:
        """Raise ``ValueError`` unless this backbone can serve ``request`` at ``image_size``
        (default: the native size): its modules exist and its self-attention grids are there."""
        self._capture_for(request, image_size or self.image_size)

    @torch.inference_mode()
    def extract(self, images: Tensor, request: FeatureRequest) -> Features:
        """One UNet pass over ``images`` ``(B, 3, S, S)`` in [-1, 1] serving ``request``.

        Returns a :class:`Features` with what the request names (see its attributes for shapes);
        the UNet stops after the last module the request needs.
        """
        latent = self.encode(images)
        t = self.timestep if request.timestep is None else int(request.timestep)
        if request.noise_seed is not None:
            latent = self.add_noise(latent, t, request.noise_seed)
        batch = latent.shape[0]
        timesteps = torch.full((batch,), t, dtype=torch.long, device=latent.device)
        capture = self._capture_for(request, images.shape[-1])
        with capture.installed():
            capture.run(
                latent.to(self.dtype),
                timesteps,
                **self.conditioning(batch, request.prompt),
                return_dict=False,
            )
        inventory = capture.store.layer_inventory
        if request.self_attention == ALL:
            self._log_inventory(inventory)
        return Features(
            self_attention=capture.store.maps(),
            cross_attention=capture.store.cross_maps(),
            tokens=request.cross_attention,
            modules=capture.outputs,
            images=images,
            timestep=t,
            noise_seed=request.noise_seed,
            prompt=request.prompt,
            layers={"self": inventory, "modules": capture.modules},
        )

    def _log_inventory(self, inventory: dict[int, list[str]]) -> None:
        counts = {g: len(v) for g, v in inventory.items()}
        if counts != {g: len(v) for g, v in self.layer_inventory.items()}:
            log.info("%s: self-attention layers captured per token grid: %s", self.name, counts)
        self.layer_inventory = inventory

    def attention_maps(self, images: Tensor) -> dict[int, Tensor]:
        """Self-attention maps of one UNet pass at the backbone's timestep, averaged per grid.

        Args:
            images: ``(B, 3, S, S)`` float in [-1, 1] (512 for SD v1), any device.
        Returns:
            ``{64: (B, 4096, 4096), 32: (B, 1024, 1024), 16: (B, 256, 256), 8: (B, 64, 64)}``
            for SD v1 at 512: float32 on the backbone's device, largest grid first. Entry
            ``[b, q, k]`` is the attention of query token ``q = y*r + x`` to key token ``k``,
            averaged over the grid's layers and their heads; every row sums to 1.
        """
        return self.extract(images, FeatureRequest(self_attention=ALL)).self_attention
