"""Architectures written in code: the real configs of each family and tiny random ones.

Random-weight models (``from_config``) need no download: the real shapes serve compute and memory
benchmarks, the tiny ones (a few channels, the real block layout and token grids) tests and smoke
runs. Each named config gives the parts of its family: SD 1.x/2.x ``unet``, ``vae``,
``text_encoder``; the SDXL family also ``text_encoder_2`` (with a projection: the pooled
embedding).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["config_family", "config_names", "model_configs", "tiny_clip_tokenizer"]

# CLIP's special token ids in the real 49408-token vocabulary (openai/clip-vit-large-patch14,
# which SD v1 uses unchanged).
CLIP_BOS_ID = 49406
CLIP_EOS_ID = 49407
CLIP_VOCAB_SIZE = 49408

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


# SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0): three levels, attention only on the
# two coarser ones (64 and 32 tokens per side at 1024 px), 1 / 2 / 10 transformer layers per
# attention block, conditioned on two text encoders (768 + 1280 = 2048 channels) plus the pooled
# embedding and six size/crop numbers ("text_time"). SSD-1B and Segmind-Vega are distilled
# versions of this layout (fewer transformer layers and blocks).
_SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),  # diffusers' historical name: the number of heads
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 * 256 + 1280 (pooled)
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
}
# The SDXL VAE has SD v1's architecture; it overflows in float16 (force_upcast).
_SDXL_VAE = dict(_SD_V1_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
# OpenCLIP ViT-bigG/14's text tower (text_encoder_2 of SDXL), with its 1280-d projection.
_SDXL_TEXT_2 = dict(
    _SD_V1_TEXT,
    hidden_size=1280,
    intermediate_size=5120,
    projection_dim=1280,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
)

# The tiny SDXL: the same three levels and block types, two attention grids, "text_time"
# conditioning with two (tiny) text encoders whose penultimate states are concatenated.
_TINY_TEXT_2 = dict(_TINY_TEXT, projection_dim=24)
_TINY_SDXL_UNET = dict(
    _SDXL_UNET,
    block_out_channels=(32, 32, 64),
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(2, 2, 2),
    norm_num_groups=8,
    cross_attention_dim=_TINY_TEXT["hidden_size"] + _TINY_TEXT_2["hidden_size"],
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + _TINY_TEXT_2["projection_dim"],
)
_TINY_SDXL_VAE = dict(_TINY_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)

_CONFIGS = {
    "sd14": {"unet": _SD_V1_UNET, "vae": _SD_V1_VAE, "text_encoder": _SD_V1_TEXT},
    "tiny": {"unet": _TINY_UNET, "vae": _TINY_VAE, "text_encoder": _TINY_TEXT},
    "sdxl": {
        "unet": _SDXL_UNET,
        "vae": _SDXL_VAE,
        "text_encoder": _SD_V1_TEXT,
        "text_encoder_2": _SDXL_TEXT_2,
    },
    "tiny_sdxl": {
        "unet": _TINY_SDXL_UNET,
        "vae": _TINY_SDXL_VAE,
        "text_encoder": _TINY_TEXT,
        "text_encoder_2": _TINY_TEXT_2,
    },
}


def config_names() -> list[str]:
    """Names of the architectures written in code (random weights)."""
    return sorted(_CONFIGS)


def config_family(name: str) -> str:
    """``"sd3"`` / ``"flux"`` for an MM-DiT config, ``"sdxl"`` for a UNet config with two text
    encoders, else ``"sd"``."""
    configs = _CONFIGS.get(name) or model_configs(name)
    if "family" in configs:
        return configs["family"]
    return "sdxl" if "text_encoder_2" in configs else "sd"


def model_configs(name: str) -> dict[str, dict[str, Any]]:
    """The per-part configs of a named architecture (copies).

    ``"sd14"`` is the real SD v1.4 (UNet 860M, VAE 84M, CLIP ViT-L/14 text 123M parameters),
    ``"sdxl"`` the real SDXL base (UNet 2.6B); ``"tiny"`` and ``"tiny_sdxl"`` keep their block
    layouts with a few channels.
    """
    if name not in _CONFIGS:
        raise ValueError(f"unknown backbone config {name!r}; choose one of {config_names()}")
    return {
        part: dict(cfg) if isinstance(cfg, dict) else cfg for part, cfg in _CONFIGS[name].items()
    }


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
# MM-DiT models (transformer backbones): SD3 / SD3.5 (joint blocks, image tokens first) and FLUX
# (double + single blocks, RoPE, text tokens first). Each config gives ``transformer``, ``vae``,
# ``scheduler`` and its text encoders; ``family`` says which backbone class builds it.

# The SD3 VAE: SD v1's layout with 16 latent channels, a shift, and no quant convolutions.
_SD3_VAE = dict(
    _SD_V1_VAE,
    latent_channels=16,
    sample_size=1024,
    shift_factor=0.0609,
    scaling_factor=1.5305,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
_FLUX_VAE = dict(_SD3_VAE, shift_factor=0.1159, scaling_factor=0.3611)
# stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json: 24 joint blocks of 24
# heads x 64; at 1024 px the latent is 128 x 128, patches of 2: 64 x 64 image tokens.
_SD3_TRANSFORMER = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
}
# SD3.5-medium: qk RMS norms and a second, image-only attention in blocks 0..12.
_SD35_TRANSFORMER = dict(
    _SD3_TRANSFORMER,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)
# CLIP ViT-L/14 and OpenCLIP bigG/14 text towers with their projections (SD3 pools both).
_SD3_TEXT = dict(_SD_V1_TEXT, hidden_act="quick_gelu")
_SD3_TEXT_2 = dict(_SDXL_TEXT_2)
_SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
# black-forest-labs/FLUX.1-dev: 19 double + 38 single blocks of 24 heads x 128, 2x2-packed
# latent (64 channels), RoPE over (t, row, col), guidance embedding; T5-XXL text.
_FLUX_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
_FLUX_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
_T5_XXL = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_ff": 10240,
    "d_kv": 64,
    "num_layers": 24,
    "num_heads": 64,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "is_encoder_decoder": False,
}

# Tiny MM-DiTs: the real token layouts at 1024 px (64 x 64 image tokens, 77 CLIP + 77 zero-T5
# text tokens for SD3, 77 T5 tokens first for FLUX), a few channels, 2 heads (head mean).
_TINY_SD3_TEXT = dict(_TINY_TEXT)
_TINY_SD3_TEXT_2 = dict(_TINY_TEXT_2)
_TINY_SD3_TRANSFORMER = dict(
    _SD3_TRANSFORMER,
    num_layers=10,  # Seg4Diff reads block 9
    attention_head_dim=8,
    num_attention_heads=2,
    # wider than the two CLIPs (32 + 32): the CLIP states are zero-padded to it, as on SD3
    joint_attention_dim=96,
    caption_projection_dim=16,
    pooled_projection_dim=_TINY_TEXT["projection_dim"] + _TINY_TEXT_2["projection_dim"],
    pos_embed_max_size=64,
)
_TINY_SD35_TRANSFORMER = dict(
    _TINY_SD3_TRANSFORMER, dual_attention_layers=tuple(range(5)), qk_norm="rms_norm"
)
_TINY_SD3_VAE = dict(
    _SD3_VAE, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4
)
_TINY_FLUX_VAE = dict(_TINY_SD3_VAE, shift_factor=0.1159, scaling_factor=0.3611)
_TINY_T5 = dict(_T5_XXL, vocab_size=64, d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2)
_TINY_FLUX_TRANSFORMER = dict(
    _FLUX_TRANSFORMER,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=_TINY_T5["d_model"],
    pooled_projection_dim=_TINY_TEXT["hidden_size"],  # FLUX pools CLIP-L's pooler output
    axes_dims_rope=(4, 6, 6),
)

_MMDIT_CONFIGS = {
    "sd3": {
        "family": "sd3",
        "transformer": _SD3_TRANSFORMER,
        "vae": _SD3_VAE,
        "scheduler": _SD3_SCHEDULER,
        "text_encoder": _SD3_TEXT,
        "text_encoder_2": _SD3_TEXT_2,
    },
    "tiny_sd3": {
        "family": "sd3",
        "transformer": _TINY_SD3_TRANSFORMER,
        "vae": _TINY_SD3_VAE,
        "scheduler": _SD3_SCHEDULER,
        "text_encoder": _TINY_SD3_TEXT,
        "text_encoder_2": _TINY_SD3_TEXT_2,
    },
    "tiny_sd35": {
        "family": "sd3",
        "transformer": _TINY_SD35_TRANSFORMER,
        "vae": _TINY_SD3_VAE,
        "scheduler": _SD3_SCHEDULER,
        "text_encoder": _TINY_SD3_TEXT,
        "text_encoder_2": _TINY_SD3_TEXT_2,
    },
    "flux": {
        "family": "flux",
        "transformer": _FLUX_TRANSFORMER,
        "vae": _FLUX_VAE,
        "scheduler": _FLUX_SCHEDULER,
        "text_encoder": _SD_V1_TEXT,
        "text_encoder_2": _T5_XXL,
    },
    "tiny_flux": {
        "family": "flux",
        "transformer": _TINY_FLUX_TRANSFORMER,
        "vae": _TINY_FLUX_VAE,
        "scheduler": _FLUX_SCHEDULER,
        "text_encoder": _TINY_TEXT,
        "text_encoder_2": _TINY_T5,
    },
}
_CONFIGS.update(_MMDIT_CONFIGS)
