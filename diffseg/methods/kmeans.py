"""K-Means baselines of the paper (docs/diffseg.md section 8): K-Means-C and K-Means-S.

Both cluster the same aggregated attention as DiffSeg (the 4096 maps of 64x64, as 4096-d vectors,
Euclidean K-Means) and turn the cluster means into labels with DiffSeg's NMS (bilinear upsampling
+ argmax). K-Means-C uses a constant number of clusters (6); K-Means-S uses, per image, the number
of distinct ground-truth classes, passed to :meth:`KMeansSegmentor.segment` as ``num_clusters``.

Initialisation is seeded k-means++ with the same seed for every image, so an image's result does
not depend on the batch it came in. With fewer distinct maps than clusters (e.g. uniform
attention), k-means++ stops at the number of distinct maps: fewer segments, no error.
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
from ..ops.kmeans import cluster_means, kmeans
from .base import Method, check_hints, check_int, check_list, check_number
from .merging import proposals_to_labels

__all__ = ["KMeansC", "KMeansS", "KMeansSegmentor", "kmeans_c", "kmeans_s"]


class KMeansSegmentor(Method):
    """K-Means over aggregated self-attention maps.

    Args:
        num_clusters: clusters per image (K-Means-C: 6); None for K-Means-S, where ``segment``
            needs ``num_clusters`` per image.
        seed: k-means++ seed (deterministic results for a given seed).
        weights, resolutions, map_size: aggregation settings, as :class:`diffseg.DiffSeg`.
        max_iter, tol: Lloyd settings (scikit-learn's defaults).
    """

    any_output_shape = True  # the proposals are upsampled to any (h, w)

    def __init__(
        self,
        num_clusters: int | None = 6,
        seed: int = 0,
        weights: WeightsArg = "proportional",
        resolutions: Sequence[int] | None = None,
        map_size: int | None = None,
        max_iter: int = 300,
        tol: float = 1e-4,
        timestep: int | None = None,
    ) -> None:
        if num_clusters is not None:
            num_clusters = check_int("num_clusters", num_clusters, 1)
        seed = check_int("seed", seed, 0)
        if map_size is not None:
            map_size = check_int("map_size", map_size, 1)
        if resolutions is not None:
            resolutions = check_list("resolutions", resolutions, lambda k, v: check_int(k, v, 1))
        if isinstance(weights, str):
            resolution_weights([1], weights)  # reject unknown names now, not at the first image
        max_iter = check_int("max_iter", max_iter, 1)
        tol = check_number("tol", tol, 0)
        if timestep is not None:
            timestep = check_int("timestep", timestep, 0, 999)
        self.num_clusters = None if num_clusters is None else int(num_clusters)
        self.seed = int(seed)
        self.weights = weights
        self.resolutions = None if resolutions is None else [int(r) for r in resolutions]
        self.map_size = None if map_size is None else int(map_size)
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.timestep = None if timestep is None else int(timestep)

    @property
    def hints(self) -> tuple[str, ...]:
        """Per-image inputs :meth:`segment` takes: K-Means-S needs ``num_classes``."""
        return ("num_classes",) if self.num_clusters is None else ()

    def feature_request(self) -> FeatureRequest:
        """The same pass as DiffSeg: self-attention of every layer, no noise, empty prompt."""
        grids = ALL if self.resolutions is None else tuple(self.resolutions)
        return FeatureRequest(self_attention=grids, timestep=self.timestep)

    @property
    def name(self) -> str:
        return "kmeans_s" if self.num_clusters is None else "kmeans_c"

    def describe(self) -> dict[str, Any]:
        """JSON-able settings."""
        weights = weights_json(self.weights)
        return {
            "name": self.name,
            "num_clusters": self.num_clusters,
            "seed": self.seed,
            "weights": weights,
            "resolutions": self.resolutions,
            "map_size": self.map_size,
            "max_iter": self.max_iter,
            "tol": self.tol,
            "timestep": self.timestep,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "name")
        return f"KMeansSegmentor({args})"

    def _counts(self, batch: int, num_clusters: int | Sequence[int] | Tensor | None) -> list[int]:
        if self.num_clusters is not None:
            return [self.num_clusters] * batch  # K-Means-C: a given per-image count is ignored
        if num_clusters is None:
            raise ValueError(
                "K-Means-S (num_clusters=None) needs segment(..., num_clusters=[k_1, ..., k_B]): "
                "the number of ground-truth classes in each image"
            )
        if isinstance(num_clusters, Tensor):
            num_clusters = num_clusters.flatten().tolist()
        counts = (
            [int(num_clusters)] * batch
            if isinstance(num_clusters, int)
            else [int(k) for k in num_clusters]
        )
        if len(counts) != batch:
            raise ValueError(
                f"num_clusters has {len(counts)} entries for a batch of {batch} images"
            )
        if any(k < 0 for k in counts):
            raise ValueError(f"num_clusters must be >= 0, got {counts}")
        # An image without labelled pixels has 0 classes; it still gets one segment.
        return [max(k, 1) for k in counts]

    def propose(
        self,
        maps: Features | Mapping[int, Tensor],
        num_clusters: int | Sequence[int] | Tensor | None = None,
    ) -> list[Tensor]:
        """Cluster means per image: a list of ``(K_b, n, n)`` float32 tensors, ``K_b <= k_b``."""
        maps = attention_of(maps)
        n = self.map_size or max(int(r) for r in (self.resolutions or maps))
        batch, res = validate_maps(maps, self.resolutions, n, self.check_inputs)
        w = resolution_weights(res, self.weights)
        counts = self._counts(batch, num_clusters)
        out = []
        for b in range(batch):
            one = {r: maps[r][b : b + 1] for r in res}
            flat = _aggregate(one, 1, w, n, self.check_inputs).reshape(n * n, n * n)
            km = kmeans(flat, counts[b], max_iter=self.max_iter, tol=self.tol, seed=self.seed)
            out.append(cluster_means(flat, km.labels, km.centers.shape[0]).reshape(-1, n, n))
        return out

    def segment(
        self,
        features: Features | Mapping[int, Tensor],
        output_size: int = 512,
        hints: Mapping[str, Any] | None = None,
        *,
        num_clusters: int | Sequence[int] | Tensor | None = None,
    ) -> Tensor:
        """Segment a batch.

        Args:
            features: a :class:`Features` with self-attention, or ``{r: (B, r*r, r*r)}``.
            output_size: side ``S`` of the label maps.
            hints: K-Means-S: ``{"num_classes": B ints}``, the classes labelled in each image
                (0 gives one segment). K-Means-C takes none.
            num_clusters: the same as ``hints["num_classes"]``, by keyword.

        Returns:
            int64 ``(B, S, S)`` segment ids on the device of the maps.
        """
        hints = check_hints(self, hints)
        if num_clusters is None:
            num_clusters = hints.get("num_classes")
        props = self.propose(features, num_clusters)
        return torch.stack([proposals_to_labels(p, output_size) for p in props])


class KMeansC(KMeansSegmentor):
    """K-Means-C as a config target: a constant number of clusters (6 in the paper)."""

    def __init__(self, num_clusters: int = 6, **kwargs: Any) -> None:
        super().__init__(num_clusters=num_clusters, **kwargs)


class KMeansS(KMeansSegmentor):
    """K-Means-S as a config target: as many clusters as ground-truth classes in each image."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(num_clusters=None, **kwargs)


def kmeans_c(num_clusters: int = 6, **kwargs: Any) -> KMeansSegmentor:
    """K-Means-C: a constant number of clusters (6 in the paper)."""
    return KMeansSegmentor(num_clusters=num_clusters, **kwargs)


def kmeans_s(**kwargs: Any) -> KMeansSegmentor:
    """K-Means-S: as many clusters as ground-truth classes in each image (given to ``segment``)."""
    return KMeansSegmentor(num_clusters=None, **kwargs)
