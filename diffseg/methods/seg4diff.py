"""Seg4Diff (Kim et al., NeurIPS 2025), unsupervised mode: segments from one MM-DiT block's
image -> text attention, merged with DiffSeg's symmetric-KL rule (docs/seg4diff.md).

One transformer pass of SD3 on the noised image with the empty prompt (77 CLIP + 77 zero-T5 text
tokens); block 9's joint-attention probabilities (softmax over all image + text keys, mean over
heads) from the 4096 image tokens to the 77 CLIP tokens give A (B, 4096, 77). Then, per image:

1. normalisation, min-max with 1e-6 (``released``: per pixel across the 77 tokens, as the code
   runs; ``intended``: per token across the 4096 pixels, as the training model does);
2. each token's column, softmax over the 64 x 64 cells (temperature 1): 77 candidate maps;
3. one greedy symmetric-KL pass in token order (groups absorb marked maps again; DiffSeg's later
   iterations): M merged maps, the means of their groups (``released``: tau 0.1, the hard-coded
   value; ``intended``: tau 0.035, the config's);
4. bilinear upsampling (half-pixel) to the evaluation size and argmax (first index on ties).

Inputs (``preprocessing=seg4diff``, :func:`diffseg.data.transforms.seg4diff_image`): shortest
side to 640 (longest at most 2560), zero padding of the bottom / right to multiples of 32, the
padded canvas stretched to 1024 x 1024; predictions at the resized, unpadded size (the 64 x 64
grid is stretched over it, padding included, as released).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..data.transforms import padded_size, seg4diff_image, seg4diff_label, seg4diff_size
from ..features import FeatureRequest, Features
from .base import Method, check_hints, check_number
from .merging import greedy_merge, proposals_to_labels

__all__ = [
    "PRESETS",
    "Seg4Diff",
    "candidate_maps",
    "normalize_attention",
    "seg4diff_image",
    "seg4diff_label",
    "seg4diff_size",
]

#: The two readings of the release (SPEC_SEG4DIFF.md section 12).
PRESETS: dict[str, dict[str, Any]] = {
    "released": {"normalize": "pixel", "kl_threshold": 0.1},
    "intended": {"normalize": "token", "kl_threshold": 0.035},
}
#: Seg4Diff's expert block on SD3-medium (zero-based ``transformer_blocks[9]``).
SD3_LAYER = 9
NUM_TOKENS = 77  # the CLIP text positions (BOS, EOS, 75 pads); the zero-T5 keys never compete
NORM_EPS = 1e-6


# -------------------------------------------------------------------------------- the steps


def normalize_attention(attn: Tensor, normalize: str = "pixel", power: float = 1.0) -> Tensor:
    """Min-max normalisation of ``attn`` (B, N, T): ``a = A - min``, ``a / (max a + 1e-6)``,
    ``a ** power``; over the T tokens of each pixel (``"pixel"``) or over the N pixels of each
    token (``"token"``). float32, same shape."""
    if normalize not in ("pixel", "token"):
        raise ValueError(f"normalize must be 'pixel' or 'token', got {normalize!r}")
    dim = -1 if normalize == "pixel" else -2
    a = attn.float()
    a = a - a.amin(dim=dim, keepdim=True)
    a = a / (a.amax(dim=dim, keepdim=True) + NORM_EPS)
    return a if power == 1.0 else a.pow(power)


def candidate_maps(normalized: Tensor) -> Tensor:
    """Spatial softmax of each token's column: (B, N, T) -> (B, T, N), rows sum to 1."""
    return normalized.float().transpose(-1, -2).softmax(dim=-1)


# -------------------------------------------------------------------------------- the method


def is_sd3_medium_layout(backbone: Any) -> bool:
    """Whether ``backbone`` has SD3-medium's block layout, the one Seg4Diff's block 9 is pinned
    for: the SD3 family without SD3.5's qk norms (SD3.5 and FLUX need an explicit layer)."""
    if getattr(backbone, "family", None) != "sd3":
        return False
    config = getattr(getattr(backbone, "transformer", None), "config", None)
    return getattr(config, "qk_norm", None) is None


def _size(output_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(output_size, int | np.integer):
        size = (int(output_size), int(output_size))
    else:
        size = tuple(int(s) for s in output_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"output_size must be a positive int or (h, w), got {output_size!r}")
    return size


class Seg4Diff(Method):
    """Seg4Diff's training-free, text-free segmentation.

    Args:
        preset: ``"released"`` (normalize ``"pixel"``, kl_threshold 0.1: what the released code
            runs) or ``"intended"`` (``"token"``, 0.035: what its config and training model
            suggest). Explicit ``normalize`` / ``kl_threshold`` override the preset.
        layer: the block read (zero-based; several are averaged). None = 9 on SD3-medium;
            SD3.5 and FLUX need an explicit one (the release pins none; FLUX's numbering is
            global: double blocks, then single).
        noise_step: the timestep, counted from the end of the backbone scheduler's schedule (28
            steps on SD3: 8 -> index 20, sigma 0.515, t 515.07).
        num_steps: the schedule's length (None = the backbone's: 28 SD3, 50 FLUX).
        seed: the noise generator's seed (one draw on the model's device, shared by the batch).
        power: the normalisation's exponent (1).
        align: how the 64 x 64 grid (which covers the zero-padded canvas) meets the output:
            ``"stretch"`` (as released: stretched over the unpadded (h, w), up to 31 px off at the
            bottom / right) or ``"crop"`` (upsampled to the padded size, ceil to 32, then the
            padding cropped: aligned).
    """

    name = "seg4diff"
    hints: tuple[str, ...] = ()
    any_output_shape = True

    def __init__(
        self,
        preset: str = "released",
        layer: int | Sequence[int] | None = None,
        noise_step: int = 8,
        seed: int = 42,
        normalize: str | None = None,
        kl_threshold: float | None = None,
        num_steps: int | None = None,
        power: float = 1.0,
        align: str = "stretch",
    ) -> None:
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        self.preset = preset
        self.normalize = PRESETS[preset]["normalize"] if normalize is None else str(normalize)
        if self.normalize not in ("pixel", "token"):
            raise ValueError(f"normalize must be 'pixel' or 'token', got {normalize!r}")
        if kl_threshold is None:
            kl_threshold = PRESETS[preset]["kl_threshold"]
        self.kl_threshold = check_number("kl_threshold", kl_threshold, 0, lo_open=True)
        if layer is None or isinstance(layer, int):
            self.layer = layer
        else:
            self.layer = tuple(int(b) for b in layer)
            if not self.layer:
                raise ValueError("layer must be a block number or a non-empty list of them")
        self.noise_step = int(noise_step)
        self.num_steps = None if num_steps is None else int(num_steps)
        if self.noise_step < 1 or (self.num_steps and self.noise_step > self.num_steps):
            raise ValueError(f"noise_step must be in [1, num_steps], got {noise_step}")
        self.seed = int(seed)
        self.power = float(power)
        if align not in ("stretch", "crop"):
            raise ValueError(f"align must be 'stretch' or 'crop', got {align!r}")
        self.align = align
        self.check_inputs = True

    # -- settings ------------------------------------------------------------------------------

    def layers(self, backbone: Any = None) -> tuple[int, ...]:
        """The blocks read, as a tuple (see :meth:`layer_for`)."""
        if self.layer is None:
            if backbone is not None and not is_sd3_medium_layout(backbone):
                raise ValueError(
                    f"Seg4Diff pins no layer on {getattr(backbone, 'name', backbone)} (only "
                    "SD3-medium's block 9 is known; the release pins none for SD3.5 or FLUX): "
                    "give one, e.g. Seg4Diff(layer=...) / method.layer="
                )
            return (SD3_LAYER,)
        return (self.layer,) if isinstance(self.layer, int) else self.layer

    def layer_for(self, backbone: Any) -> int | tuple[int, ...]:
        """The block Seg4Diff reads on ``backbone`` (9 on SD3-medium unless given)."""
        layers = self.layers(backbone)
        count = getattr(backbone, "num_blocks", None)
        if count is not None and max(layers) >= count:
            raise ValueError(f"layer {max(layers)} does not exist: {backbone.name} has {count}")
        return layers[0] if len(layers) == 1 else layers

    def check_backbone(self, backbone: Any) -> None:
        """On an MM-DiT, the block to read must be given (SD3.5, FLUX) and exist
        (:meth:`layer_for`); a UNet is refused by its own request check (no joint attention)."""
        if getattr(backbone, "family", None) in ("sd3", "flux"):
            self.layer_for(backbone)

    def feature_request(self, backbone: Any = None) -> FeatureRequest:
        """The I2T probabilities of the layer(s) to the 77 text tokens, at the noise step, with
        seeded noise, for the empty prompt."""
        return FeatureRequest(
            joint_blocks=self.layers(backbone),
            joint_tokens=tuple(range(NUM_TOKENS)),
            noise_seed=self.seed,
            noise_step=self.noise_step,
            num_steps=self.num_steps,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "preset": self.preset,
            "normalize": self.normalize,
            "kl_threshold": self.kl_threshold,
            "layer": self.layer if self.layer is not None else SD3_LAYER,
            "noise_step": self.noise_step,
            "num_steps": self.num_steps,
            "seed": self.seed,
            "power": self.power,
            "align": self.align,
            "num_tokens": NUM_TOKENS,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "name")
        return f"Seg4Diff({args})"

    # -- the steps -----------------------------------------------------------------------------

    def features(self, backbone, images: Tensor) -> Tensor:
        """``images`` (B, 3, 1024, 1024) in [-1, 1] -> A (B, 4096, 77) float32: one transformer
        pass of ``backbone`` (an MM-DiT), its layers' I2T probabilities averaged."""
        layers = self.layers(backbone)
        self.layer_for(backbone)
        extracted = backbone.extract(images, self.feature_request(backbone))
        return self.attention(extracted, layers)

    def attention(self, features: Features, layers: Sequence[int] | None = None) -> Tensor:
        """A (B, N, 77) of a :class:`Features`: the mean over ``layers`` of their I2T maps."""
        layers = tuple(layers or self.layers())
        missing = [b for b in layers if b not in features.joint_text]
        if missing:
            raise ValueError(f"these features hold no joint attention of blocks {missing}")
        cols = [features.joint_tokens.index(t) for t in range(NUM_TOKENS)]
        maps = [features.joint_text[b][..., cols].float() for b in layers]
        return torch.stack(maps).mean(0)

    def merged_maps(self, attn: Tensor) -> list[Tensor]:
        """A (B, N, 77) -> one (M_b, side, side) tensor per image: normalisation, spatial
        softmax, greedy symmetric-KL merge in token order (maps of each group averaged)."""
        if attn.ndim != 3:
            raise ValueError(f"expected attention (B, N, T), got {tuple(attn.shape)}")
        side = math.isqrt(attn.shape[1])
        if side * side != attn.shape[1]:
            raise ValueError(f"{attn.shape[1]} image tokens are not a square grid")
        maps = candidate_maps(normalize_attention(attn, self.normalize, self.power))
        return [greedy_merge(m, self.kl_threshold).reshape(-1, side, side) for m in maps]

    def segment_features(
        self, attn: Tensor, output_size: int | Sequence[int] = (640, 640)
    ) -> Tensor:
        """A (B, N, 77) -> int64 labels (B, h, w): merged maps upsampled bilinearly (half-pixel)
        to ``output_size`` (an int or (h, w)), argmax (ids 0 .. M-1)."""
        h, w = _size(output_size)
        if self.align == "stretch":
            return torch.stack([proposals_to_labels(m, (h, w)) for m in self.merged_maps(attn)])
        padded = padded_size(h, w)
        maps = self.merged_maps(attn)
        return torch.stack([proposals_to_labels(m, padded)[:h, :w] for m in maps])

    def segment(
        self, features: Features, output_size: int | Sequence[int], hints: dict | None = None
    ) -> Tensor:
        """The engine's entry: labels (B, h, w) from a feature pass."""
        check_hints(self, hints)
        return self.segment_features(self.attention(features), output_size)
