"""K-Means (Lloyd) in PyTorch, on any device, following scikit-learn's semantics.

Used by DiffSeg's optional refinement (K-Means over the 4096 aggregated maps, initialised with the
merged proposals, one init: ``sklearn.cluster.KMeans(init=proposals, n_init=1)`` in the release)
and by the K-Means-C / K-Means-S baselines (seeded k-means++ init).

The loop mirrors scikit-learn's ``_kmeans_single_lloyd`` so that both give the same result on the
same input and init:

- tolerance: ``tol * mean(var(x, axis=0))`` (population variance), compared with the sum of
  squared centre shifts of one iteration;
- stop early on *strict convergence* (labels unchanged since the previous iteration), otherwise
  after the shift drops to the tolerance or after ``max_iter`` iterations; if not strictly
  converged, points are relabelled with the final centres;
- an empty cluster takes the point farthest from its own centre (scikit-learn's relocation).

It works on one set of points at a time (``(N, D)``); callers loop over images, since the number
of clusters varies per image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["KMeansResult", "cluster_means", "kmeans", "kmeans_plusplus", "squared_distances"]


@dataclass
class KMeansResult:
    """Outcome of :func:`kmeans`.

    Attributes:
        centers: ``(K, D)`` cluster centres, dtype of the input.
        labels: ``(N,)`` int64 index of each point's closest centre, in ``[0, K)``.
        inertia: sum of squared distances of the points to their centres.
        n_iter: Lloyd iterations run.
        converged: True when it stopped before ``max_iter`` (labels stable or shift <= tol).
    """

    centers: Tensor
    labels: Tensor
    inertia: float
    n_iter: int
    converged: bool


def squared_distances(x: Tensor, centers: Tensor) -> Tensor:
    """Squared Euclidean distances ``(N, K)`` between ``x (N, D)`` and ``centers (K, D)``.

    Uses ``|x|^2 - 2 x.c + |c|^2`` (one matrix product), clamped at 0 against rounding.
    """
    d = torch.addmm((centers * centers).sum(1).unsqueeze(0), x, centers.T, beta=1.0, alpha=-2.0)
    d += (x * x).sum(1, keepdim=True)
    return d.clamp_min_(0)


def _assign(x: Tensor, centers: Tensor) -> Tensor:
    # |x|^2 does not change the argmin, so it is left out.
    scores = torch.addmm((centers * centers).sum(1).unsqueeze(0), x, centers.T, alpha=-2.0)
    return scores.argmin(1)


def _update(x: Tensor, labels: Tensor, centers_old: Tensor) -> Tensor:
    """New centres: the mean of each cluster; an empty cluster takes the farthest point."""
    k = centers_old.shape[0]
    sums = torch.zeros_like(centers_old).index_add_(0, labels, x)
    counts = torch.bincount(labels, minlength=k).to(x.dtype)
    empty = torch.nonzero(counts == 0).flatten()
    if empty.numel() > 0:
        # As scikit-learn: the points farthest from their (old) centres seed the empty clusters,
        # and are taken out of the sums of the clusters they came from.
        far = ((x - centers_old[labels]) ** 2).sum(1)
        far_idx = torch.topk(far, empty.numel()).indices
        for new_id, idx in zip(empty.tolist(), far_idx.tolist(), strict=True):
            old_id = int(labels[idx])
            sums[old_id] -= x[idx]
            counts[old_id] -= 1
            sums[new_id] = x[idx]
            counts[new_id] = 1
    return sums / counts.clamp_min(1).unsqueeze(1)


def kmeans_plusplus(
    x: Tensor,
    k: int,
    generator: torch.Generator | None = None,
    seed: int = 0,
    n_local_trials: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Greedy k-means++ seeding (as scikit-learn's), deterministic given ``seed``/``generator``.

    Args:
        x: ``(N, D)`` float points.
        k: number of centres wanted, ``>= 1``.
        generator: a CPU ``torch.Generator``; made from ``seed`` when None.
        seed: seed used when no generator is given.
        n_local_trials: candidates tried per centre; ``2 + int(log(k))`` when None.

    Returns:
        ``(centers (K', D), indices (K',) int64)`` with ``K' <= k``: seeding stops early when every
        point coincides with a chosen centre (fewer distinct points than ``k``), so the centres are
        always distinct points of ``x``.
    """
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(
            f"kmeans_plusplus expects points of shape (N, D) with N >= 1, got {tuple(x.shape)}"
        )
    if k < 1:
        raise ValueError(f"kmeans_plusplus needs k >= 1, got {k}")
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    trials = n_local_trials if n_local_trials is not None else 2 + int(math.log(k))

    def dist_to(idx: Tensor) -> Tensor:
        # Differences, not the |x|^2 - 2x.c + |c|^2 form, so duplicates are exactly at distance 0.
        d = torch.cdist(x[idx.to(x.device)], x, compute_mode="donot_use_mm_for_euclid_dist")
        return d * d

    first = torch.randint(n, (1,), generator=generator)
    chosen = [int(first)]
    closest = dist_to(first)[0].double().cpu()  # (N,), float64 on CPU for the sampling
    pot = float(closest.sum())
    while len(chosen) < k and pot > 0:
        cum = torch.cumsum(closest, 0)
        rand = torch.rand(trials, generator=generator, dtype=torch.float64) * pot
        cand = torch.searchsorted(cum, rand).clamp_max(n - 1)
        cand_d = torch.minimum(closest.unsqueeze(0), dist_to(cand).double().cpu())  # (T, N)
        cand_pot = cand_d.sum(1)
        best = int(cand_pot.argmin())
        chosen.append(int(cand[best]))
        closest = cand_d[best]
        pot = float(cand_pot[best])
    idx = torch.tensor(chosen, dtype=torch.long, device=x.device)
    return x[idx].clone(), idx


def kmeans(
    x: Tensor,
    k: int | None = None,
    init: Tensor | str = "k-means++",
    max_iter: int = 300,
    tol: float = 1e-4,
    seed: int = 0,
) -> KMeansResult:
    """Lloyd's K-Means on ``x (N, D)`` with scikit-learn's stopping rules (see module docstring).

    Args:
        x: ``(N, D)`` floating points, any device; computations stay in its dtype and device.
        k: number of clusters; required for ``init="k-means++"``, must match ``init`` if given.
        init: ``(K, D)`` initial centres, or ``"k-means++"`` (seeded by ``seed``; may give fewer
            than ``k`` centres when ``x`` has fewer distinct points).
        max_iter: maximum Lloyd iterations (scikit-learn's default 300).
        tol: relative tolerance on the centre shift (scikit-learn's default 1e-4).
        seed: seed of the k-means++ init.

    Returns:
        :class:`KMeansResult`.

    Equivalent to ``sklearn.cluster.KMeans(n_clusters=K, init=init, n_init=1, max_iter=max_iter,
    tol=tol, algorithm="lloyd")`` up to floating-point rounding.
    """
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"kmeans expects points of shape (N, D) with N >= 1, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"kmeans expects floating-point points, got dtype {x.dtype}")
    if max_iter < 1:
        raise ValueError(f"kmeans needs max_iter >= 1, got {max_iter}")
    if isinstance(init, str):
        if init != "k-means++":
            raise ValueError(f"kmeans init must be 'k-means++' or a (K, D) tensor, got {init!r}")
        if k is None or k < 1:
            raise ValueError(f"kmeans with init='k-means++' needs k >= 1, got {k}")
        centers, _ = kmeans_plusplus(x, k, seed=seed)
    else:
        if init.ndim != 2 or init.shape[1] != x.shape[1] or init.shape[0] == 0:
            raise ValueError(
                f"kmeans init must have shape (K, {x.shape[1]}) with K >= 1, got {tuple(init.shape)}"
            )
        if k is not None and k != init.shape[0]:
            raise ValueError(f"kmeans got k={k} but init has {init.shape[0]} centres")
        centers = init.to(device=x.device, dtype=x.dtype).clone()

    tol_abs = float(x.var(0, unbiased=False).mean()) * tol if tol > 0 else 0.0
    labels_old: Tensor | None = None
    strict = False
    n_iter = 0
    converged = False
    labels = torch.empty(0)
    for it in range(max_iter):
        n_iter = it + 1
        labels = _assign(x, centers)
        new_centers = _update(x, labels, centers)
        shift = float(((new_centers - centers) ** 2).sum())
        centers = new_centers
        if labels_old is not None and torch.equal(labels, labels_old):
            strict = converged = True
            break
        if shift <= tol_abs:
            converged = True
            break
        labels_old = labels
    if not strict:
        labels = _assign(x, centers)
    inertia = float(squared_distances(x, centers).gather(1, labels.unsqueeze(1)).sum())
    return KMeansResult(centers, labels, inertia, n_iter, converged)


def cluster_means(x: Tensor, labels: Tensor, k: int) -> Tensor:
    """Means of the non-empty clusters: ``(N, D)`` points with ``(N,)`` labels in ``[0, k)`` give
    ``(K', D)``, ``K' <= k``, in label order (empty clusters dropped). DiffSeg's refinement and the
    K-Means baselines both turn a final clustering into proposals this way."""
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, labels, x)
    sizes = torch.bincount(labels, minlength=k)
    keep = sizes > 0
    return sums[keep] / sizes[keep].unsqueeze(1).to(x.dtype)
