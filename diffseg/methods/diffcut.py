"""DiffCut (Couairon et al., NeurIPS 2024): recursive normalized cut of one UNet layer's tokens.

Per image: the recursive cut of the token graph (:func:`diffseg.ncut.ncut_labels`), then
concept assignment at the output size (:func:`diffseg.ncut.assign_concepts`), then, when
``refine`` is on, PAMR on the input image (:func:`diffseg.pamr.refine_labels`). The AutoSC
variant swaps the recursive cut for one spectral clustering with an eigengap choice of k.

Features are cast to float32 and L2-normalised over channels, as the release does; the graph
algebra runs on their device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ncut import assign_concepts, autosc_labels, ncut_labels
from ..pamr import refine_labels

__all__ = ["DiffCut", "DiffCutAutoSC", "pamr_input"]


def pamr_input(images: Tensor, size: int) -> Tensor:
    """Model input (B, 3, H, W) in [-1, 1] -> float32 RGB in [0, 1] on a (size, size) grid
    (bilinear, half-pixel centres, no antialias): the image PAMR compares pixels of."""
    rgb = (images.float() + 1) / 2
    return F.interpolate(
        rgb, size=(size, size), mode="bilinear", align_corners=False, antialias=False
    )


class _TokenSegmenter:
    """Shared pipeline: token labels per image, concept assignment, optional PAMR."""

    def __init__(
        self,
        refine: bool,
        mask_size: int,
        pamr_iter: int = 10,
        pamr_dilations: Sequence[int] = (1, 2, 4, 8),
    ) -> None:
        self.refine = bool(refine)
        self.mask_size = int(mask_size)
        self.pamr_iter = int(pamr_iter)
        self.pamr_dilations = tuple(int(d) for d in pamr_dilations)

    def token_labels(self, features: Tensor) -> Tensor:
        """Segments of one image's tokens: features float (C, h, w), normalised -> int64 (h, w)."""
        raise NotImplementedError

    @torch.no_grad()
    def segment_features(
        self, features: Tensor, output_size: int | None = None, images: Tensor | None = None
    ) -> Tensor:
        """Segment a batch from its token features.

        Args:
            features: float (B, C, h, w), one layer's output on its token grid.
            output_size: side S of the label maps; None means ``mask_size`` (128).
            images: float (B, 3, H, W) in [-1, 1], the model input; needed when ``refine``.

        Returns:
            int64 (B, S, S) on the features' device. Without refinement the ids are the token
            segments' ranks; with it, the ranks of the assigned ids (0..K_b-1 per image).
            Either way an id may win no pixel.
        """
        if features.dim() != 4:
            raise ValueError(f"features must be (B, C, h, w), got {tuple(features.shape)}")
        if self.refine and images is None:
            raise ValueError("refine=True needs the input images (B, 3, H, W) in [-1, 1]")
        size = self.mask_size if output_size is None else int(output_size)
        feats = F.normalize(features.float(), dim=1)
        labels = torch.stack([assign_concepts(f, self.token_labels(f), size) for f in feats])
        if not self.refine:
            return labels
        image = pamr_input(images.to(labels.device), size)
        return refine_labels(image, labels, self.pamr_iter, self.pamr_dilations)

    def _pamr_settings(self) -> dict[str, Any]:
        return {
            "refine": self.refine,
            "pamr_iter": self.pamr_iter,
            "pamr_dilations": list(self.pamr_dilations),
        }

    def describe(self) -> dict[str, Any]:
        """JSON-able settings."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "method")
        return f"{type(self).__name__}({args})"


class DiffCut(_TokenSegmenter):
    """DiffCut with the release's defaults.

    Args:
        tau: a split is kept when its normalized cut is below tau (0.5; the paper uses 0.2
            for SD v1.4).
        alpha: affinity exponent.
        refine: PAMR after the assignment (on in the paper's main table).
        mask_size: default output side (the release evaluates at 128).
        num_thresholds: split candidates per node.
        pamr_iter, pamr_dilations: PAMR settings (10 iterations at 1, 2, 4, 8).
    """

    name = "diffcut"

    def __init__(
        self,
        tau: float = 0.5,
        alpha: float = 10,
        refine: bool = True,
        mask_size: int = 128,
        num_thresholds: int = 100,
        pamr_iter: int = 10,
        pamr_dilations: Sequence[int] = (1, 2, 4, 8),
    ) -> None:
        super().__init__(refine, mask_size, pamr_iter, pamr_dilations)
        self.tau = float(tau)
        self.alpha = alpha
        self.num_thresholds = int(num_thresholds)

    def token_labels(self, features: Tensor) -> Tensor:
        """Recursive-cut leaves: features float (C, h, w) -> int64 (h, w) in 0..K-1."""
        return ncut_labels(features, self.tau, self.alpha, self.num_thresholds)

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "tau": self.tau,
            "alpha": self.alpha,
            "num_thresholds": self.num_thresholds,
            "mask_size": self.mask_size,
            **self._pamr_settings(),
        }


class DiffCutAutoSC(_TokenSegmenter):
    """DiffCut's AutoSC ablation (paper Table 2): spectral clustering, k by the eigengap.

    Args:
        alphas: affinity exponents tried; the one with the largest eigengap sets k.
        vectors_of_best: cluster the best alpha's eigenvectors; False (the release) takes
            the last alpha's.
        refine: PAMR after the assignment (off in the paper's AutoSC row).
        mask_size, pamr_iter, pamr_dilations: as for :class:`DiffCut`.
    """

    name = "diffcut_autosc"

    def __init__(
        self,
        alphas: Sequence[float] = (1, 5, 10, 15),
        vectors_of_best: bool = False,
        refine: bool = False,
        mask_size: int = 128,
        pamr_iter: int = 10,
        pamr_dilations: Sequence[int] = (1, 2, 4, 8),
    ) -> None:
        super().__init__(refine, mask_size, pamr_iter, pamr_dilations)
        self.alphas = tuple(alphas)
        self.vectors_of_best = bool(vectors_of_best)

    def token_labels(self, features: Tensor) -> Tensor:
        """Spectral clusters: features float (C, h, w) -> int64 (h, w)."""
        return autosc_labels(features, self.alphas, self.vectors_of_best)

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "alphas": list(self.alphas),
            "vectors_of_best": self.vectors_of_best,
            "mask_size": self.mask_size,
            **self._pamr_settings(),
        }
