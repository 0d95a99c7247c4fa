"""Pixel-adaptive mask refinement (PAMR, Araslanov & Roth, CVPR 2020), vectorised.

Each pixel looks at its 8 neighbours at every dilation ``d`` (offsets ``(-d, -d), (-d, 0),
(-d, d), (0, -d), (0, d), (d, -d), (d, 0), (d, d)``, replicate border). Its affinity to
neighbour ``j`` is ``-mean_rgb |x_centre - x_j| / (1e-8 + sigma_scale * sigma)``, where
``sigma`` is the per-channel unbiased standard deviation of the ``9 * len(dilations)`` sampled
values (the centre counted once per dilation); a softmax over the ``8 * len(dilations)``
neighbours (the centre is not one of them) gives the weights. Every iteration replaces each
mask value by the weighted sum of its neighbours' values, all channels at once.

The neighbours are read through one precomputed index of clamped flat positions, so replicate
padding costs nothing per iteration and the loop is one gather, one product and one sum, on
pixel-major (B, H*W, K) masks so that a gather moves a pixel's K values together.

:func:`pamr_refine` is the label refinement any method can end with (DiffCut; DiffSeg with
``pamr=True``; SeeDiff uses :func:`pamr` on its masks): one-hot labels, PAMR on the input image,
argmax, 3x3 median (:func:`refine_labels`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..features import Features

__all__ = [
    "images_for_labels",
    "median3x3",
    "neighbour_index",
    "pamr",
    "pamr_refine",
    "pamr_weights",
    "refine_labels",
]

# Row-major order of the 3x3 ring without its centre, as (row, column) steps.
_RING = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def neighbour_index(
    height: int, width: int, dilations: Sequence[int], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Flat positions of every pixel's ring neighbours, with replicate (clamped) borders.

    Returns:
        LongTensor (8 * len(dilations), height * width): row ``8 * i + r`` holds, for each
        pixel in row-major order, the flat index of its neighbour at ring step ``r`` times
        ``dilations[i]``.
    """
    rows = torch.arange(height, device=device)[:, None]
    cols = torch.arange(width, device=device)[None, :]
    index = []
    for d in dilations:
        for dr, dc in _RING:
            r = (rows + dr * d).clamp(0, height - 1)
            c = (cols + dc * d).clamp(0, width - 1)
            index.append((r * width + c).reshape(-1))
    return torch.stack(index)


def pamr_weights(
    image: torch.Tensor, index: torch.Tensor, num_dilations: int, sigma_scale: float = 0.1
) -> torch.Tensor:
    """Softmax affinities of every pixel to its ring neighbours.

    Args:
        image: float (B, C, H, W).
        index: LongTensor (P, H * W) from :func:`neighbour_index`, P = 8 * num_dilations.
        num_dilations: how many dilations ``index`` holds (the centre enters sigma once each).
        sigma_scale: the factor on the local standard deviation (0.1 in PAMR).

    Returns:
        float (B, P, H * W), summing to 1 over P.
    """
    b, c = image.shape[:2]
    p, n = index.shape
    flat = image.flatten(2).transpose(1, 2)  # (B, HW, C): gathers move whole pixels
    neighbours = flat.index_select(1, index.reshape(-1)).view(b, p, n, c)
    centre = flat[:, None]  # (B, 1, HW, C)
    samples = torch.cat([neighbours, centre.expand(-1, num_dilations, -1, -1)], dim=1)
    sigma = samples.std(dim=1, keepdim=True)  # unbiased, (B, 1, HW, C)
    logits = -(centre - neighbours).abs() / (1e-8 + sigma_scale * sigma)
    return F.softmax(logits.mean(dim=3), dim=1)


def pamr(
    image: torch.Tensor,
    masks: torch.Tensor,
    num_iter: int = 10,
    dilations: Sequence[int] = (1, 2, 4, 8),
    sigma_scale: float = 0.1,
) -> torch.Tensor:
    """Refine soft masks by repeated image-adaptive averaging over local neighbours.

    Args:
        image: float (B, C, H, W), any value range (DiffCut: RGB in [0, 1]).
        masks: float (B, K, H, W), on the image's grid.
        num_iter: number of averaging steps.
        dilations: ring radii, in order.
        sigma_scale: the factor on the local standard deviation.

    Returns:
        float (B, K, H, W) in ``masks``' dtype, on its device.
    """
    if image.dim() != 4 or masks.dim() != 4:
        raise ValueError(
            f"image and masks must be 4-D, got {tuple(image.shape)}, {tuple(masks.shape)}"
        )
    b, k, h, w = masks.shape
    if image.shape[0] != b or image.shape[-2:] != masks.shape[-2:]:
        raise ValueError(f"image {tuple(image.shape)} does not match masks {tuple(masks.shape)}")
    index = neighbour_index(h, w, dilations, masks.device)
    weights = pamr_weights(image.to(masks.device), index, len(dilations), sigma_scale)
    weights = weights.to(masks.dtype)[..., None]  # (B, P, HW, 1)
    flat_index = index.reshape(-1)
    # (B, HW, K): each gather moves a pixel's K values together.
    current = masks.new_empty(b, h * w, k)
    current.copy_(masks.reshape(b, k, h * w).transpose(1, 2))  # a copy even when K = 1
    gathered = current.new_empty(b, flat_index.numel(), k)
    for _ in range(num_iter):
        torch.index_select(current, 1, flat_index, out=gathered)
        torch.sum(gathered.view(b, -1, h * w, k).mul_(weights), dim=1, out=current)
    return current.transpose(1, 2).reshape(b, k, h, w)


def median3x3(labels: torch.Tensor) -> torch.Tensor:
    """3x3 median filter with a reflect border, as ``scipy.ndimage.median_filter(size=3)``.

    SciPy's ``reflect`` repeats the edge pixel, which for a radius of 1 is replicate padding.

    Args:
        labels: (..., H, W), any dtype torch can sort.

    Returns:
        (..., H, W), same dtype.
    """
    h, w = labels.shape[-2:]
    rows = torch.arange(h, device=labels.device)[:, None]
    cols = torch.arange(w, device=labels.device)[None, :]
    index = torch.stack(
        [
            ((rows + dr).clamp(0, h - 1) * w + (cols + dc).clamp(0, w - 1)).reshape(-1)
            for dr in (-1, 0, 1)
            for dc in (-1, 0, 1)
        ]
    )  # (9, HW)
    window = labels.flatten(-2)[..., index]  # (..., 9, HW)
    return window.sort(dim=-2).values[..., 4, :].reshape(labels.shape)


def refine_labels(
    image: torch.Tensor,
    labels: torch.Tensor,
    num_iter: int = 10,
    dilations: Sequence[int] = (1, 2, 4, 8),
    sigma_scale: float = 0.1,
) -> torch.Tensor:
    """DiffCut's refinement of a label map: one-hot, PAMR, argmax, 3x3 median.

    Each image has one channel per distinct label (sorted), so its output ids are the ranks
    of its labels in 0..K_b-1, as in the release's output (the median may
    remove a rank).

    Args:
        image: float (B, 3, S, S') on the labels' grid (DiffCut: RGB in [0, 1]).
        labels: integer (B, S, S').

    Returns:
        int64 (B, S, S'), on the labels' device.
    """
    out = []
    for img, lab in zip(image, labels, strict=True):
        values = torch.unique(lab)  # sorted
        onehot = (lab[None] == values[:, None, None]).to(img.dtype)  # (K, S, S')
        refined = pamr(img[None], onehot[None], num_iter, dilations, sigma_scale)
        out.append(median3x3(refined[0].argmax(dim=0)))
    return torch.stack(out).long()


def images_for_labels(images: Tensor, size: int | tuple[int, int]) -> Tensor:
    """The model input ``(B, 3, H, W)`` in [-1, 1] as RGB in [0, 1] on a ``size`` grid (bilinear,
    half-pixel centres, no antialias), float32: what PAMR looks at."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    rgb = (images.float() + 1) / 2
    if tuple(rgb.shape[-2:]) == size:
        return rgb
    return F.interpolate(rgb, size=size, mode="bilinear", align_corners=False, antialias=False)


def pamr_refine(labels: Tensor, features: Features) -> Tensor:
    """DiffCut's refinement (one-hot, PAMR with 10 iterations at dilations 1/2/4/8 and 0.1 sigma,
    argmax, 3x3 median) of ``labels`` ``(B, S, S)`` against the features' input images.

    Returns int64 ``(B, S, S)`` on the labels' device; ids are renumbered 0..K_b-1 per image.
    """
    if features.images is None:
        raise ValueError("PAMR refinement needs the input images (features.images)")
    image = images_for_labels(features.images, tuple(labels.shape[-2:])).to(labels.device)
    with torch.inference_mode():
        return refine_labels(image, labels).to(labels.device)
