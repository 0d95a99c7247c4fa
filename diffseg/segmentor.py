"""DiffSeg: unsupervised segmentation by merging Stable Diffusion self-attention maps.

The steps of docs/diffseg.md sections 4 and 5, each a function usable on its own (ablations, tests):

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

Distances use :func:`symmetric_kl`, which expands
``D(x, y) = 1/2 [sum x log x + sum y log y - x . log y - y . log x]`` so that all pairwise distances
are two matrix products in float32 (the release broadcasts ``(256, 4096, 64, 64)`` in float16).

Zero probabilities: the KL needs strictly positive maps. Float32 softmax of real attention is
positive, and bilinear upsampling and the weighted sum keep it so; the aggregated tensor is zero
only where *every* used resolution is exactly zero, which happens with float16 attention
(softmax underflow). That is refused with a clear error by default (the release would produce
NaNs there); ``DiffSeg(min_prob=1e-12)`` floors such maps explicitly instead.

Precision: the KL cross terms reach tens (``x . log y`` with ``log y`` near -40), so the products
need true float32. On CUDA, leave TF32 matmuls off (torch's default;
``torch.backends.cuda.matmul.allow_tf32 = True`` or ``set_float32_matmul_precision("high")``
would make distance errors of about 1e-2 near the threshold).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .features import ALL, FeatureRequest, Features
from .kmeans import cluster_means, kmeans

__all__ = [
    "DEFAULT_RESOLUTIONS",
    "DiffSeg",
    "aggregate_attention",
    "anchor_indices",
    "anchor_points",
    "attention_of",
    "check_hints",
    "first_merge",
    "greedy_groups",
    "greedy_merge",
    "iterative_merge",
    "proposals_to_labels",
    "refine_proposals",
    "resolution_weights",
    "symmetric_kl",
    "symmetric_kl_reference",
    "validate_maps",
]

DEFAULT_RESOLUTIONS = (64, 32, 16, 8)

WeightsArg = str | Sequence[float] | Mapping[int, float]


# --------------------------------------------------------------------------------------------
# Aggregation (docs/diffseg.md section 4)
# --------------------------------------------------------------------------------------------


def resolution_weights(
    resolutions: Sequence[int], weights: WeightsArg = "proportional"
) -> dict[int, float]:
    """Aggregation weight of every resolution, normalised to sum to 1.

    Args:
        resolutions: token-grid sides used, e.g. ``[64, 32, 16, 8]``.
        weights: ``"proportional"`` (weight ``r``: the release's ``[64, 32, 16, 8] / 120``),
            ``"uniform"``, a sequence aligned with ``resolutions``, or a dict ``{r: weight}``.
            Weights must be finite and ``>= 0`` with a positive sum; a weight of 0 drops that
            resolution.

    Returns:
        ``{r: w_r}`` with ``sum(w_r) == 1``, in the order of ``resolutions``.
    """
    res = [int(r) for r in resolutions]
    if not res:
        raise ValueError("resolution_weights needs at least one resolution")
    if isinstance(weights, str):
        if weights == "proportional":
            raw = [float(r) for r in res]
        elif weights in ("uniform", "equal"):
            raw = [1.0] * len(res)
        else:
            raise ValueError(
                f"weights={weights!r} is not understood: use 'proportional', 'uniform', a list "
                f"aligned with resolutions {res}, or a dict {{resolution: weight}}"
            )
    elif isinstance(weights, Mapping):
        w = {int(k): float(v) for k, v in weights.items()}
        missing = [r for r in res if r not in w]
        if missing:
            raise ValueError(
                f"weights dict {w} has no entry for resolution(s) {missing} (used: {res})"
            )
        raw = [w[r] for r in res]
    else:
        raw = [float(v) for v in weights]
        if len(raw) != len(res):
            raise ValueError(
                f"got {len(raw)} weights {raw} for {len(res)} resolutions {res}; give one weight "
                "per resolution, in the same order"
            )
    if any(not math.isfinite(v) or v < 0 for v in raw) or sum(raw) <= 0:
        raise ValueError(
            f"aggregation weights must be finite, >= 0 and not all 0; got {raw} for {res}"
        )
    total = sum(raw)
    return {r: v / total for r, v in zip(res, raw, strict=True)}


def validate_maps(
    maps: Mapping[int, Tensor],
    resolutions: Sequence[int] | None = None,
    out_res: int = 64,
    check_values: bool = True,
) -> tuple[int, list[int]]:
    """Check an attention dict and return ``(batch_size, resolutions_used)``.

    ``maps[r]`` must be a floating tensor ``(B, r*r, r*r)`` (query, key), finite and ``>= 0``, with
    the same ``B`` and device for every ``r``, and ``out_res % r == 0``. ``resolutions=None`` uses
    every key of ``maps`` (largest first). Raises ``ValueError`` naming the offending key.
    ``check_values=False`` skips the value checks, the only ones that wait for the device.
    """
    if not isinstance(maps, Mapping) or len(maps) == 0:
        raise ValueError(
            "maps must be a non-empty dict {resolution: (B, r*r, r*r) tensor}, e.g. the output of "
            f"StableDiffusionBackbone.attention_maps; got {type(maps).__name__}"
        )
    res = (
        sorted((int(r) for r in maps), reverse=True)
        if resolutions is None
        else [int(r) for r in resolutions]
    )
    if not res:
        raise ValueError(
            "resolutions is empty: name at least one attention resolution to aggregate"
        )
    batch = None
    device = None
    for r in res:
        if r not in maps:
            raise ValueError(f"maps has no resolution {r}; it holds {sorted(maps)}")
        m = maps[r]
        if not isinstance(m, Tensor):
            raise ValueError(f"maps[{r}] must be a torch.Tensor, got {type(m).__name__}")
        if m.ndim != 3 or m.shape[1] != r * r or m.shape[2] != r * r:
            hint = " (add a batch axis with .unsqueeze(0))" if m.ndim == 2 else ""
            raise ValueError(
                f"maps[{r}] must have shape (B, {r * r}, {r * r}) = (batch, query, key) for a "
                f"{r}x{r} token grid; got {tuple(m.shape)}{hint}"
            )
        if not m.is_floating_point():
            raise ValueError(
                f"maps[{r}] must be floating point (attention probabilities), got {m.dtype}"
            )
        if r < 1 or r > out_res or out_res % r != 0:
            raise ValueError(
                f"resolution {r} does not divide the output grid {out_res} (maps[{r}])"
            )
        if m.shape[0] == 0:
            raise ValueError(f"maps[{r}] has an empty batch")
        if batch is None:
            batch, device = m.shape[0], m.device
        elif m.shape[0] != batch:
            raise ValueError(
                f"maps[{r}] has batch size {m.shape[0]} but maps[{res[0]}] has {batch}"
            )
        elif m.device != device:
            raise ValueError(f"maps[{r}] is on {m.device} but maps[{res[0]}] is on {device}")
        if not check_values:
            continue
        lo, hi = torch.aminmax(m)
        if not (bool(lo >= 0) and bool(torch.isfinite(hi))):
            n_neg = int((m < 0).sum())
            n_bad = int((~torch.isfinite(m)).sum())
            raise ValueError(
                f"maps[{r}] must hold attention probabilities (finite, >= 0): found {n_neg} negative "
                f"and {n_bad} non-finite entries (min {float(lo):.3g}). Pass softmax outputs, not "
                "logits."
            )
    assert batch is not None
    return batch, res


def aggregate_attention(
    maps: Mapping[int, Tensor],
    weights: WeightsArg = "proportional",
    resolutions: Sequence[int] | None = None,
    out_res: int = 64,
) -> Tensor:
    """Aggregate multi-resolution self-attention into ``out_res**2`` maps of ``out_res x out_res``.

    For each resolution ``r`` (docs/diffseg.md section 4): every key map ``(r, r)`` is upsampled
    bilinearly to ``(out_res, out_res)`` (half-pixel centres, no antialias, as Keras
    ``UpSampling2D``) and renormalised to sum to 1; the query grid is tiled by nearest repetition
    (query ``(y, x)`` of the output grid takes query ``(y // s, x // s)`` of ``r``,
    ``s = out_res // r``); the results are summed with :func:`resolution_weights`.

    Args:
        maps: ``{r: (B, r*r, r*r)}`` attention probabilities (rows are queries, columns keys), e.g.
            ``{64: (B,4096,4096), 32: (B,1024,1024), 16: (B,256,256), 8: (B,64,64)}``.
        weights: see :func:`resolution_weights`; renormalised over the resolutions used.
        resolutions: which keys of ``maps`` to use; all when None.
        out_res: side of the output grid (64 for SD v1 at 512x512).

    Returns:
        float32 ``(B, out_res**2, out_res, out_res)`` on the device of ``maps``: row
        ``q = y * out_res + x`` is the key map of query ``(y, x)``; each map sums to 1.
    """
    batch, res = validate_maps(maps, resolutions, out_res)
    return _aggregate(maps, batch, resolution_weights(res, weights), out_res)


def weights_json(weights: WeightsArg) -> str | list[float] | dict[str, float]:
    """The aggregation ``weights`` argument as JSON-able data (for ``describe()`` and results)."""
    if isinstance(weights, str):
        return weights
    if isinstance(weights, Mapping):
        return {str(k): float(v) for k, v in weights.items()}
    return [float(v) for v in weights]


def _aggregate(
    maps: Mapping[int, Tensor],
    batch: int,
    w: dict[int, float],
    out_res: int,
    check_values: bool = True,
) -> Tensor:
    """:func:`aggregate_attention` on validated maps, with normalised weights ``{r: w_r}``
    (``check_values=False``: no check for all-zero key maps, which waits for the device)."""
    res = list(w)
    n = out_res * out_res

    def scaled_keys(r: int) -> tuple[Tensor, Tensor]:
        """Upsampled keys (B, r, r, n) of resolution r and their factor w_r / sum (B, r, r, 1)."""
        keys = maps[r].reshape(batch * r * r, 1, r, r).float()
        if r != out_res:
            keys = F.interpolate(
                keys, size=(out_res, out_res), mode="bilinear", align_corners=False
            )
        keys = keys.reshape(batch, r, r, n)
        sums = keys.sum(-1, keepdim=True)
        if check_values and bool((sums <= 0).any()):
            b, qy, qx, _ = (int(i) for i in torch.nonzero(sums <= 0)[0])
            raise ValueError(
                f"maps[{r}] has a key map with zero total attention (image {b}, query row "
                f"{qy * r + qx}); every row must be a probability distribution"
            )
        return keys, w[r] / sums

    # The coarse resolutions are summed on the coarsest query grid that holds them, from coarse
    # to fine (tiling nests: query y of grid r_big takes y // (r_big // r_small) of r_small), so
    # the full (n, n) tensor is written once, by the final fused multiply-add. Memory: the output
    # plus the upsampled keys of one coarse resolution (a quarter of the output at 32).
    acc: Tensor | None = None  # (B, g, g, n) on query grid g
    g = 0
    for r in sorted(r for r in res if w[r] > 0 and r != out_res):
        keys, scale = scaled_keys(r)
        keys.mul_(scale)  # keys is a fresh tensor (interpolate's output)
        if acc is None:
            acc, g = keys, r
        elif r % g == 0:
            t = r // g
            keys.view(batch, g, t, g, t, n).add_(acc.view(batch, g, 1, g, 1, n))
            acc, g = keys, r
        else:  # grids that do not nest: tile what we have to the output grid
            t = out_res // g
            acc = (
                acc.view(batch, g, 1, g, 1, n)
                .expand(batch, g, t, g, t, n)
                .reshape(batch, out_res, out_res, n)
            )
            g = out_res
            t = out_res // r
            acc.view(batch, r, t, r, t, n).add_(keys.view(batch, r, 1, r, 1, n))
    if w.get(out_res, 0) > 0:
        keys, scale = scaled_keys(out_res)
        if acc is None:
            out = keys * scale
        else:
            t = out_res // g
            shape = (batch, g, t, g, t, n)
            out = torch.addcmul(
                acc.view(batch, g, 1, g, 1, n),
                keys.view(shape),
                scale.view(batch, g, t, g, t, 1),
            )
    else:
        assert acc is not None
        t = out_res // g
        out = acc.view(batch, g, 1, g, 1, n).expand(batch, g, t, g, t, n).contiguous()
    return out.view(batch, n, out_res, out_res)


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


# --------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------


def attention_of(features: Features | Mapping[int, Tensor]) -> Mapping[int, Tensor]:
    """The ``{grid: (B, N, N)}`` self-attention of a :class:`Features` (or the dict itself)."""
    if isinstance(features, Features):
        if not features.self_attention:
            raise ValueError("these features hold no self-attention maps; request them first")
        return features.self_attention
    return features


class DiffSeg:
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
        if isinstance(kl_threshold, int | float):
            n = 3 if num_iterations is None else int(num_iterations)
            if n < 1:
                raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
            taus = [float(kl_threshold)] * n
        else:
            taus = [float(t) for t in kl_threshold]
            if num_iterations is not None and int(num_iterations) != len(taus):
                raise ValueError(
                    f"kl_threshold lists {len(taus)} thresholds {taus} but num_iterations="
                    f"{num_iterations}; give one threshold per iteration or a single float"
                )
        self.thresholds = _check_thresholds(taus)
        if num_points < 1 or (map_size is not None and num_points > map_size):
            raise ValueError(f"num_points must be in [1, map_size={map_size}], got {num_points}")
        if min_prob is not None and not (0 < min_prob < 1):
            raise ValueError(f"min_prob must be None or in (0, 1), got {min_prob}")
        if isinstance(weights, str):
            resolution_weights([1], weights)  # reject unknown names now, not at the first image
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

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "name")
        return f"DiffSeg({args})"

    @property
    def refines_labels(self) -> bool:
        """Whether :meth:`segment` ends with a label refinement (PAMR)."""
        return self.pamr

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
        labels = self.segment_unrefined(features, output_size, hints)
        return self.refine_labels(labels, features) if self.pamr else labels

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
        from .methods.refine import pamr_refine

        if not isinstance(features, Features):
            raise ValueError("DiffSeg(pamr=True) needs Features with the input images")
        return pamr_refine(labels, features)


def check_hints(method: Any, hints: Mapping[str, Any] | None) -> dict[str, Any]:
    """``hints`` as a dict, or ``ValueError`` for a key ``method.hints`` does not list."""
    hints = dict(hints or {})
    unknown = sorted(set(hints) - set(getattr(method, "hints", ())))
    if unknown:
        takes = ", ".join(method.hints) or "none"
        raise ValueError(f"{type(method).__name__} takes no hint {unknown} (it takes: {takes})")
    return hints
