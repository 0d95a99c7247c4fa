"""Stable Diffusion as DiffSeg's feature extractor: one UNet pass, all self-attention captured.

SPEC.md section 2: the latent is the VAE posterior **mean** times the scaling factor (0.18215 for
SD v1), with no sampling and no noise; one UNet pass at timestep 300 with the CLIP embedding of
the empty prompt (BOS then EOS padding to 77 tokens); no guidance, no denoising loop, no decode.
Section 3: the self-attention probabilities of every ``attn1`` layer, averaged per token
resolution over layers and heads (see :mod:`diffseg.attention`).

Three ways to build one::

    StableDiffusionBackbone.from_pretrained("CompVis/stable-diffusion-v1-4")  # real weights
    StableDiffusionBackbone.from_config("sd14")   # the real architecture, RANDOM weights
    StableDiffusionBackbone.from_config("tiny")   # a few channels, same token grids, RANDOM

and then ``maps = backbone.attention_maps(images)`` with images ``(B, 3, 512, 512)`` in [-1, 1].
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .attention import AttentionStore, capture_self_attention, self_attention_layers

__all__ = [
    "DEFAULT_MODEL_ID",
    "DEFAULT_TIMESTEP",
    "StableDiffusionBackbone",
    "WeightsNotFoundError",
    "config_names",
    "model_configs",
    "tiny_clip_tokenizer",
    "validate_images",
]

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "CompVis/stable-diffusion-v1-4"
DEFAULT_TIMESTEP = 300
# Slack on the [-1, 1] range check: x / 127.5 - 1 in float16/bfloat16 rounds a little past 1.
RANGE_TOLERANCE = 1e-2
SUBFOLDERS = ("vae", "unet", "text_encoder", "tokenizer")

# CLIP's special token ids in the real 49408-token vocabulary (openai/clip-vit-large-patch14,
# which SD v1 uses unchanged).
CLIP_BOS_ID = 49406
CLIP_EOS_ID = 49407
CLIP_VOCAB_SIZE = 49408


class WeightsNotFoundError(FileNotFoundError):
    """Stable Diffusion weights cannot be had: missing local folder, offline, gated or unknown id."""


# --------------------------------------------------------------------------------------------
# Architectures written in code (random weights, no download)
# --------------------------------------------------------------------------------------------

_SD_V1_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,  # diffusers' historical name: SD v1 has 8 heads in every layer
}

_SD_V1_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

# CLIP ViT-L/14's text tower as SD v1's text_encoder/config.json gives it (the bos/eos/pad ids
# there are transformers' legacy defaults; the tokenizer's real ids are 49406/49407).
_SD_V1_TEXT = {
    "vocab_size": CLIP_VOCAB_SIZE,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

# Same block layout as SD v1 (4 levels, 2 layers per down block, 3 per up block, 1 mid: 16
# self-attention layers on 64/32/16/8 token grids at 512 px), a few channels, 2 heads (the cost of
# capture grows with heads x tokens^2, and two heads still exercise the head mean).
_TINY_UNET = dict(
    _SD_V1_UNET,
    block_out_channels=(32, 32, 64, 64),
    norm_num_groups=8,
    cross_attention_dim=32,
    attention_head_dim=2,
)
_TINY_VAE = dict(
    _SD_V1_VAE, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4
)
_TINY_TEXT = dict(
    _SD_V1_TEXT,
    hidden_size=32,
    intermediate_size=64,
    projection_dim=32,
    num_hidden_layers=2,
    num_attention_heads=4,
)

_CONFIGS = {
    "sd14": {"unet": _SD_V1_UNET, "vae": _SD_V1_VAE, "text_encoder": _SD_V1_TEXT},
    "tiny": {"unet": _TINY_UNET, "vae": _TINY_VAE, "text_encoder": _TINY_TEXT},
}


def config_names() -> list[str]:
    """Names accepted by :meth:`StableDiffusionBackbone.from_config`."""
    return sorted(_CONFIGS)


def model_configs(name: str) -> dict[str, dict[str, Any]]:
    """The ``unet`` / ``vae`` / ``text_encoder`` configs of a named architecture (copies).

    ``"sd14"`` is the real SD v1.4 (UNet 860M, VAE 84M, CLIP ViT-L/14 text 123M parameters);
    ``"tiny"`` keeps its block layout with a few channels.
    """
    if name not in _CONFIGS:
        raise ValueError(f"unknown backbone config {name!r}; choose one of {config_names()}")
    return {part: dict(cfg) for part, cfg in _CONFIGS[name].items()}


def tiny_clip_tokenizer(directory: str | os.PathLike | None = None):
    """A ``CLIPTokenizer`` over a 40-token vocabulary that keeps CLIP's real special-token ids.

    SD v1's tokenizer turns the empty prompt into ``[49406 (<|startoftext|>), 49407
    (<|endoftext|>) x 76]``: BOS, then EOS, padded with EOS to 77 tokens. This vocabulary maps
    ``<|startoftext|>`` -> 49406 and ``<|endoftext|>`` -> 49407 (and a handful of lowercase
    letters to 0..), so the empty prompt gives exactly the ids the real tokenizer gives, and any
    text encoder with CLIP's 49408-token embedding table accepts them. Other text is tokenised
    letter by letter (unknown characters become ``<|endoftext|>``): enough for tests, not for
    real prompts.

    The vocab.json / merges.txt are written to ``directory`` (a fresh temporary directory by
    default, removed once the tokenizer is loaded).
    """
    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrs"
    vocab = {ch: i for i, ch in enumerate(letters)}
    vocab.update({f"{ch}</w>": len(letters) + i for i, ch in enumerate(letters)})
    vocab["<|startoftext|>"] = CLIP_BOS_ID
    vocab["<|endoftext|>"] = CLIP_EOS_ID

    def write(folder: Path):
        (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        (folder / "tokenizer_config.json").write_text(
            json.dumps({"model_max_length": 77, "pad_token": "<|endoftext|>"}), encoding="utf-8"
        )
        return CLIPTokenizer.from_pretrained(str(folder))

    if directory is not None:
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        return write(folder)
    with tempfile.TemporaryDirectory(prefix="diffseg-tokenizer-") as tmp:
        return write(Path(tmp))


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def validate_images(images: Any, tolerance: float = RANGE_TOLERANCE) -> None:
    """Raise ``ValueError`` unless ``images`` is a float tensor ``(B, 3, H, W)`` with ``H == W``
    a multiple of 64, finite, in ``[-1, 1]`` (``x / 127.5 - 1`` of 8-bit RGB, within
    ``tolerance``). 512 is what SD v1 and DiffSeg expect; other sizes give other token grids
    (``H/8, H/16, H/32, H/64``)."""
    expected = "expected images of shape (B, 3, 512, 512), float, values in [-1, 1] (x / 127.5 - 1)"
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
# --------------------------------------------------------------------------------------------


def _offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", "")
    if value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - very old huggingface_hub
        return False


def _fix_message(model_id: str) -> str:
    return (
        "How to fix: (a) download from the Hugging Face Hub: be online with HF_HUB_OFFLINE unset, "
        f"accept the model's licence at https://huggingface.co/{model_id} and log in with "
        "`huggingface-cli login` (or `hf auth login`); or (b) point at a local copy in the "
        "diffusers layout (a folder with vae/, unet/, text_encoder/ and tokenizer/ subfolders), "
        "e.g. `python run.py backbone.path=/local/folder` or "
        "`StableDiffusionBackbone.from_pretrained('/local/folder')`."
    )


def _looks_like_path(source: str) -> bool:
    return (
        source.startswith(("/", "./", "../", "~", "\\"))
        or os.path.isabs(source)
        or source.count("/") > 1
        or (os.sep != "/" and os.sep in source)
    )


def resolve_weights(model_id_or_path: str | os.PathLike) -> tuple[str, bool]:
    """Check, before any long work, that SD weights can be loaded from ``model_id_or_path``.

    Returns ``(source, local_files_only)`` for the diffusers/transformers loaders. A local folder
    must hold the four subfolders with their configs; a hub id must be reachable (or cached when
    offline). Anything else raises :class:`WeightsNotFoundError` naming the id and the fixes.
    """
    source = os.fspath(model_id_or_path)
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise WeightsNotFoundError(
                f"Stable Diffusion weights: {path} is a file, not a folder. "
                + _fix_message(DEFAULT_MODEL_ID)
            )
        missing = [
            sub
            for sub, marker in zip(
                SUBFOLDERS, ("config.json", "config.json", "config.json", None), strict=True
            )
            if not (path / sub).is_dir() or (marker and not (path / sub / marker).is_file())
        ]
        if missing:
            raise WeightsNotFoundError(
                f"Stable Diffusion weights folder {path} lacks {', '.join(m + '/' for m in missing)} "
                "(with config.json). It must use the diffusers layout, as saved by "
                "`StableDiffusionPipeline.save_pretrained` or downloaded from the hub. "
                + _fix_message(DEFAULT_MODEL_ID)
            )
        return str(path), True
    if _looks_like_path(source):
        raise WeightsNotFoundError(
            f"Stable Diffusion weights folder {path} does not exist. "
            + _fix_message(DEFAULT_MODEL_ID)
        )

    offline = _offline()
    try:
        from huggingface_hub import hf_hub_download

        hf_hub_download(source, "unet/config.json", local_files_only=offline)
    except Exception as err:  # offline miss, gated repo, unknown id, no network, bad id
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        where = (
            "HF_HUB_OFFLINE is set and the weights are not in the local Hugging Face cache"
            if offline
            else "the Hugging Face Hub did not serve them"
        )
        raise WeightsNotFoundError(
            f"Stable Diffusion weights '{source}' are not available: {where} ({reason}). "
            + _fix_message(source)
        ) from None
    return source, offline


def _move(*modules: torch.nn.Module, device, dtype: torch.dtype) -> None:
    """Move modules to ``device`` and cast them to ``dtype`` only when they differ (diffusers
    warns on every dtype cast through ``.to``)."""
    for module in modules:
        module.to(device=device)
        if next(module.parameters()).dtype != dtype:
            module.to(dtype=dtype)


# --------------------------------------------------------------------------------------------
# The backbone
# --------------------------------------------------------------------------------------------


class StableDiffusionBackbone:
    """One Stable Diffusion UNet pass per image batch, returning its self-attention maps.

    Args:
        vae: a diffusers ``AutoencoderKL`` (SD v1: 8x downsampling, 4 latent channels).
        unet: a diffusers ``UNet2DConditionModel``.
        text_encoder: a transformers ``CLIPTextModel`` (its ``last_hidden_state`` conditions the
            UNet).
        tokenizer: the matching ``CLIPTokenizer`` (only the empty prompt is ever encoded).
        timestep: the diffusion timestep of the single pass (300 as in DiffSeg).
        name: a label for logs and results; defaults to the UNet's class name.
        is_random: True when the weights are random (compute benchmarks, tests); logged loudly.
        chunk_elements: bound on the attention scores held at once per layer
            (``B * heads * chunk * N`` floats); ``None`` picks a per-device default, see
            :func:`diffseg.attention.default_chunk_elements`.
        attention_output: ``"probs"`` (default) or ``"sdpa"``, how captured layers compute their
            output; see :class:`diffseg.attention.SelfAttentionCaptureProcessor`.

    The modules are put in eval mode with gradients off and must share one device. Device and
    dtype are the caller's: move the modules (or use the builders' ``device``/``dtype``) before.
    """

    def __init__(
        self,
        vae: torch.nn.Module,
        unet: torch.nn.Module,
        text_encoder: torch.nn.Module,
        tokenizer,
        timestep: int = DEFAULT_TIMESTEP,
        *,
        name: str | None = None,
        is_random: bool = False,
        chunk_elements: int | None = None,
        attention_output: str = "probs",
    ) -> None:
        for module in (vae, unet, text_encoder):
            module.eval()
            module.requires_grad_(False)
        devices = {p.device for m in (vae, unet, text_encoder) for p in m.parameters()}
        if len(devices) != 1:
            raise ValueError(f"vae, unet and text_encoder must be on one device; got {devices}")
        if unet.config.in_channels != vae.config.latent_channels:
            raise ValueError(
                f"unet.in_channels={unet.config.in_channels} != "
                f"vae.latent_channels={vae.config.latent_channels}"
            )
        if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
            raise ValueError(
                f"unet.cross_attention_dim={unet.config.cross_attention_dim} != "
                f"text_encoder.hidden_size={text_encoder.config.hidden_size}"
            )
        if not 0 <= int(timestep) < 1000:
            raise ValueError(f"timestep must be in [0, 1000), got {timestep}")
        if attention_output not in ("probs", "sdpa"):
            raise ValueError(
                f"attention_output must be 'probs' or 'sdpa', got {attention_output!r}"
            )
        self.vae = vae
        self.unet = unet
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.timestep = int(timestep)
        self.is_random = bool(is_random)
        self.name = name or type(unet).__name__
        if self.is_random and "RANDOM" not in self.name:
            self.name = f"{self.name} (RANDOM WEIGHTS)"
        self.chunk_elements = chunk_elements
        self.attention_output = attention_output
        self.model_id: str | None = None
        self.layer_inventory: dict[int, list[str]] = {}
        self._prompt_cache: dict[tuple[str, torch.dtype], Tensor] = {}
        if self.is_random:
            log.warning(
                "!!! Stable Diffusion backbone %s has RANDOM WEIGHTS: attention maps and any "
                "segmentation from them are meaningless (compute/plumbing checks only) !!!",
                self.name,
            )

    # ---------------------------------------------------------------- builders

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str | os.PathLike = DEFAULT_MODEL_ID,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        timestep: int = DEFAULT_TIMESTEP,
        **kwargs: Any,
    ) -> StableDiffusionBackbone:
        """Load ``vae/``, ``unet/``, ``text_encoder/`` and ``tokenizer/`` from a hub id (default
        ``CompVis/stable-diffusion-v1-4``; ``runwayml/stable-diffusion-v1-5``-style ids and SD 2.x
        work too) or a local folder in the diffusers layout.

        Raises :class:`WeightsNotFoundError` (a ``FileNotFoundError``) before loading anything when
        the weights can't be had (missing folder, offline without a cached copy, gated licence not
        accepted, unknown id), naming the id and how to fix it. ``kwargs`` go to the constructor.
        """
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        source, local_only = resolve_weights(model_id_or_path)
        log.info("loading Stable Diffusion weights from %s", source)
        try:
            common = {"local_files_only": local_only}
            # diffusers casts while loading (keeping any modules it must keep in float32)
            vae = AutoencoderKL.from_pretrained(
                source, subfolder="vae", torch_dtype=dtype, **common
            )
            unet = UNet2DConditionModel.from_pretrained(
                source, subfolder="unet", torch_dtype=dtype, **common
            )
            text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **common)
            tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common)
        except (OSError, ValueError) as err:
            raise WeightsNotFoundError(
                f"Could not load Stable Diffusion weights '{source}': {type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}. " + _fix_message(str(source))
            ) from err
        _move(vae, unet, text_encoder, device=device, dtype=dtype)
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
        **kwargs: Any,
    ) -> StableDiffusionBackbone:
        """Build a named architecture with RANDOM weights, no download.

        ``"sd14"``: the real SD v1.4 UNet, VAE and CLIP ViT-L/14 text encoder (compute and
        memory benchmarks). ``"tiny"``: a few channels, the same block layout, so 512 px images
        give the 64/32/16/8 token grids and 16 self-attention layers (5/5/5/1) of SD v1 (tests and
        smoke runs; well under a second per image on a CPU). The tokenizer is
        :func:`tiny_clip_tokenizer` for both (it encodes the empty prompt with the real ids).
        Weights come from ``seed`` without touching the global RNG.
        """
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        configs = model_configs(name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = UNet2DConditionModel(**configs["unet"])
            vae = AutoencoderKL(**configs["vae"])
            text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
        _move(vae, unet, text_encoder, device=device, dtype=dtype)
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

    # ---------------------------------------------------------------- properties

    @property
    def device(self) -> torch.device:
        """Device of the UNet's parameters."""
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the UNet's parameters (the maps are float32 regardless)."""
        return next(self.unet.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def expected_layers(self, image_size: int = 512) -> dict[int, list[str]]:
        """The self-attention layers per token-grid side for square images of ``image_size``,
        read from the UNet's module layout, highest resolution first.

        ``down_blocks.i`` runs at ``latent / 2**i``, ``mid_block`` at the coarsest level and
        ``up_blocks.j`` at ``latent / 2**(levels - 1 - j)``. SD v1 at 512: ``{64: 5 layers,
        32: 5, 16: 5, 8: 1}``.
        """
        latent = image_size // self.vae_scale_factor
        levels = len(self.unet.down_blocks)
        found: dict[int, list[str]] = {}
        for name in self_attention_layers(self.unet):
            parts = name.split(".")
            if parts[0] == "down_blocks":
                level = int(parts[1])
            elif parts[0] == "up_blocks":
                level = levels - 1 - int(parts[1])
            elif parts[0] == "mid_block":
                level = levels - 1
            else:
                raise RuntimeError(f"cannot place self-attention layer {name} in the UNet")
            res = latent
            for _ in range(level):
                res = -(-res // 2)  # the UNet's strided convs round up
            found.setdefault(res, []).append(name)
        return {r: found[r] for r in sorted(found, reverse=True)}

    @property
    def resolutions(self) -> list[int]:
        """Token-grid sides of the maps :meth:`attention_maps` returns for 512 px images,
        highest first (SD v1: ``[64, 32, 16, 8]``)."""
        return list(self.expected_layers(512))

    def describe(self) -> dict[str, Any]:
        """JSON-able summary for logs and results."""
        return {
            "name": self.name,
            "model_id": self.model_id,
            "is_random": self.is_random,
            "timestep": self.timestep,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
            "resolutions": self.resolutions,
            "layers_per_resolution": {str(r): len(v) for r, v in self.expected_layers().items()},
        }

    def __repr__(self) -> str:
        return (
            f"StableDiffusionBackbone(name={self.name!r}, timestep={self.timestep}, "
            f"device={self.device}, dtype={self.dtype})"
        )

    # ---------------------------------------------------------------- computation

    def _to_model(self, images: Tensor, module: torch.nn.Module) -> Tensor:
        param = next(module.parameters())
        return images.to(device=param.device, dtype=param.dtype)

    @torch.inference_mode()
    def encode(self, images: Tensor) -> Tensor:
        """VAE latent of ``images``: the posterior **mean** times ``vae.config.scaling_factor``.

        Args:
            images: ``(B, 3, H, W)`` float in [-1, 1], H == W a multiple of 64, any device.
        Returns:
            ``(B, 4, H/8, W/8)`` in the UNet's dtype on the backbone's device. Deterministic: no
            sampling from the posterior, no noise.
        """
        validate_images(images)
        posterior = self.vae.encode(self._to_model(images, self.vae)).latent_dist
        latent = posterior.mean
        shift = getattr(self.vae.config, "shift_factor", None)
        if shift is not None:
            latent = latent - shift
        latent = latent * self.vae.config.scaling_factor
        return latent.to(dtype=self.dtype)

    @torch.inference_mode()
    def prompt_embedding(self) -> Tensor:
        """CLIP ``last_hidden_state`` of the empty prompt: ``(1, 77, D)`` in the UNet's dtype.

        The tokenizer pads ``""`` to the text encoder's 77 positions: SD v1 gives BOS (49406)
        then EOS (49407) x 76. Computed once per (device, dtype) and cached.
        """
        key = (str(self.device), self.dtype)
        cached = self._prompt_cache.get(key)
        if cached is not None:
            return cached
        length = int(self.text_encoder.config.max_position_embeddings)
        tokens = self.tokenizer(
            "", padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        )
        ids = tokens.input_ids.to(next(self.text_encoder.parameters()).device)
        hidden = self.text_encoder(ids).last_hidden_state
        embedding = hidden.to(device=self.device, dtype=self.dtype)
        self._prompt_cache[key] = embedding
        return embedding

    @torch.inference_mode()
    def attention_maps(self, images: Tensor) -> dict[int, Tensor]:
        """Self-attention maps of one UNet pass, averaged per token resolution.

        Args:
            images: ``(B, 3, 512, 512)`` float in [-1, 1] (other sides that are multiples of 64
                are accepted and give other grids: ``H/8, H/16, H/32, H/64``), any device.
        Returns:
            ``{64: (B, 4096, 4096), 32: (B, 1024, 1024), 16: (B, 256, 256), 8: (B, 64, 64)}``
            for SD v1 at 512: float32 on the backbone's device, highest resolution first. Entry
            ``[b, q, k]`` is the attention of query token ``q = y*r + x`` to key token ``k``,
            averaged over the resolution's layers and their heads; every row sums to 1. The
            layers found are in :attr:`layer_inventory` afterwards.
        """
        latent = self.encode(images)
        batch = latent.shape[0]
        embedding = self.prompt_embedding().expand(batch, -1, -1)
        timestep = torch.full((batch,), self.timestep, dtype=torch.long, device=latent.device)
        store = AttentionStore()
        with capture_self_attention(
            self.unet, store, chunk_elements=self.chunk_elements, output=self.attention_output
        ):
            self.unet(latent, timestep, encoder_hidden_states=embedding, return_dict=False)
        inventory = store.layer_inventory
        if {r: len(v) for r, v in inventory.items()} != {
            r: len(v) for r, v in self.layer_inventory.items()
        }:
            log.info(
                "%s: self-attention layers captured per token grid (side: layers): %s",
                self.name,
                {r: len(v) for r, v in inventory.items()},
            )
        self.layer_inventory = inventory
        return store.maps()
