"""PAMR label refinement as a final step any method can take (DiffCut, and DiffSeg under
DiffCut's protocol), and the split that background datasets need.

A method that refines its labels exposes ``refines_labels`` (True when its refinement is on),
``segment_unrefined(features, output_size, hints)`` and ``refine_labels(labels, features)``, with
``segment == refine_labels(segment_unrefined(...))``. On datasets with a background class the
engine merges the background between the two (docs/diffcut.md: the release's order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..features import Features

__all__ = ["images_for_labels", "pamr_refine"]


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
    from ..pamr import refine_labels

    if features.images is None:
        raise ValueError("PAMR refinement needs the input images (features.images)")
    image = images_for_labels(features.images, tuple(labels.shape[-2:])).to(labels.device)
    with torch.inference_mode():
        return refine_labels(image, labels).to(labels.device)
