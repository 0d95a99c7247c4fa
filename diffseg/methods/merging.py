"""DiffSeg's numerics after aggregation (docs/diffseg.md section 5): symmetric KL distances,
the anchor grid, iterative merging, the optional K-Means refinement and the "NMS" (upsampling +
argmax) that turns proposals into labels. Each step is a function usable on its own.

Distances use :func:`symmetric_kl`, which expands
``D(x, y) = 1/2 [sum x log x + sum y log y - x . log y - y . log x]`` so that all pairwise distances
are two matrix products in float32 (the release broadcasts ``(256, 4096, 64, 64)`` in float16).

Precision: the KL cross terms reach tens (``x . log y`` with ``log y`` near -40), so the products
need true float32. On CUDA, leave TF32 matmuls off (torch's default;
``torch.backends.cuda.matmul.allow_tf32 = True`` or ``set_float32_matmul_precision("high")``
would make distance errors of about 1e-2 near the threshold).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.kmeans import cluster_means, kmeans

__all__ = [
    "anchor_indices",
    "anchor_points",
    "first_merge",
    "greedy_groups",
    "greedy_merge",
    "iterative_merge",
    "proposals_to_labels",
    "refine_proposals",
    "symmetric_kl",
    "symmetric_kl_reference",
]


# --------------------------------------------------------------------------------------------
# Distances
# --------------------------------------------------------------------------------------------


def _rowdot(x: Tensor, y: Tensor) -> Tensor:
    """``sum(x * y, -1)`` for ``(..., D)`` tensors, without a full-size temporary."""
    return (x.unsqueeze(-2) @ y.unsqueeze(-1)).squeeze(-1).squeeze(-1)


def _skl(p: Tensor, logp: Tensor, hp: Tensor, q: Tensor, logq: Tensor, hq: Tensor) -> Tensor:
    """Symmetric KL from precomputed logs and ``h = sum x log x``: ``(..., N, D) x (..., M, D)``."""
    out = hp.unsqueeze(-1) + hq.unsqueeze(-2)
    if out.ndim == 2:
        out.addmm_(p, logq.mT, alpha=-1).addmm_(logp, q.mT, alpha=-1)
    else:
        out.baddbmm_(p, logq.mT, alpha=-1).baddbmm_(logp, q.mT, alpha=-1)
    return out.mul_(0.5)


def _check_positive(x: Tensor, name: str) -> None:
    lo, hi = torch.aminmax(x)
    if not (bool(lo > 0) and bool(torch.isfinite(hi))):
        n_bad = int((~(x > 0)).sum() + (~torch.isfinite(x)).sum())
        raise ValueError(
            f"{name} must be strictly positive and finite for the KL divergence: found {n_bad} "
            f"entries that are not (min {float(lo):.3g}). Zeros come from float16 softmax "
            "underflow; compute attention in float32, or floor the maps (DiffSeg(min_prob=1e-12))."
        )


def symmetric_kl(p: Tensor, q: Tensor, validate: bool = True) -> Tensor:
    """All pairwise symmetric KL divergences, by matrix products.

    ``D(x, y) = 1/2 sum x (log x - log y) + 1/2 sum y (log y - log x)``
    ``       = 1/2 [sum x log x + sum y log y - x . log y - y . log x]``.

    Args:
        p: ``(B, N, D)`` or ``(N, D)`` strictly positive distributions (rows).
        q: ``(B, M, D)`` or ``(M, D)``, same leading shape and ``D``.
        validate: check shapes and strict positivity (one pass over each input).

    Returns:
        ``(B, N, M)`` (or ``(N, M)``) float tensor; float32 for float32 inputs. Rounding can make
        values of (near-)identical rows slightly negative (about 1e-6).
    """
    if validate:
        if p.ndim not in (2, 3) or q.ndim != p.ndim:
            raise ValueError(
                f"symmetric_kl expects p (B, N, D) and q (B, M, D) (or both 2-D); got p "
                f"{tuple(p.shape)} and q {tuple(q.shape)}"
            )
        if p.shape[-1] != q.shape[-1] or p.shape[:-2] != q.shape[:-2]:
            raise ValueError(
                f"symmetric_kl: p {tuple(p.shape)} and q {tuple(q.shape)} must share the batch and "
                "the last (distribution) dimension"
            )
        _check_positive(p, "symmetric_kl input p")
        _check_positive(q, "symmetric_kl input q")
    logp, logq = p.log(), q.log()
    return _skl(p, logp, _rowdot(p, logp), q, logq, _rowdot(q, logq))


def symmetric_kl_reference(p: Tensor, q: Tensor, chunk: int = 64) -> Tensor:
    """The direct broadcasting formula (as the release computes it), for tests and benchmarks.

    Same contract as :func:`symmetric_kl`; memory ``chunk * M * D`` per step; slow.
    """
    squeeze = p.ndim == 2
    if squeeze:
        p, q = p.unsqueeze(0), q.unsqueeze(0)
    outs = []
    for i in range(0, p.shape[1], chunk):
        x = p[:, i : i + chunk, None, :]
        y = q[:, None, :, :]
        quotient = x.log() - y.log()
        outs.append((x * quotient).sum(-1) / 2 - (y * quotient).sum(-1) / 2)
    out = torch.cat(outs, dim=1)
    return out[0] if squeeze else out


# --------------------------------------------------------------------------------------------
# Merging (docs/diffseg.md section 5)
# --------------------------------------------------------------------------------------------


def anchor_points(num_points: int = 16, size: int = 64) -> Tensor:
    """The ``M x M`` anchor grid on a ``size x size`` query grid, as ``(M*M, 2)`` int64 (row, col).

    Step ``s = (size-1) // (M-1)``, start ``((size-1) - s*(M-1)) // 2``; for M=16, size=64 the rows
    and columns are ``{1, 5, ..., 61}``. Row-major order (``meshgrid(..., indexing="ij")``).
    """
    if num_points < 1 or num_points > size:
        raise ValueError(
            f"num_points must be in [1, {size}] for a {size}x{size} grid, got {num_points}"
        )
    if num_points == 1:
        coords = torch.tensor([(size - 1) // 2])
    else:
        step = (size - 1) // (num_points - 1)
        start = ((size - 1) - step * (num_points - 1)) // 2
        coords = start + step * torch.arange(num_points)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    return torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1)


def anchor_indices(num_points: int = 16, size: int = 64) -> Tensor:
    """Flat query indices ``row * size + col`` of :func:`anchor_points`, ``(M*M,)`` int64."""
    pts = anchor_points(num_points, size)
    return pts[:, 0] * size + pts[:, 1]


def first_merge(
    maps: Tensor,
    anchors: Tensor,
    threshold: float,
    log_maps: Tensor | None = None,
    neg_entropy: Tensor | None = None,
) -> Tensor:
    """Iteration 1: for every anchor, the mean of all maps within KL distance ``threshold``.

    Args:
        maps: ``(N, D)`` or ``(B, N, D)`` strictly positive maps (rows), e.g. the aggregated
            attention flattened to ``(4096, 4096)``. Not validated here.
        anchors: ``(K,)`` int64 row indices of the anchors (:func:`anchor_indices`).
        threshold: ``tau > 0``; a map joins anchor ``a`` when ``D(maps[a], map) < tau``. The
            anchor's own map always joins (its distance is 0 up to rounding).
        log_maps, neg_entropy: ``log(maps)`` and ``sum(maps * log(maps), -1)`` if already known.

    Returns:
        ``(K, D)`` (or ``(B, K, D)``) proposals, in anchor order.

    Cost: three ``(K x N) @ (N x D)`` products (two for the distances, one for the means).
    """
    if log_maps is None:
        log_maps = maps.log()
    if neg_entropy is None:
        neg_entropy = _rowdot(maps, log_maps)
    anchors = anchors.to(maps.device)
    a, loga, ha = (
        t.index_select(-2 if t.ndim == maps.ndim else -1, anchors)
        for t in (maps, log_maps, neg_entropy)
    )
    dist = _skl(a, loga, ha, maps, log_maps, neg_entropy)  # (..., K, N)
    member = dist < threshold
    member[..., torch.arange(anchors.numel(), device=maps.device), anchors] = True
    member = member.to(maps.dtype)
    return (member @ maps) / member.sum(-1, keepdim=True)


def greedy_groups(close: np.ndarray | Tensor) -> np.ndarray:
    """The greedy pass of iterations 2..N on a precomputed "is close" relation.

    Args:
        close: ``(K, K)`` bool, ``close[i, j] = D(p_i, p_j) < tau``.

    Returns:
        ``(G, K)`` bool: one row per emitted proposal, marking the proposals averaged into it.

    Rule (the release's): visit ``i = 0..K-1`` in order; skip ``i`` if it is marked; otherwise
    mark ``i`` and every ``j`` close to ``i`` -- *including already-marked ones*, which are
    absorbed again -- and emit the group ``{i} + {j : close[i, j]}``.
    """
    close = close.cpu().numpy() if isinstance(close, Tensor) else np.asarray(close)
    close = close.astype(bool)
    k = close.shape[0]
    if close.shape != (k, k):
        raise ValueError(f"greedy_groups expects a square (K, K) matrix, got {close.shape}")
    marked = np.zeros(k, dtype=bool)
    groups = []
    for i in range(k):
        if marked[i]:
            continue
        group = close[i].copy()
        group[i] = True
        marked |= group
        groups.append(group)
    return np.stack(groups) if groups else np.zeros((0, k), dtype=bool)


def greedy_merge(proposals: Tensor, threshold: float) -> Tensor:
    """One greedy merging pass (iterations 2..N) over ``(K, D)`` positive proposals.

    All ``K x K`` distances come from one :func:`symmetric_kl` (matrix products on the proposals'
    device). The pass itself is inherently sequential (whether ``i`` starts a group depends on
    the groups before it), so it runs in :func:`greedy_groups` on a small CPU boolean matrix
    (``K <= 256``: microseconds per step); the group means are then one matrix product.

    Returns:
        ``(G, D)`` merged proposals, ``G <= K``, in the order their groups were opened.
    """
    if proposals.ndim != 2:
        raise ValueError(f"greedy_merge expects proposals (K, D), got {tuple(proposals.shape)}")
    dist = symmetric_kl(proposals, proposals, validate=False)
    groups = torch.from_numpy(greedy_groups(dist < threshold)).to(proposals.device, proposals.dtype)
    return (groups @ proposals) / groups.sum(1, keepdim=True)


def _check_thresholds(thresholds: float | Sequence[float]) -> list[float]:
    taus = (
        [float(thresholds)]
        if isinstance(thresholds, int | float)
        else [float(t) for t in thresholds]
    )
    if not taus or any(not (t > 0) or not math.isfinite(t) for t in taus):
        raise ValueError(f"KL thresholds must be positive finite numbers, got {thresholds!r}")
    return taus


def iterative_merge(maps: Tensor, anchors: Tensor, thresholds: Sequence[float]) -> Tensor:
    """All merging iterations for one image: :func:`first_merge` with ``thresholds[0]``, then one
    :func:`greedy_merge` per further threshold.

    Args:
        maps: ``(N, D)`` strictly positive maps of one image.
        anchors: ``(K,)`` anchor row indices.
        thresholds: one ``tau`` per iteration.

    Returns:
        ``(G, D)`` proposals.
    """
    taus = _check_thresholds(thresholds)
    props = first_merge(maps, anchors, taus[0])
    for tau in taus[1:]:
        props = greedy_merge(props, tau)
    return props


def refine_proposals(
    maps: Tensor, proposals: Tensor, max_iter: int = 300, tol: float = 1e-4
) -> Tensor:
    """Optional refinement: K-Means over the ``(N, D)`` maps initialised with ``(K, D)`` proposals
    (one init, as ``sklearn KMeans(init=proposals, n_init=1)``); the new proposals are the means of
    the maps in each final cluster (empty clusters dropped), ``(K', D)`` with ``K' <= K``."""
    result = kmeans(maps, init=proposals, max_iter=max_iter, tol=tol)
    return cluster_means(maps, result.labels, proposals.shape[0])


# --------------------------------------------------------------------------------------------
# NMS (docs/diffseg.md section 5)
# --------------------------------------------------------------------------------------------


def _labels_one(props: Tensor, size: tuple[int, int], chunk: int) -> Tensor:
    if props.ndim == 2:  # (K, h*w) flattened square maps
        side = math.isqrt(props.shape[1])
        if side * side != props.shape[1]:
            raise ValueError(
                f"flattened proposals need a square number of pixels, got {props.shape[1]}"
            )
        props = props.reshape(props.shape[0], side, side)
    if props.ndim != 3 or props.shape[0] == 0:
        raise ValueError(
            f"proposals of one image must be (K, h, w) with K >= 1, got {tuple(props.shape)}"
        )
    props = props.float()
    best = None
    label = None
    # Chunks over proposals keep memory at chunk * H * W floats (K can be 256 before merging).
    for start in range(0, props.shape[0], chunk):
        up = F.interpolate(
            props[None, start : start + chunk], size=size, mode="bilinear", align_corners=False
        )[0]
        val, idx = up.max(0)
        if best is None:
            best, label = val, idx
        else:
            better = val > best  # strict: ties keep the lower index, as a single argmax would
            best = torch.where(better, val, best)
            label = torch.where(better, idx + start, label)
    assert label is not None
    return label


def proposals_to_labels(
    proposals: Tensor | Sequence[Tensor], output_size: int | tuple[int, int] = 512, chunk: int = 32
) -> Tensor:
    """NMS: upsample every proposal bilinearly (half-pixel, no antialias) and take the argmax.

    Args:
        proposals: ``(K, h, w)`` for one image, ``(B, K, h, w)``, or a list of ``(K_b, h, w)``
            (the number of proposals varies per image). ``(K, h*w)`` flattened maps are accepted.
        output_size: side ``S`` (or ``(H, W)``) of the label map.
        chunk: proposals upsampled at once (memory bound only; the result does not depend on it).

    Returns:
        int64 labels on the proposals' device: ``(S, S)`` for one image, ``(B, S, S)`` otherwise.
        Segment ids are proposal indices (not renumbered; an id may be unused).
    """
    size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"output_size must be a positive int or (H, W), got {output_size!r}")
    if isinstance(proposals, Tensor):
        if proposals.ndim == 4:
            return torch.stack([_labels_one(p, size, chunk) for p in proposals])
        return _labels_one(proposals, size, chunk)
    return torch.stack([_labels_one(p, size, chunk) for p in proposals])
