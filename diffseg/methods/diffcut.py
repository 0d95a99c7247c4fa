"""DiffCut (Couairon et al., NeurIPS 2024): recursive normalized cut of one UNet layer's tokens.

Per image: the recursive cut of the token graph (:func:`diffseg.methods.ncut.ncut_labels`), then
concept assignment at the output size (:func:`diffseg.methods.ncut.assign_concepts`), then, when
``refine`` is on, PAMR on the input image (:func:`diffseg.ops.pamr.refine_labels`). The AutoSC
variant swaps the recursive cut for one spectral clustering with an eigengap choice of k.

Features are cast to float32 and L2-normalised over channels, as the release does; the graph
algebra runs on their device.

As a method of the engine, DiffCut asks for the output of the last self-attention module of the
UNet's down path (``attn1`` after its output projection, before the residual) at t = 50, with
Gaussian noise from a generator seeded 42 on the model's device, for the empty prompt; the UNet
stops right after that module (docs/diffcut.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..features import LAST_ENCODER_SELF_ATTENTION, FeatureRequest, Features
from ..ops.pamr import images_for_labels, refine_labels
from .base import MethodContext, RefiningMethod, check_hints, check_int, check_list, check_number
from .ncut import assign_concepts, autosc_labels, ncut_labels

__all__ = ["DiffCut", "DiffCutAutoSC", "pamr_input", "token_grid"]

#: The image PAMR compares pixels of (one helper for every method: ops/pamr.py).
pamr_input = images_for_labels

#: DiffCut's UNet pass: t = 50, noise from a generator seeded 42 (release constants).
DIFFCUT_TIMESTEP = 50
DIFFCUT_NOISE_SEED = 42


def token_grid(output: Tensor) -> Tensor:
    """A captured module output as a token grid: (B, N, C) tokens in row-major order (or an
    already spatial (B, C, h, w)) -> float32 (B, C, h, w), h = w = sqrt(N)."""
    if output.dim() == 4:
        return output.float()
    if output.dim() != 3:
        raise ValueError(f"expected a (B, N, C) module output, got {tuple(output.shape)}")
    b, n, c = output.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{n} tokens are not a square grid")
    return output.float().transpose(1, 2).reshape(b, c, side, side)


class _TokenSegmenter(RefiningMethod):
    """Shared pipeline: token labels per image, concept assignment, optional PAMR; and the
    method contract of the engine (:mod:`diffseg.methods`)."""

    #: Per-image inputs :meth:`segment` takes through ``hints`` (none).
    hints: tuple[str, ...] = ()

    def __init__(
        self,
        refine: bool,
        mask_size: int,
        pamr_iter: int = 10,
        pamr_dilations: Sequence[int] = (1, 2, 4, 8),
        layer: str = LAST_ENCODER_SELF_ATTENTION,
        timestep: int = DIFFCUT_TIMESTEP,
        noise_seed: int | None = DIFFCUT_NOISE_SEED,
    ) -> None:
        self.refine = bool(refine)
        self.mask_size = check_int("mask_size", mask_size, 1)
        self.pamr_iter = check_int("pamr_iter", pamr_iter, 0)
        dilation = lambda key, d: check_int(key, d, 1)  # noqa: E731
        self.pamr_dilations = tuple(check_list("pamr_dilations", pamr_dilations, dilation))
        self.layer = str(layer)
        self.timestep = check_int("timestep", timestep, 0, 999)
        self.noise_seed = None if noise_seed is None else check_int("noise_seed", noise_seed, 0)

    # -- the method contract -------------------------------------------------------------------

    def feature_request(self) -> FeatureRequest:
        """One module's output (by default the last down-path ``attn1``) at t = 50 with seeded
        noise, empty prompt."""
        return FeatureRequest(
            modules=(self.layer,), timestep=self.timestep, noise_seed=self.noise_seed
        )

    def features(self, backbone, images: Tensor) -> Tensor:
        """The token features its request defines: ``images`` (B, 3, H, W) in [-1, 1] through
        ``backbone`` (a :class:`diffseg.backbones.DiffusionBackbone`) -> float32 (B, C, h, w)
        (SSD-1B at 1024 px: (B, 1280, 32, 32))."""
        extracted = backbone.extract(images, self.feature_request())
        return token_grid(extracted.modules[self.layer])

    def refines(self) -> bool:
        """Whether the labels end with PAMR (``refine=True``)."""
        return self.refine

    def segment(
        self, features: Features, output_size: int | None = None, hints: dict | None = None
    ) -> Tensor:
        """Segment a batch from a feature pass: int64 (B, S, S) (see :meth:`segment_features`)."""
        return super().segment(features, output_size, hints)

    def segment_unrefined(
        self, features: Features, output_size: int | None = None, hints: dict | None = None
    ) -> Tensor:
        """:meth:`segment` without PAMR: the assigned labels, int64 (B, S, S)."""
        check_hints(self, hints)
        if self.layer not in features.modules:
            raise ValueError(f"these features hold no output of {self.layer!r}; request it")
        size = self.mask_size if output_size is None else int(output_size)
        return self._assign(token_grid(features.modules[self.layer]), size)

    def refine_labels(self, labels: Tensor, features: Features | Tensor) -> Tensor:
        """PAMR (with this instance's settings) of ``labels`` (B, S, S) against the input images
        (a :class:`Features`' ``images``, or the images themselves, (B, 3, H, W) in [-1, 1])."""
        images = features.images if isinstance(features, Features) else features
        if images is None:
            raise ValueError("PAMR needs the input images (B, 3, H, W) in [-1, 1]")
        image = images_for_labels(images.to(labels.device), labels.shape[-1])
        return refine_labels(image, labels, self.pamr_iter, self.pamr_dilations)

    def _assign(self, features: Tensor, size: int) -> Tensor:
        feats = F.normalize(features.float(), dim=1)
        return torch.stack([assign_concepts(f, self.token_labels(f), size) for f in feats])

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
        labels = self._assign(features, size)
        return self.refine_labels(labels, images) if self.refine else labels

    def _pamr_settings(self) -> dict[str, Any]:
        return {
            "refine": self.refine,
            "pamr_iter": self.pamr_iter,
            "pamr_dilations": list(self.pamr_dilations),
            "layer": self.layer,
            "timestep": self.timestep,
            "noise_seed": self.noise_seed,
        }

    def describe(self) -> dict[str, Any]:
        """JSON-able settings."""
        raise NotImplementedError


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
        layer: the UNet module whose output is the feature (a name, or the alias of the last
            down-path self-attention).
        timestep, noise_seed: the UNet pass (t = 50, noise seed 42; None = no noise).
        partial_eigh: on the CPU, compute only the two smallest eigenpairs (about 3x faster
            eigen-decompositions; off by default: the release decomposes fully, and on graphs
            with a repeated second eigenvalue the two may split differently).
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
        layer: str = LAST_ENCODER_SELF_ATTENTION,
        timestep: int = DIFFCUT_TIMESTEP,
        noise_seed: int | None = DIFFCUT_NOISE_SEED,
        partial_eigh: bool = False,
    ) -> None:
        super().__init__(refine, mask_size, pamr_iter, pamr_dilations, layer, timestep, noise_seed)
        self.tau = check_number("tau", tau, 0)
        self.alpha = check_number("alpha", alpha, 0, lo_open=True)
        self.num_thresholds = check_int("num_thresholds", num_thresholds, 1)
        self.partial_eigh = bool(partial_eigh)

    @classmethod
    def defaults(cls, context: MethodContext) -> dict[str, Any]:
        """The authors' threshold: 0.2 on SD 1.x/2.x backbones, 0.5 on the SDXL family."""
        return {"tau": 0.2 if context.backbone_family == "sd" else 0.5}

    def token_labels(self, features: Tensor) -> Tensor:
        """Recursive-cut leaves: features float (C, h, w) -> int64 (h, w) in 0..K-1."""
        return ncut_labels(features, self.tau, self.alpha, self.num_thresholds, self.partial_eigh)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tau": self.tau,
            "alpha": self.alpha,
            "num_thresholds": self.num_thresholds,
            "partial_eigh": self.partial_eigh,
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
        layer: str = LAST_ENCODER_SELF_ATTENTION,
        timestep: int = DIFFCUT_TIMESTEP,
        noise_seed: int | None = DIFFCUT_NOISE_SEED,
    ) -> None:
        super().__init__(refine, mask_size, pamr_iter, pamr_dilations, layer, timestep, noise_seed)
        positive = lambda key, a: check_number(key, a, 0, lo_open=True)  # noqa: E731
        self.alphas = tuple(check_list("alphas", alphas, positive))
        self.vectors_of_best = bool(vectors_of_best)

    def token_labels(self, features: Tensor) -> Tensor:
        """Spectral clusters: features float (C, h, w) -> int64 (h, w)."""
        return autosc_labels(features, self.alphas, self.vectors_of_best)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "alphas": list(self.alphas),
            "vectors_of_best": self.vectors_of_best,
            "mask_size": self.mask_size,
            **self._pamr_settings(),
        }
