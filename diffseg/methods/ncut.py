"""DiffCut's graph partitioning of a token grid: recursive normalized cut, concept assignment, AutoSC.

Tokens are the columns of a feature matrix ``(C, N)``, ``N = h * w`` in row-major order. The
graph is dense: ``W = minmax(X^T X) ** alpha`` on the L2-normalised features ``X``, computed once.

Recursive cut (as released by DiffCut's authors):

* A branch knows the set of *painted* tokens (already given to other branches). Its active
  nodes are the unpainted tokens, except, below the top level, any token whose row of ``W``
  holds an exact zero: such a token is never split again (it stays in the leaf of the last
  split that took it). At least the two tokens of the minimum cosine are such tokens.
* On the active sub-graph ``A`` (degrees ``d``), ``y = D^-1/2 v`` with ``v`` the eigenvector of
  the second-smallest eigenvalue of ``D^-1/2 (D - A) D^-1/2``, signed so that its entry of
  largest magnitude is positive. Candidates ``P_t = {y > t}`` for ``t`` in
  ``linspace(0.99 min y, 0.99 max y, 100)``; the first of minimum normalized cut wins, and the
  split is kept when that cut is below ``tau``. Then the branch recurses into ``P`` first and
  into the rest second.
* Every kept ``P`` is a mask; the leaves are the distinct mask memberships, numbered in the
  order the release's weighted sums give them.

The eigen-decomposition runs in the features' dtype (float32 for DiffCut, as in the release)
on their device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.linalg import qr, svd

__all__ = [
    "affinity_matrix",
    "assign_concepts",
    "autosc_labels",
    "best_threshold_cut",
    "cluster_qr",
    "eigengap",
    "fiedler_vector",
    "leaves_to_labels",
    "ncut_labels",
    "ncut_reference",
    "recursive_ncut",
    "threshold_cut_loop",
    "threshold_candidates",
]


def affinity_matrix(features: torch.Tensor, alpha: float = 10) -> torch.Tensor:
    """Dense token affinity ``minmax(X^T X) ** alpha``.

    Args:
        features: float (C, N), one column per token (normalised here over C).
        alpha: the exponent that sharpens the graph (DiffCut: 10).

    Returns:
        float (N, N) in [0, 1], the same dtype and device; min-max over the whole matrix.
    """
    x = F.normalize(features, p=2, dim=0)
    s = x.T @ x
    s = (s - s.min()) / (s.max() - s.min())
    return s**alpha


def _normalized_laplacian(a: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``D^-1/2 (D - A) D^-1/2`` and ``D^-1/2`` as a vector; a (n, n), d (n,)."""
    d_inv_sqrt = 1 / d.sqrt()
    lap = -a
    lap.diagonal().add_(d)
    # Row then column scaling: the same products as multiplying by dense diagonal matrices.
    return d_inv_sqrt[:, None] * lap * d_inv_sqrt[None, :], d_inv_sqrt


def _sign_flip(u: torch.Tensor) -> torch.Tensor:
    """u times the sign of its entry of largest magnitude; u (..., n) -> (..., n)."""
    idx = u.abs().argmax(dim=-1, keepdim=True)
    return u * torch.gather(u, -1, idx).sign()


def fiedler_vector(a: torch.Tensor, d: torch.Tensor, partial: bool = False) -> torch.Tensor | None:
    """Generalised Fiedler vector ``y`` of the graph: ``(D - A) y = lambda_2 D y``.

    Args:
        a: float (n, n) symmetric affinity, n > 1.
        d: float (n,) its row sums.

    Returns:
        float (n,) ``D^-1/2 v`` for the eigenvector ``v`` of the second-smallest eigenvalue of
        the normalized Laplacian (full ``eigh``; ``partial``: see :func:`second_eigenvector`),
        signed so that its largest-magnitude entry is positive; None when the solver fails.
    """
    lap, d_inv_sqrt = _normalized_laplacian(a, d)
    try:
        vector = second_eigenvector(lap, partial)
    except (torch.linalg.LinAlgError, np.linalg.LinAlgError, ValueError):
        return None
    return _sign_flip(d_inv_sqrt * vector)


def second_eigenvector(lap: torch.Tensor, partial: bool = False) -> torch.Tensor:
    """The eigenvector of the second-smallest eigenvalue of a symmetric (n, n) matrix, (n,).

    By default the full ``torch.linalg.eigh`` on the matrix's device, as the release. With
    ``partial`` on the CPU, LAPACK's MRRR solver computes only the two smallest eigenpairs
    (scipy's ``eigh(subset_by_index=[0, 1])``): about 3x faster at n = 1024, the same vector to
    float32 rounding on ordinary graphs; but where the second eigenvalue is (nearly) repeated,
    e.g. clusters with no affinity between them, the two solvers may return different vectors
    of that eigenspace and so different splits.
    """
    if not partial or lap.device.type != "cpu":
        return torch.linalg.eigh(lap)[1][:, 1]
    from scipy.linalg import eigh

    _, vectors = eigh(lap.numpy(), subset_by_index=[0, 1], driver="evr", check_finite=True)
    return torch.from_numpy(np.ascontiguousarray(vectors[:, 1])).to(lap.dtype)


def threshold_candidates(y: torch.Tensor, num: int = 100) -> torch.Tensor:
    """``linspace(0.99 min y, 0.99 max y, num)``: float (num,) on y's device."""
    return torch.linspace(0.99 * y.min(), 0.99 * y.max(), num, device=y.device, dtype=y.dtype)


def _ncut_of_partitions(x: torch.Tensor, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Normalized cut of every column of x, as ``z^T (D - A) z / z^T D z``.

    Args:
        x: float (n, T) of 0/1, one candidate side P per column.
        a: float (n, n); d: float (n,) its row sums.

    Returns:
        float (T,): ``cut(P, Q) (1 / vol P + 1 / vol Q)``; NaN where P is empty or everything
        (the formula's 0/0 or inf * 0, forced as rounding can hide it).
    """
    size = x.sum(dim=0)
    degenerate = (size == 0) | (size == x.shape[0])
    s = 2 * x - 1
    k = (d[:, None] * (s > 0)).sum(dim=0) / d.sum()
    b = k / (1 - k)
    z = (1 + s) - b * (1 - s)  # 2 on P, -2b on Q
    lap = -a
    lap.diagonal().add_(d)
    numerator = (z * (lap @ z)).sum(dim=0)  # one matrix product for all candidates
    denominator = (z * (d[:, None] * z)).sum(dim=0)
    return torch.where(degenerate, torch.nan, numerator / denominator)


def best_threshold_cut(
    y: torch.Tensor, a: torch.Tensor, d: torch.Tensor, num_thresholds: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best threshold split of y, all candidates evaluated at once (no host sync).

    Args:
        y: float (n,) the Fiedler vector; a: float (n, n) affinity; d: float (n,) degrees.
        num_thresholds: candidates ``t`` from :func:`threshold_candidates`.

    Returns:
        (bool (n,) the side ``y > t`` of the first minimum, float 0-dim its normalized cut).
        A NaN candidate (a side empty: y does not change sign, which only rounding allows)
        counts as the minimum, as ``np.argmin`` does, so the node stays whole: the release
        then gets a NaN cut or recurses without end.
    """
    t = threshold_candidates(y, num_thresholds)
    x = (y[:, None] > t[None, :]).to(a.dtype)
    ncut = _ncut_of_partitions(x, a, d)
    best = torch.argmin(ncut)  # first minimum (first NaN if any)
    return y > t[best], ncut[best]


def threshold_cut_loop(
    y: torch.Tensor, a: torch.Tensor, d: torch.Tensor, num_thresholds: int = 100
) -> tuple[torch.Tensor, float]:
    """Slow reference for :func:`best_threshold_cut`: one candidate at a time, dense diagonals.

    Returns:
        (bool (n,) the chosen side, float its normalized cut).
    """
    deg = torch.diag(d)
    lap = deg - a
    values, sides = [], []
    for t in threshold_candidates(y, num_thresholds):
        side = y > t
        s = 2 * side.to(a.dtype) - 1
        k = (d * (s > 0)).sum() / deg.sum()
        b = k / (1 - k)
        z = (1 + s) - b * (1 - s)
        empty = int(side.sum()) in (0, side.numel())
        values.append(float("nan") if empty else ((z @ lap @ z) / (z @ deg @ z)).item())
        sides.append(side)
    best = int(np.argmin(values))
    return sides[best], values[best]


def recursive_ncut(
    features: torch.Tensor,
    tau: float = 0.5,
    alpha: float = 10,
    num_thresholds: int = 100,
    partial_eigh: bool = False,
) -> list[torch.Tensor]:
    """The accepted split masks of DiffCut's recursive normalized cut, in the release's order.

    Args:
        features: float (C, N), one column per token.
        tau: a split is kept when its normalized cut is below tau.
        alpha: affinity exponent.
        num_thresholds: split candidates per node.
        partial_eigh: the CPU's two-eigenpair solver (:func:`second_eigenvector`).

    Returns:
        list of bool (N,) masks, the side P of each kept split in depth-first order (a split,
        then the whole sub-tree of P, then the sub-tree of the rest). Empty if nothing splits.
    """
    w = affinity_matrix(features, alpha)
    n = w.shape[0]
    zero_row = (w == 0).any(dim=1)  # tokens that are never split below the top level
    masks: list[torch.Tensor] = []
    # A stack of painted sets gives the same order as the release's recursion.
    stack = [torch.zeros(n, dtype=torch.bool, device=w.device)]
    top = True
    while stack:
        painted = stack.pop()
        active = torch.ones_like(painted) if top else ~painted & ~zero_row
        top = False
        idx = active.nonzero().squeeze(1)
        if idx.numel() < 2:
            continue
        a = w[idx][:, idx]
        d = a.sum(dim=1)
        y = fiedler_vector(a, d, partial_eigh)
        if y is None:
            continue  # the eigen-solver failed: this region is a leaf
        side, ncut = best_threshold_cut(y, a, d, num_thresholds)
        if not bool(ncut < tau):  # one host sync per node
            continue
        p = torch.zeros_like(painted)
        p[idx] = side
        masks.append(p)
        stack.append(painted | p)  # the rest, second
        stack.append(~p)  # P first: everything else painted
    return masks


def leaves_to_labels(masks: Sequence[torch.Tensor], n: int, device=None) -> torch.Tensor:
    """Leaf ids from the kept masks, numbered as the release numbers them.

    The release sums ``weight_k * mask_k`` with each weight one more than the running maximum
    of the sum, then ranks the distinct sums. As each weight exceeds every earlier sum, that
    order is the lexicographic order of the memberships read from the last mask backwards,
    which this computes exactly (no large weights).

    Args:
        masks: bool (N,) each, in the order kept.
        n: number of tokens N (for the no-split case).

    Returns:
        int64 (N,) in 0..K-1; all zeros when ``masks`` is empty.
    """
    if len(masks) == 0:
        return torch.zeros(n, dtype=torch.long, device=device)
    membership = torch.stack(list(masks)[::-1], dim=1).to(torch.uint8)  # (N, M), last mask first
    _, labels = torch.unique(membership, dim=0, return_inverse=True)
    return labels


def ncut_labels(
    features: torch.Tensor,
    tau: float = 0.5,
    alpha: float = 10,
    num_thresholds: int = 100,
    partial_eigh: bool = False,
) -> torch.Tensor:
    """DiffCut's token segmentation of one image.

    Args:
        features: float (C, h, w).
        tau, alpha, num_thresholds, partial_eigh: see :func:`recursive_ncut`.

    Returns:
        int64 (h, w) leaf ids 0..K-1.
    """
    c, h, w = features.shape
    masks = recursive_ncut(features.reshape(c, h * w), tau, alpha, num_thresholds, partial_eigh)
    return leaves_to_labels(masks, h * w, features.device).reshape(h, w)


def ncut_reference(
    features: torch.Tensor, tau: float = 0.5, alpha: float = 10, num_thresholds: int = 100
) -> torch.Tensor:
    """Slow, literal recursive cut for tests and benchmarks: same result as :func:`ncut_labels`.

    Masks W pair by pair, finds the exact-zero rows of the masked matrix, builds dense
    diagonal matrices, tries one threshold at a time and sums weighted masks.

    Args:
        features: float (C, h, w).

    Returns:
        int64 (h, w).
    """
    c, h, w = features.shape
    n = h * w
    masks: list[torch.Tensor] = []

    def visit(weights: torch.Tensor, painted: torch.Tensor, level: int) -> None:
        pair = painted.to(weights.dtype)
        weights = weights * (1 - pair[:, None] * pair[None, :])
        if level == 0:
            idx = torch.arange(n, device=weights.device)
        else:
            idx = (~(weights == 0).any(dim=1)).nonzero().squeeze(1)
        if idx.numel() < 2:
            return
        a = weights[idx][:, idx]
        deg = torch.diag(a.sum(dim=1))
        d_inv_sqrt = torch.diag(1 / torch.diag(deg) ** 0.5)
        try:
            _, vectors = torch.linalg.eigh(d_inv_sqrt @ (deg - a) @ d_inv_sqrt)
        except torch.linalg.LinAlgError:
            return
        y = _sign_flip(d_inv_sqrt @ vectors[:, 1])
        side, ncut = threshold_cut_loop(y, a, torch.diag(deg), num_thresholds)
        if ncut < tau:
            p = torch.zeros(n, dtype=torch.bool, device=weights.device)
            p[idx] = side
            masks.append(p)
            visit(weights, painted | ~p, level + 1)
            visit(weights, painted | p, level + 1)

    w0 = affinity_matrix(features.reshape(c, n), alpha)
    visit(w0, torch.zeros(n, dtype=torch.bool, device=w0.device), 0)
    total = torch.zeros(n, dtype=torch.float64, device=w0.device)
    for m in masks:
        total += (total.max() + 1) * m  # the first weight is 1 as the sum starts at 0
    return torch.unique(total, return_inverse=True)[1].reshape(h, w)


def assign_concepts(features: torch.Tensor, labels: torch.Tensor, output_size: int) -> torch.Tensor:
    """Label every output pixel with the segment whose mean feature it matches best.

    Args:
        features: float (C, h, w), L2-normalised over C.
        labels: int (h, w) token segments.
        output_size: side S of the square output.

    Returns:
        int64 (S, S): ``argmax_k <f(p), e_k>`` with ``f`` the bilinear (half-pixel) upsampled
        features, not renormalised (computed as the upsampled token scores ``<f, e_k>``), and ``e_k`` the masked mean over segment k (in sorted id
        order; ids are ranks 0..K-1, and a segment may win no pixel).
    """
    c, h, w = features.shape
    _, ranks = torch.unique(labels.reshape(-1), return_inverse=True)
    onehot = F.one_hot(ranks).T.to(features.dtype)  # (K, N)
    weights = onehot / (onehot.sum(dim=1, keepdim=True) + 1e-8)
    embeddings = weights @ features.reshape(c, h * w).T  # (K, C)
    # Bilinear upsampling is linear, so the dot products of the upsampled features equal the
    # upsampled dot products: score on the token grid (K channels), then upsample the K maps
    # instead of the C >> K feature channels (the same numbers up to float rounding).
    token_scores = (embeddings @ features.reshape(c, h * w)).reshape(1, -1, h, w)  # (1, K, h, w)
    scores = F.interpolate(
        token_scores, size=(output_size, output_size), mode="bilinear", align_corners=False
    )
    return scores[0].argmax(dim=0)


def eigengap(eigenvalues: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Relative eigengap of ascending eigenvalues, as DiffCut's AutoSC scores it.

    ``gap_i = (lambda_i - m_i) / (m_i + 1e-6)`` with ``m_i`` the mean of the first ``i + 1``.

    Returns:
        (float 0-dim the largest gap, int64 0-dim its index = the number of clusters k).
    """
    count = torch.arange(1, eigenvalues.numel() + 1, device=eigenvalues.device)
    cummean = eigenvalues.cumsum(dim=0) / count
    gap = (eigenvalues - cummean) / (cummean + 1e-6)
    return gap.max(), gap.argmax()


def cluster_qr(vectors: np.ndarray) -> np.ndarray:
    """k-way assignment from k spectral embedding vectors by column-pivoted QR (Damle et al.).

    Args:
        vectors: float (N, k).

    Returns:
        int64 (N,) cluster ids in 0..k-1 (some may be unused).
    """
    k = vectors.shape[1]
    _, _, pivots = qr(vectors.T, pivoting=True)
    u, _, vt = svd(vectors[pivots[:k], :].T)
    return np.abs(vectors @ (u @ vt.conj())).argmax(axis=1).astype(np.int64)


def autosc_labels(
    features: torch.Tensor, alphas: Sequence[float] = (1, 5, 10, 15), vectors_of_best: bool = False
) -> torch.Tensor:
    """AutoSC: spectral clustering with k from the largest eigengap over several exponents.

    For each alpha, the normalized Laplacian of ``minmax(X^T X) ** alpha`` is fully
    decomposed; the alpha with the largest :func:`eigengap` (the first on ties) sets k. The
    release then clusters the generalised eigenvectors ``D^-1/2 V[:, :k]`` of the **last**
    alpha (a quirk kept by default; ``vectors_of_best=True`` takes the best alpha's) with
    :func:`cluster_qr`.

    Args:
        features: float (C, h, w).

    Returns:
        int64 (h, w) cluster ids (0..k-1, possibly with gaps); all zeros if no gap is positive.
    """
    c, h, w = features.shape
    base = affinity_matrix(features.reshape(c, h * w), 1)
    best_gap, k, chosen, vectors = 0.0, 0, None, None
    for alpha in alphas:
        a = base**alpha
        d = a.sum(dim=1)
        lap, d_inv_sqrt = _normalized_laplacian(a, d)
        values, vectors = torch.linalg.eigh(lap)
        vectors = d_inv_sqrt[:, None] * vectors
        gap, index = eigengap(values)
        if gap.item() > best_gap:
            best_gap, k, chosen = gap.item(), int(index), vectors
    if k == 0:
        return torch.zeros(h, w, dtype=torch.long, device=features.device)
    embedding = (chosen if vectors_of_best else vectors)[:, :k]
    labels = cluster_qr(embedding.cpu().numpy())
    return torch.from_numpy(labels).to(features.device).reshape(h, w)
