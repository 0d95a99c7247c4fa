"""DiffSeg: unsupervised segmentation by merging Stable Diffusion self-attention maps.

The steps of docs/diffseg.md sections 4 and 5, each a function usable on its own (ablations, tests;
step 1 in :mod:`diffseg.ops.aggregation`, shared with the K-Means baselines, steps 2-5 in
:mod:`diffseg.methods.merging`):

1. :func:`aggregate_attention` -- the per-resolution attention ``{64: (B,4096,4096), 32: ...,
   16: ..., 8: ...}`` becomes one tensor ``(B, 4096, 64, 64)``: 4096 key maps of 64x64, one per
   query position, each a probability map (sums to 1).
2. :func:`first_merge` -- iteration 1: for each of the ``M*M`` anchors, the mean of all maps
   within symmetric-KL distance ``tau`` of the anchor's map.
3. :func:`greedy_merge` -- iterations 2..N: one greedy pass over the proposals
   (:func:`greedy_groups` is the pure sequential rule).
4. :func:`refine_proposals` -- optional K-Means refinement (off by default, as in the release).
5. :func:`proposals_to_labels` -- "NMS": bilinear upsampling of every proposal, then argmax.

:class:`DiffSeg` chains them with the release's defaults.

Distances: :func:`~diffseg.methods.merging.symmetric_kl` (float32 matrix products).

Zero probabilities: the KL needs strictly positive maps. Float32 softmax of real attention is
positive, and bilinear upsampling and the weighted sum keep it so; the aggregated tensor is zero
only where *every* used resolution is exactly zero, which happens with float16 attention
(softmax underflow). That is refused with a clear error by default (the release would produce
NaNs there); ``DiffSeg(min_prob=1e-12)`` floors such maps explicitly instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..features import ALL, FeatureRequest, Features
from ..ops.aggregation import (
    WeightsArg,
    _aggregate,
    attention_of,
    resolution_weights,
    validate_maps,
    weights_json,
)
from .base import (
    MethodContext,
    ParameterError,
    RefiningMethod,
    check_hints,
    check_int,
    check_list,
    check_number,
)
from .merging import anchor_indices, iterative_merge, proposals_to_labels, refine_proposals

__all__ = ["DiffSeg"]


class DiffSeg(RefiningMethod):
    """DiffSeg with the release's defaults (docs/diffseg.md sections 4-5; other backbones'
    grids: section 9).

    Args:
        kl_threshold: ``tau``; a float is used for every iteration, a list gives one per iteration
            (as the release takes them). 1.1 for COCO-Stuff-27, 0.9 for Cityscapes.
        num_iterations: number of merging iterations; 3 by default, or the list's length.
        num_points: anchors per side ``M`` (``M*M`` anchors).
        refine: K-Means refinement of the proposals (off for every paper number).
        weights: aggregation weights (:func:`resolution_weights`), ``"proportional"`` by default.
        resolutions: attention grids to use; all of the maps' grids when None.
        map_size: side of the aggregated grid; None = the largest grid of the maps (SD v1 at 512:
            64; SD 2.1 at 768: 96; the SDXL family at 1024: 64, from its grids 64 and 32).
        min_prob: None (default) refuses aggregated maps with zero entries; a float floors them at
            ``min_prob`` and renormalises (for float16 attention that underflows to 0).
        refine_max_iter, refine_tol: K-Means settings of the refinement (scikit-learn's defaults).
        timestep: the diffusion timestep of its feature request; None = the backbone's (300).
        pamr: refine the labels with PAMR as DiffCut does (its Table 1 row "DiffSeg" with
            threshold 1 + PAMR); off in DiffSeg's own protocol. Needs :class:`Features` with
            the input images.

    ``segment(maps)`` processes the images of a batch one after the other: the aggregated maps of
    one image are ``map_size**4`` floats (64 MB at 64) and the number of proposals varies per image.
    Set ``check_inputs = False`` to skip the input checks that wait for the device (the engine
    checks the first batch of a run only).
    """

    name = "diffseg"
    #: Per-image inputs :meth:`segment` takes through ``hints`` (none).
    hints: tuple[str, ...] = ()

    def __init__(
        self,
        kl_threshold: float | Sequence[float] = 1.1,
        num_iterations: int | None = None,
        num_points: int = 16,
        refine: bool = False,
        weights: WeightsArg = "proportional",
        resolutions: Sequence[int] | None = None,
        map_size: int | None = None,
        min_prob: float | None = None,
        refine_max_iter: int = 300,
        refine_tol: float = 1e-4,
        timestep: int | None = None,
        pamr: bool = False,
    ) -> None:
        self.thresholds = _thresholds(kl_threshold, num_iterations)
        num_points = check_int("num_points", num_points, 1)
        if map_size is not None:
            map_size = check_int("map_size", map_size, 1)
            if num_points > map_size:
                raise ParameterError(
                    f"num_points={num_points} is invalid: it must be in [1, map_size={map_size}]"
                )
        if min_prob is not None:
            min_prob = check_number("min_prob", min_prob, 0, 1, lo_open=True, hi_open=True)
        if isinstance(weights, str):
            resolution_weights([1], weights)  # reject unknown names now, not at the first image
        if resolutions is not None:
            resolutions = check_list("resolutions", resolutions, lambda k, v: check_int(k, v, 1))
        refine_max_iter = check_int("refine_max_iter", refine_max_iter, 1)
        refine_tol = check_number("refine_tol", refine_tol, 0)
        if timestep is not None:
            timestep = check_int("timestep", timestep, 0, 999)
        self.num_points = int(num_points)
        self.refine = bool(refine)
        self.weights = weights
        self.resolutions = None if resolutions is None else [int(r) for r in resolutions]
        self.map_size = None if map_size is None else int(map_size)
        self.min_prob = min_prob
        self.refine_max_iter = int(refine_max_iter)
        self.refine_tol = float(refine_tol)
        self.timestep = None if timestep is None else int(timestep)
        self.pamr = bool(pamr)
        self.check_inputs = True
        self._anchors: dict[int, Tensor] = {}

    @property
    def kl_threshold(self) -> float | list[float]:
        """The threshold as given: one float when all iterations share it."""
        return self.thresholds[0] if len(set(self.thresholds)) == 1 else list(self.thresholds)

    @property
    def num_iterations(self) -> int:
        return len(self.thresholds)

    def feature_request(self) -> FeatureRequest:
        """Self-attention of every layer (or of :attr:`resolutions`), no noise, empty prompt."""
        grids = ALL if self.resolutions is None else tuple(self.resolutions)
        return FeatureRequest(self_attention=grids, timestep=self.timestep)

    def describe(self) -> dict[str, Any]:
        """JSON-able settings."""
        weights = weights_json(self.weights)
        return {
            "name": self.name,
            "kl_threshold": self.thresholds,
            "num_iterations": self.num_iterations,
            "num_points": self.num_points,
            "refine": self.refine,
            "weights": weights,
            "resolutions": self.resolutions,
            "map_size": self.map_size,
            "min_prob": self.min_prob,
            "refine_max_iter": self.refine_max_iter,
            "refine_tol": self.refine_tol,
            "timestep": self.timestep,
            "pamr": self.pamr,
        }

    @classmethod
    def defaults(cls, context: MethodContext) -> dict[str, Any]:
        """The release's thresholds: 0.9 on Cityscapes, 1.1 elsewhere (COCO-Stuff-27)."""
        return {"kl_threshold": 0.9 if context.dataset == "cityscapes" else 1.1}

    def refines(self) -> bool:
        """Whether the labels end with PAMR (``pamr=True``)."""
        return self.pamr

    @property
    def any_output_shape(self) -> bool:
        """(h, w) labels are upsampled proposals, so any shape works; PAMR compares the labels
        with the square model input, so with it only square ones do."""
        return not self.pamr

    # -- steps ---------------------------------------------------------------------------------

    def grid_size(self, maps: Mapping[int, Tensor]) -> int:
        """The aggregated grid's side for ``maps``: ``map_size``, or their largest grid."""
        if self.map_size is not None:
            return self.map_size
        return max(int(r) for r in (self.resolutions or maps))

    def anchors(self, size: int) -> Tensor:
        """Flat anchor indices on a ``size`` grid (:func:`anchor_indices`), cached."""
        if size not in self._anchors:
            self._anchors[size] = anchor_indices(self.num_points, size)
        return self._anchors[size]

    def _positive(self, flat: Tensor) -> Tensor:
        if self.min_prob is not None:
            flat = flat.clamp_min(self.min_prob)
            return flat / flat.sum(-1, keepdim=True)
        if not self.check_inputs:
            return flat
        lo = flat.amin()
        if not bool(lo > 0):
            n_zero = int((flat <= 0).sum())
            raise ValueError(
                f"the aggregated attention has {n_zero} zero entries (zero in every resolution "
                "used), where the KL divergence is undefined. This comes from float16 attention "
                "underflowing: compute attention in float32, or set DiffSeg(min_prob=1e-12) to "
                "floor the maps."
            )
        return flat

    def merge(self, aggregated: Tensor) -> list[Tensor]:
        """Merging (+ refinement if on) of aggregated maps.

        Args:
            aggregated: ``(B, n*n, n, n)`` from :func:`aggregate_attention` (or ``(n*n, n, n)``).

        Returns:
            One ``(K_b, n, n)`` float32 proposal tensor per image.
        """
        if aggregated.ndim == 3:
            aggregated = aggregated.unsqueeze(0)
        n = aggregated.shape[-1]
        if aggregated.ndim != 4 or aggregated.shape[1:] != (n * n, n, n):
            raise ValueError(
                f"merge expects aggregated maps (B, n*n, n, n), got {tuple(aggregated.shape)}"
            )
        out = []
        for img in aggregated:
            flat = self._positive(img.reshape(n * n, n * n).float())
            props = iterative_merge(flat, self.anchors(n), self.thresholds)
            if self.refine:
                props = refine_proposals(flat, props, self.refine_max_iter, self.refine_tol)
            out.append(props.reshape(-1, n, n))
        return out

    def nms(self, proposals: Tensor | Sequence[Tensor], output_size: int = 512) -> Tensor:
        """:func:`proposals_to_labels`."""
        return proposals_to_labels(proposals, output_size)

    def propose(self, maps: Features | Mapping[int, Tensor]) -> list[Tensor]:
        """Aggregate + merge, image by image: one ``(K_b, n, n)`` proposal tensor per image."""
        maps = attention_of(maps)
        size = self.grid_size(maps)
        if self.num_points > size:
            raise ValueError(f"num_points={self.num_points} exceeds the {size}x{size} map grid")
        batch, res = validate_maps(maps, self.resolutions, size, self.check_inputs)
        w = resolution_weights(res, self.weights)
        out = []
        for b in range(batch):
            one = {r: maps[r][b : b + 1] for r in res}
            out.extend(self.merge(_aggregate(one, 1, w, size, self.check_inputs)))
        return out

    def segment(
        self,
        features: Features | Mapping[int, Tensor],
        output_size: int = 512,
        hints: Mapping[str, Any] | None = None,
    ) -> Tensor:
        """Segment a batch.

        Args:
            features: a :class:`Features` with self-attention, or the maps themselves
                ``{r: (B, r*r, r*r)}`` (see :func:`aggregate_attention`).
            output_size: side ``S`` of the label maps.
            hints: per-image extra inputs; DiffSeg takes none (a key is an error).

        Returns:
            int64 ``(B, S, S)`` segment ids (proposal indices) on the device of the maps.
        """
        return super().segment(features, output_size, hints)

    def segment_unrefined(
        self,
        features: Features | Mapping[int, Tensor],
        output_size: int = 512,
        hints: Mapping[str, Any] | None = None,
    ) -> Tensor:
        """:meth:`segment` without the PAMR step: ``(B, S, S)`` int64."""
        check_hints(self, hints)
        return torch.stack([self.nms(p, output_size) for p in self.propose(features)])

    def refine_labels(self, labels: Tensor, features: Features) -> Tensor:
        """PAMR refinement of ``labels`` (B, S, S) against the features' input images."""
        from ..ops.pamr import pamr_refine

        if not isinstance(features, Features):
            raise ValueError("DiffSeg(pamr=True) needs Features with the input images")
        return pamr_refine(labels, features)


def _thresholds(kl_threshold: Any, num_iterations: Any) -> list[float]:
    """One positive threshold per iteration, from a number (3 iterations unless given) or a
    list (its length is the number of iterations)."""
    if num_iterations is not None:
        num_iterations = check_int("num_iterations", num_iterations, 1)
    positive = lambda key, v: check_number(key, v, 0, lo_open=True)  # noqa: E731
    if isinstance(kl_threshold, str) or not isinstance(kl_threshold, Sequence):
        return [positive("kl_threshold", kl_threshold)] * (num_iterations or 3)
    taus = check_list("kl_threshold", kl_threshold, positive)
    if num_iterations is not None and num_iterations != len(taus):
        raise ParameterError(
            f"kl_threshold={taus} is invalid with num_iterations={num_iterations}: give one "
            "threshold per iteration or a single number"
        )
    return taus
