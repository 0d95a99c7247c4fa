"""diffseg.ops.kmeans against scikit-learn's KMeans (lloyd, given init, one init)."""

import numpy as np
import pytest
import torch

from diffseg.ops.kmeans import kmeans, kmeans_plusplus, squared_distances

sklearn_cluster = pytest.importorskip("sklearn.cluster")


def _blobs(n_per=40, centers=4, dim=8, spread=1.0, seed=0):
    rng = np.random.default_rng(seed)
    mu = rng.normal(0, 3, (centers, dim))
    x = np.concatenate([m + spread * rng.normal(size=(n_per, dim)) for m in mu])
    return x[rng.permutation(len(x))]


def _sk(x, init, **kw):
    return sklearn_cluster.KMeans(
        n_clusters=len(init), init=init, n_init=1, algorithm="lloyd", **kw
    ).fit(x)


@pytest.mark.parametrize("spread", [0.5, 2.5])
def test_matches_sklearn_float64(spread):
    # spread 2.5: overlapping blobs, several iterations before the labels settle.
    x = _blobs(spread=spread, seed=1)
    init = x[:4].copy()
    ref = _sk(x, init)
    res = kmeans(torch.from_numpy(x), init=torch.from_numpy(init))
    assert res.n_iter == ref.n_iter_
    np.testing.assert_array_equal(res.labels.numpy(), ref.labels_)
    np.testing.assert_allclose(res.centers.numpy(), ref.cluster_centers_, rtol=1e-9, atol=1e-9)
    assert res.inertia == pytest.approx(ref.inertia_, rel=1e-9)
    assert res.converged


def test_matches_sklearn_float32_and_max_iter():
    x = _blobs(spread=2.5, seed=3).astype(np.float32)
    init = x[[0, 5, 10, 15]].copy()
    for max_iter in (1, 2, 300):
        ref = _sk(x, init, max_iter=max_iter)
        res = kmeans(torch.from_numpy(x), init=torch.from_numpy(init), max_iter=max_iter)
        np.testing.assert_array_equal(res.labels.numpy(), ref.labels_)
        np.testing.assert_allclose(res.centers.numpy(), ref.cluster_centers_, rtol=1e-4, atol=1e-4)


def test_empty_cluster_relocated_like_sklearn():
    x = _blobs(n_per=30, centers=3, spread=0.3, seed=2)
    # The third centre is far from every point: its cluster is empty after the first assignment.
    init = np.stack([x[0], x[1], np.full(x.shape[1], 100.0)])
    ref = _sk(x, init)
    res = kmeans(torch.from_numpy(x), init=torch.from_numpy(init))
    assert len(np.unique(ref.labels_)) == 3
    np.testing.assert_array_equal(res.labels.numpy(), ref.labels_)
    np.testing.assert_allclose(res.centers.numpy(), ref.cluster_centers_, rtol=1e-9, atol=1e-9)


def test_squared_distances():
    g = torch.Generator().manual_seed(0)
    x, c = (
        torch.randn(20, 5, generator=g, dtype=torch.float64),
        torch.randn(3, 5, generator=g, dtype=torch.float64),
    )
    torch.testing.assert_close(squared_distances(x, c), torch.cdist(x, c) ** 2)


def test_kmeans_plusplus_seeded_and_distinct():
    x = torch.from_numpy(_blobs(seed=4)).float()
    c1, i1 = kmeans_plusplus(x, 4, seed=7)
    c2, i2 = kmeans_plusplus(x, 4, seed=7)
    assert torch.equal(i1, i2) and torch.equal(c1, c2)
    assert len(set(i1.tolist())) == 4
    torch.testing.assert_close(c1, x[i1])
    # On well-separated blobs, k-means++ picks one point per blob.
    res = kmeans(x, 4, seed=7)
    assert res.labels.unique().numel() == 4


def test_fewer_distinct_points_than_k():
    x = torch.tensor([[0.0, 0.0]] * 10 + [[1.0, 1.0]] * 5)
    centers, idx = kmeans_plusplus(x, 6, seed=0)
    assert centers.shape == (2, 2)
    res = kmeans(x, 6, seed=0)
    assert res.centers.shape[0] == 2
    assert res.inertia == 0.0
    assert res.labels[:10].unique().numel() == 1 and res.labels[10:].unique().numel() == 1


def test_bad_input():
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        kmeans(x[0])
    with pytest.raises(ValueError, match="init must have shape"):
        kmeans(x, init=torch.randn(2, 4))
    with pytest.raises(ValueError, match="k >= 1"):
        kmeans(x)
    with pytest.raises(ValueError, match="init has 2 centres"):
        kmeans(x, k=3, init=torch.randn(2, 3))
