"""DiffSeg on MM-DiT backbones (SD3, SD3.5, FLUX): a row no paper has.

DiffSeg needs self-attention maps ``{grid: (B, N, N)}`` whose rows sum to 1. An MM-DiT block has
joint attention instead; its image -> image block (the probabilities of the image queries over the
image keys, from the softmax over all image + text keys, mean over heads) becomes DiffSeg's
attention once each row is renormalised over the image keys. Several blocks are averaged
(equal weights, one 64 x 64 grid at 1024 px). DiffSeg then runs unchanged: anchors, three KL
merges, bilinear NMS.

The pass mirrors DiffSeg's own protocol: the clean latent (no noise) at timestep 300, on the
flow scale (sigma 0.3 given to the transformer), and the empty prompt.

Default layers, by one rule (docs/seg4diff.md): the block at 3/8 of the joint (FLUX: double)
stack, rounded down -- Seg4Diff's expert block 9 on SD3's 24 blocks, 7 on FLUX's 19 double
blocks. The configs carry it per backbone (``backbone.layer``); ``method.layers=[...]`` sweeps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..features import FeatureRequest, Features
from .diffseg import DiffSeg

__all__ = ["MMDiTDiffSeg", "image_attention"]


def image_attention(features: Features, layers: Sequence[int]) -> dict[int, Tensor]:
    """``{grid: (B, N, N)}`` DiffSeg attention from the image -> image blocks of ``layers``:
    rows renormalised over the image keys, then averaged over the layers (float32)."""
    missing = [b for b in layers if b not in features.joint_image]
    if missing:
        raise ValueError(f"these features hold no image -> image attention of blocks {missing}")
    maps = []
    for b in layers:
        block = features.joint_image[b].float()
        maps.append(block / block.sum(-1, keepdim=True))
    mean = torch.stack(maps).mean(0)
    side = int(round(mean.shape[1] ** 0.5))
    return {side: mean}


class MMDiTDiffSeg(DiffSeg):
    """DiffSeg over the joint attention of MM-DiT blocks.

    Args:
        layers: block numbers (global: FLUX double blocks, then single blocks); averaged.
        timestep: the pass's timestep (DiffSeg's 300; sigma = t / 1000 on the flow scale).
        noise_seed: None (DiffSeg's clean latent) or a seed for flow noise at that sigma.
        **kwargs: DiffSeg's parameters (kl_threshold, num_points, ...).
    """

    name = "diffseg"

    def __init__(
        self,
        layers: int | Sequence[int] = (9,),
        timestep: int | None = 300,
        noise_seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(timestep=timestep, **kwargs)
        layers = (layers,) if isinstance(layers, int) else tuple(int(b) for b in layers)
        if not layers or min(layers) < 0:
            raise ValueError(f"layers must be block numbers >= 0, got {layers!r}")
        self.layers = layers
        self.noise_seed = None if noise_seed is None else int(noise_seed)

    def feature_request(self) -> FeatureRequest:
        """The image -> image joint attention of :attr:`layers`."""
        return FeatureRequest(
            joint_blocks=self.layers,
            joint_image=True,
            timestep=self.timestep,
            noise_seed=self.noise_seed,
        )

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "layers": list(self.layers), "noise_seed": self.noise_seed,
                "backbone_family": "mmdit"}  # fmt: skip

    def propose(self, maps: Features | Mapping[int, Tensor]) -> list[Tensor]:
        if isinstance(maps, Features):
            maps = image_attention(maps, self.layers)
        return super().propose(maps)
