"""The recursive normalized cut, concept assignment and AutoSC (diffseg.methods.ncut)."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffseg.methods.ncut import (
    affinity_matrix,
    assign_concepts,
    autosc_labels,
    best_threshold_cut,
    cluster_qr,
    eigengap,
    fiedler_vector,
    leaves_to_labels,
    ncut_labels,
    ncut_reference,
    recursive_ncut,
    threshold_candidates,
    threshold_cut_loop,
)

# One torch thread: on a loaded 2-core machine threads waiting on each other cost 10x.
pytestmark = pytest.mark.usefixtures("one_thread")


def exact_ncut(a: torch.Tensor, side: torch.Tensor) -> float:
    """cut(P, Q) (1 / vol P + 1 / vol Q) in float64."""
    a = a.double()
    p, q = side, ~side
    cut = a[p][:, q].sum()
    return float(cut / a[p].sum() + cut / a[q].sum())


def two_cluster_graph(seed: int, n: int = 8) -> torch.Tensor:
    """Symmetric (n, n) float32 affinity: two groups of n/2, strong inside, weak across."""
    g = torch.Generator().manual_seed(seed)
    group = torch.arange(n) % 2  # interleaved so that the answer is not the index order
    same = group[:, None] == group[None, :]
    a = torch.where(same, 0.6, 0.05) + 0.1 * torch.rand(n, n, generator=g)
    return (a + a.T) / 2


def blobs(seed: int, h: int = 12, c: int = 48, k: int = 4, spread: float = 1.2) -> torch.Tensor:
    """Features (C, h, w) of k Voronoi regions with correlated centres, noise and one outlier
    pair (so that min-max leaves the regions' cross affinities well above zero)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(c, generator=g)
    centres = base + spread * torch.randn(k, c, generator=g)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(h), indexing="ij")
    seeds = torch.randint(0, h, (k, 2), generator=g)
    dist = (yy[None] - seeds[:, 0, None, None]) ** 2 + (xx[None] - seeds[:, 1, None, None]) ** 2
    f = centres[dist.argmin(0)].permute(2, 0, 1) + 0.3 * torch.randn(c, h, h, generator=g)
    f[:, 0, 0] = -base
    return f


# --- one split -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_threshold_cut_reaches_brute_force_optimum(seed):
    a = two_cluster_graph(seed)
    d = a.sum(dim=1)
    best, best_side = float("inf"), None
    for bits in itertools.product([False, True], repeat=7):  # node 7 always in Q
        side = torch.tensor([*bits, False])
        if side.any():
            value = exact_ncut(a, side)
            if value < best:
                best, best_side = value, side
    y = fiedler_vector(a, d)
    side, ncut = best_threshold_cut(y, a, d)
    assert torch.equal(side, best_side) or torch.equal(~side, best_side)
    assert float(ncut) == pytest.approx(best, rel=1e-5)
    assert float(ncut) == pytest.approx(exact_ncut(a, side), rel=1e-5)


def test_fiedler_vector_solves_generalised_problem_and_is_signed():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 30, generator=g, dtype=torch.float64)
    a = affinity_matrix(x, alpha=3)
    d = a.sum(dim=1)
    y = fiedler_vector(a, d)
    lap = torch.diag(d) - a
    lam = (y @ lap @ y) / (y @ (d * y))
    torch.testing.assert_close(lap @ y, lam * d * y, rtol=0, atol=1e-10)
    # lambda is the second-smallest generalised eigenvalue
    values = torch.linalg.eigvalsh(torch.diag(d.rsqrt()) @ lap @ torch.diag(d.rsqrt()))
    assert float(lam) == pytest.approx(float(values[1]), rel=1e-9)
    assert y[y.abs().argmax()] > 0
    assert float(y @ d) == pytest.approx(0, abs=1e-9)  # D-orthogonal to the constant vector


def test_fiedler_vector_returns_none_when_eigh_fails(monkeypatch):
    import diffseg.methods.ncut as ncut

    def fail(*_):
        raise torch.linalg.LinAlgError("no convergence")

    monkeypatch.setattr(ncut, "second_eigenvector", fail)
    a = two_cluster_graph(0)
    assert fiedler_vector(a, a.sum(dim=1)) is None


def test_partial_eigensolver_matches_the_full_decomposition():
    """The CPU's two-eigenpair solver gives the full eigh's second eigenvector (up to sign)."""
    from diffseg.methods.ncut import _normalized_laplacian, second_eigenvector

    for seed in range(3):
        a = two_cluster_graph(seed)
        lap, _ = _normalized_laplacian(a, a.sum(dim=1))
        full = torch.linalg.eigh(lap)[1][:, 1]
        part = second_eigenvector(lap, partial=True)
        torch.testing.assert_close(part * torch.sign(part @ full), full, atol=1e-4, rtol=0)


def test_thresholds_are_099_times_each_end():
    y = torch.tensor([-2.0, 0.5, 4.0])
    t = threshold_candidates(y, 100)
    assert t.shape == (100,)
    assert float(t[0]) == pytest.approx(-1.98) and float(t[-1]) == pytest.approx(3.96)


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_search_equals_candidate_loop(seed):
    g = torch.Generator().manual_seed(seed)
    a = affinity_matrix(torch.randn(16, 60, generator=g), alpha=4)
    d = a.sum(dim=1)
    y = fiedler_vector(a, d)
    side, ncut = best_threshold_cut(y, a, d)
    side_loop, ncut_loop = threshold_cut_loop(y, a, d)
    assert torch.equal(side, side_loop)
    assert float(ncut) == pytest.approx(ncut_loop, rel=1e-4)
    assert float(ncut) == pytest.approx(exact_ncut(a, side), rel=1e-4)


def test_first_minimum_wins_on_exact_ties():
    # Node 4 has no edges: {0, 1} and {0, 1, 4} have the same cut and volumes, bit for bit.
    a = torch.zeros(5, 5)
    a[:4, :4] = torch.tensor([[2.0, 1, 0.25, 0], [1, 2, 0, 0.25], [0.25, 0, 2, 1], [0, 0.25, 1, 2]])
    d = a.sum(dim=1)
    y = torch.tensor([1.0, 0.9, -1.0, -0.9, 0.5])
    side, ncut = best_threshold_cut(y, a, d, num_thresholds=100)
    side_loop, _ = threshold_cut_loop(y, a, d, num_thresholds=100)
    # lower thresholds come first, so the tie goes to the larger side
    assert side.tolist() == [True, True, False, False, True]
    assert torch.equal(side, side_loop)
    assert float(ncut) == pytest.approx(exact_ncut(a[:4, :4], side[:4]))


def test_a_sign_constant_vector_gives_no_split():
    # y > 0 everywhere (only rounding allows it): the first candidate takes every node
    a = two_cluster_graph(1)
    d = a.sum(dim=1)
    y = torch.linspace(1.0, 2.0, 8)
    _, ncut = best_threshold_cut(y, a, d)
    assert torch.isnan(ncut)
    _, ncut_loop = threshold_cut_loop(y, a, d)
    assert np.isnan(ncut_loop)


# --- recursion and leaves --------------------------------------------------------------------


def test_leaves_numbered_as_release_weighted_sums():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        masks = [torch.rand(40, generator=g) < 0.4 for _ in range(int(torch.randint(1, 9, (1,))))]
        total = [0] * 40  # the release's sums, in exact integers
        for m in masks:
            weight = max(total) + 1
            total = [t + weight * int(b) for t, b in zip(total, m.tolist(), strict=True)]
        ranks = {v: i for i, v in enumerate(sorted(set(total)))}
        expected = torch.tensor([ranks[t] for t in total])
        assert torch.equal(leaves_to_labels(masks, 40), expected)
    assert torch.equal(leaves_to_labels([], 5), torch.zeros(5, dtype=torch.long))


def test_leaves_small_example_by_hand():
    p = torch.tensor([1, 1, 1, 1, 0, 0, 0], dtype=torch.bool)  # weight 1
    p1 = torch.tensor([1, 1, 0, 0, 0, 0, 0], dtype=torch.bool)  # weight 2: sums 3
    r = torch.tensor([0, 0, 0, 0, 1, 1, 0], dtype=torch.bool)  # weight 4
    # sums: 3 3 1 1 4 4 0 -> ranks 2 2 1 1 3 3 0
    assert leaves_to_labels([p, p1, r], 7).tolist() == [2, 2, 1, 1, 3, 3, 0]


@pytest.mark.parametrize("seed", range(3))
def test_recursive_cut_equals_literal_reference(seed):
    f = F.normalize(blobs(seed), dim=0)
    labels = ncut_labels(f)
    assert labels.dtype == torch.int64 and labels.shape == (12, 12)
    assert labels.max() >= 2  # several levels of splits
    assert torch.equal(labels, ncut_reference(f))


def test_recursion_order_is_p_then_rest(monkeypatch):
    # A fake cut that keeps the first half of the active nodes while there are 4 or more:
    # on 8 nodes the release's order is {0..3}, then inside it {0, 1}, then the rest's {4, 5}.
    import diffseg.methods.ncut as ncut

    def half(y, a, d, num_thresholds):
        n = y.numel()
        side = torch.arange(n) < n // 2
        return side, torch.tensor(0.0 if n >= 4 else 1.0)

    monkeypatch.setattr(ncut, "affinity_matrix", lambda x, alpha: torch.ones(8, 8))
    monkeypatch.setattr(ncut, "fiedler_vector", lambda a, d, *_: torch.zeros(d.numel()))
    monkeypatch.setattr(ncut, "best_threshold_cut", half)
    masks = ncut.recursive_ncut(torch.zeros(3, 8))
    assert [m.nonzero().squeeze(1).tolist() for m in masks] == [[0, 1, 2, 3], [0, 1], [4, 5]]
    # sums 3 3 1 1 4 4 0 0 ranked
    assert leaves_to_labels(masks, 8).tolist() == [2, 2, 1, 1, 3, 3, 0, 0]


def test_exact_zero_rows_are_not_split_below_the_top():
    # Tokens 0 and 1 hold the minimum cosine, so their rows of W hold exact zeros. Token 0
    # looks like group A2, but once the top split has separated A from B it stays out of
    # every later split: it keeps only the masks it had and lands in the leaf of the side
    # of A's split that takes no mask.
    c = 8
    e = torch.eye(c)
    a1, a2, b = e[0] + 0.8 * e[3], e[0] + 0.8 * e[4], 0.8 * e[0] + e[1] + 0.5 * e[5]
    cols = [a2 + 0.2 * e[2], e[1] + 0.5 * e[5] - 0.2 * e[2]]  # tokens 0 and 1: least similar
    cols += [a1] * 6 + [a2] * 6 + [b] * 6  # tokens 2-7, 8-13, 14-19
    noise = 0.01 * torch.randn(c, 20, generator=torch.Generator().manual_seed(0))
    x = torch.stack(cols, dim=1) + noise
    w = affinity_matrix(x, 10)
    assert torch.equal((w == 0).any(dim=1).nonzero().squeeze(1), torch.tensor([0, 1]))
    masks = recursive_ncut(x, tau=0.5)
    labels = leaves_to_labels(masks, 20)
    assert torch.equal(labels, ncut_reference(x.reshape(c, 4, 5), tau=0.5).reshape(-1))
    assert len(masks) == 2  # A | B at the top, then A1 | A2
    groups = {"a1": labels[2:8].unique(), "a2": labels[8:14].unique(), "b": labels[14:].unique()}
    assert all(g.numel() == 1 for g in groups.values()) and len(set(map(int, groups.values()))) == 3
    assert not masks[1][0] and not masks[1][1]  # the zero-row tokens are in no later mask
    rest = "a1" if bool(masks[1][8]) else "a2"  # the side of A's split without a mask
    assert labels[0] == groups[rest]
    assert bool(masks[0][1]) and bool(masks[0][14]) and labels[1] == groups["b"]


def test_one_segment_when_no_split_passes():
    f = F.normalize(blobs(1), dim=0)
    assert recursive_ncut(f.reshape(f.shape[0], -1), tau=-1.0) == []
    assert torch.equal(ncut_labels(f, tau=-1.0), torch.zeros(12, 12, dtype=torch.long))
    assert torch.equal(ncut_reference(f, tau=-1.0), torch.zeros(12, 12, dtype=torch.long))


def test_eigen_failure_ends_the_branch(monkeypatch):
    import diffseg.methods.ncut as ncut

    monkeypatch.setattr(ncut, "fiedler_vector", lambda a, d, *_: None)
    f = F.normalize(blobs(0), dim=0)
    assert torch.equal(ncut_labels(f), torch.zeros(12, 12, dtype=torch.long))


# --- concept assignment ----------------------------------------------------------------------


def test_assignment_follows_known_regions():
    e = torch.eye(4)
    f = torch.zeros(4, 4, 4)
    f[:, :, :2] = e[0][:, None, None]
    f[:, :, 2:] = e[1][:, None, None]
    labels = torch.zeros(4, 4, dtype=torch.long)
    labels[:, 2:] = 5  # ids are ranked: 0 -> 0, 5 -> 1
    out = assign_concepts(f, labels, 8)
    expected = torch.zeros(8, 8, dtype=torch.long)
    expected[:, 4:] = 1
    assert out.dtype == torch.int64 and torch.equal(out, expected)


def test_assignment_uses_masked_means_and_bilinear_upsampling():
    g = torch.Generator().manual_seed(0)
    f = F.normalize(torch.randn(6, 5, 5, generator=g), dim=0)
    labels = torch.randint(0, 3, (5, 5), generator=g)
    out = assign_concepts(f, labels, 9)
    means = torch.stack([f[:, labels == k].sum(1) / ((labels == k).sum() + 1e-8) for k in range(3)])
    up = F.interpolate(f[None], size=(9, 9), mode="bilinear", align_corners=False)[0]
    expected = torch.einsum("kc,chw->khw", means, up).argmax(0)
    assert torch.equal(out, expected)


def test_a_segment_can_vanish():
    # Segment 2 holds two opposite features: its mean is zero, it never scores above 0, and
    # ties go to the earlier segments.
    e = torch.eye(3)
    f = torch.zeros(3, 4, 4)
    f[:, :, :2] = e[0][:, None, None]
    f[:, :, 2:] = e[1][:, None, None]
    f[:, 1, 1], f[:, 2, 2] = e[2], -e[2]
    labels = torch.zeros(4, 4, dtype=torch.long)
    labels[:, 2:] = 1
    labels[1, 1] = labels[2, 2] = 2
    out = assign_concepts(f, labels, 8)
    assert set(out.unique().tolist()) == {0, 1}


# --- AutoSC ----------------------------------------------------------------------------------


def test_eigengap_by_hand():
    values = torch.tensor([0.0, 0.01, 0.02, 0.9, 1.0])
    gap, k = eigengap(values)
    cummean = torch.tensor([0.0, 0.005, 0.01, 0.2325, 0.386])
    expected = (values - cummean) / (cummean + 1e-6)
    assert int(k) == 3 and float(gap) == pytest.approx(float(expected.max()))


def test_cluster_qr_matches_scikit_learn():
    spectral = pytest.importorskip("sklearn.cluster._spectral")
    g = np.random.default_rng(0)
    vectors = g.normal(size=(50, 4))
    np.testing.assert_array_equal(cluster_qr(vectors), spectral.cluster_qr(vectors))


def test_autosc_recovers_clusters():
    f = F.normalize(blobs(2, k=3, spread=1.5), dim=0)
    f[:, 0, 0] = f[:, 0, 1]  # no outlier: three clean regions
    labels = autosc_labels(f)
    g = torch.Generator().manual_seed(2)
    torch.randn(48, generator=g)  # replay blobs' draws to get its regions
    torch.randn(3, 48, generator=g)
    seeds = torch.randint(0, 12, (3, 2), generator=g)
    yy, xx = torch.meshgrid(torch.arange(12), torch.arange(12), indexing="ij")
    regions = (
        (yy[None] - seeds[:, 0, None, None]) ** 2 + (xx[None] - seeds[:, 1, None, None]) ** 2
    ).argmin(0)
    pairs = set(zip(regions.reshape(-1).tolist(), labels.reshape(-1).tolist(), strict=True))
    assert len(pairs) == 3 and len({p[1] for p in pairs}) == 3


def test_autosc_release_takes_last_alpha_vectors():
    f = F.normalize(blobs(0), dim=0)
    release = autosc_labels(f, alphas=(1, 5, 10, 15))
    assert torch.equal(release, autosc_labels(f, alphas=(1, 5, 10, 15), vectors_of_best=False))
    # with a single alpha both readings agree
    assert torch.equal(
        autosc_labels(f, alphas=(15,)), autosc_labels(f, alphas=(15,), vectors_of_best=True)
    )
