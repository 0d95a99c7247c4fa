"""Structured synthetic self-attention for tests and benchmarks.

A label map on the finest query grid defines regions; a query in region ``g`` attends to a key in
region ``h`` with logit ``affinity[g, h]`` (plus optional Gaussian noise), softmaxed over keys.
Every resolution sees the label map sampled at its cell centres, so the maps look like the
multi-resolution output of a backbone: ``{64: (B,4096,4096), 32: (B,1024,1024), 16: ..., 8: ...}``.

Import as ``from diffseg.testing import synthetic_attention as sa``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

RESOLUTIONS = (64, 32, 16, 8)


def block_labels(rows: int, cols: int, size: int = 64) -> Tensor:
    """``(size, size)`` int64 label map of ``rows x cols`` equal blocks, ids row-major."""
    ys = torch.arange(size) * rows // size
    xs = torch.arange(size) * cols // size
    return ys[:, None] * cols + xs[None, :]


def voronoi_labels(num_regions: int, size: int = 64, seed: int = 0) -> Tensor:
    """``(size, size)`` int64 label map of random Voronoi cells (ids ``0..num_regions-1``; a cell
    may be empty only if two seeds coincide)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(num_regions, 2, generator=g) * size
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    pix = torch.stack([yy, xx], -1).reshape(-1, 1, 2)
    return ((pix - centres) ** 2).sum(-1).argmin(1).reshape(size, size)


def _downsample(labels: Tensor, r: int) -> Tensor:
    s = labels.shape[-1] // r
    return labels[..., s // 2 :: s, s // 2 :: s]


def make_maps(
    labels: Tensor,
    affinity: Tensor | float = 6.0,
    batch: int | None = None,
    resolutions: Sequence[int] = RESOLUTIONS,
    noise: float = 0.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> dict[int, Tensor]:
    """Attention probabilities ``{r: (B, r*r, r*r)}`` from a region label map.

    Args:
        labels: ``(S, S)`` or ``(B, S, S)`` int64 region ids ``0..G-1`` on the finest grid
            (``S = max(resolutions)``).
        affinity: ``(G, G)`` logits (query region, key region), or a float ``beta`` meaning
            ``beta * eye(G)`` (regions attend within themselves).
        batch: repeat a single ``(S, S)`` label map this many times.
        resolutions: token-grid sides; each must divide ``S``.
        noise: standard deviation of Gaussian noise added to the logits.
        seed: noise seed.

    Returns:
        dict of ``(B, r*r, r*r)`` tensors whose rows sum to 1 (strictly positive).
    """
    if labels.ndim == 2:
        labels = labels.unsqueeze(0).expand(batch or 1, -1, -1)
    num_regions = int(labels.max()) + 1
    if not isinstance(affinity, Tensor):
        affinity = float(affinity) * torch.eye(num_regions)
    affinity = affinity.to(torch.float32)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for r in resolutions:
        lab = _downsample(labels, r).reshape(labels.shape[0], r * r)
        logits = affinity[lab[:, :, None], lab[:, None, :]]  # (B, r*r, r*r)
        if noise > 0:
            logits = logits + noise * torch.randn(logits.shape, generator=g)
        out[r] = torch.softmax(logits, dim=-1).to(device=device, dtype=dtype)
    return out


def random_structured_maps(
    batch: int = 1, num_regions: int = 8, seed: int = 0, noise: float = 0.5, device: str = "cpu"
) -> tuple[dict[int, Tensor], Tensor]:
    """Random Voronoi regions with random affinities (a stand-in for real attention in benchmarks).

    Returns ``(maps, labels (B, 64, 64))``.
    """
    labels = torch.stack([voronoi_labels(num_regions, 64, seed + b) for b in range(batch)])
    g = torch.Generator().manual_seed(seed)
    aff = torch.rand(num_regions, num_regions, generator=g) * 2.0
    aff = (aff + aff.T) / 2 + 5.0 * torch.eye(num_regions)
    return make_maps(labels, aff, noise=noise, seed=seed, device=device), labels


def region_agreement(pred: Tensor, labels: Tensor) -> tuple[float, int]:
    """Fraction of pixels correct under the best one-to-one segment/region matching, and the
    number of segments used: how well a segmentation recovers the synthetic regions."""
    pred, labels = pred.flatten().numpy(), labels.flatten().numpy()
    seg_ids, pred = np.unique(pred, return_inverse=True)
    hist = np.zeros((labels.max() + 1, len(seg_ids)))
    np.add.at(hist, (labels, pred), 1)
    rows, cols = linear_sum_assignment(hist, maximize=True)
    return hist[rows, cols].sum() / labels.size, len(seg_ids)
