"""K-Means-C / K-Means-S baselines on structured synthetic attention."""

import pytest
import torch

from diffseg.methods.kmeans import KMeansSegmentor, kmeans_c, kmeans_s
from diffseg.methods.merging import proposals_to_labels
from diffseg.ops.aggregation import aggregate_attention
from diffseg.ops.kmeans import kmeans
from diffseg.testing import synthetic_attention as sa

SMALL = (16, 8, 4)


def test_kmeans_c_finds_six_regions_at_full_size():
    labels = sa.block_labels(2, 3)
    maps = sa.make_maps(labels, 6.0, noise=0.3, seed=1)
    method = kmeans_c()
    assert method.num_clusters == 6 and method.hints == () and method.name == "kmeans_c"
    pred = method.segment(maps, output_size=64)
    assert pred.shape == (1, 64, 64) and pred.dtype == torch.int64
    acc, n_seg = sa.region_agreement(pred[0], labels)
    assert n_seg == 6 and acc > 0.97


def test_proposals_are_cluster_means_then_nms():
    maps = sa.make_maps(sa.voronoi_labels(4, 16, seed=2), 3.0, noise=1.0, seed=2, resolutions=SMALL)
    method = KMeansSegmentor(num_clusters=3, seed=5, map_size=16)
    props = method.propose(maps)[0]
    flat = aggregate_attention(maps, out_res=16)[0].reshape(256, 256)
    res = kmeans(flat, 3, seed=5)
    expected = torch.stack([flat[res.labels == k].mean(0) for k in range(3)]).reshape(3, 16, 16)
    torch.testing.assert_close(props, expected)
    pred = method.segment(maps, output_size=32)
    assert torch.equal(pred[0], proposals_to_labels(expected, 32))


def test_seeded_and_batch_independent():
    labels = torch.stack([sa.voronoi_labels(5, 16, seed=s) for s in (3, 4)])
    maps = sa.make_maps(labels, 2.0, noise=1.5, seed=3, resolutions=SMALL)
    a = KMeansSegmentor(4, seed=1, map_size=16).segment(maps, output_size=16)
    b = KMeansSegmentor(4, seed=1, map_size=16).segment(maps, output_size=16)
    assert torch.equal(a, b)
    alone = KMeansSegmentor(4, seed=1, map_size=16).segment(
        {r: m[1:] for r, m in maps.items()}, output_size=16
    )
    assert torch.equal(alone[0], a[1])


def test_kmeans_s_uses_per_image_counts():
    labels = torch.stack(
        [sa.block_labels(1, 2, 16), sa.block_labels(2, 2, 16), sa.block_labels(2, 3, 16)]
    )
    maps = sa.make_maps(labels, 6.0, resolutions=SMALL)
    method = kmeans_s(map_size=16)
    assert method.hints == ("num_classes",) and method.name == "kmeans_s"
    via_hints = method.segment(maps, output_size=16, hints={"num_classes": [2, 4, 6]})
    with pytest.raises(ValueError, match="num_clusters=\\[k_1"):
        method.segment(maps)
    with pytest.raises(ValueError, match="2 entries for a batch of 3"):
        method.segment(maps, num_clusters=[2, 4])
    with pytest.raises(ValueError, match=">= 0"):
        method.segment(maps, num_clusters=[2, -1, 3])
    pred = method.segment(maps, output_size=16, num_clusters=torch.tensor([2, 4, 6]))
    assert torch.equal(pred, via_hints)
    for b, k in enumerate([2, 4, 6]):
        assert sa.region_agreement(pred[b], labels[b]) == (1.0, k)
    # K-Means-C ignores a per-image count given by keyword, and refuses it as a hint.
    fixed = KMeansSegmentor(2, map_size=16).segment(maps, output_size=16, num_clusters=[6, 6, 6])
    with pytest.raises(ValueError, match="takes no hint \\['num_classes'\\]"):
        KMeansSegmentor(2, map_size=16).segment(maps, 16, hints={"num_classes": [6, 6, 6]})
    assert [int(p.unique().numel()) for p in fixed] == [2, 2, 2]
    # 0 classes (no labelled pixel) still gives one segment.
    assert method.segment(maps, output_size=16, num_clusters=[0, 1, 1]).unique().numel() == 1


def test_more_clusters_than_distinct_maps():
    uniform = {r: torch.full((1, r * r, r * r), 1.0 / (r * r)) for r in SMALL}
    pred = KMeansSegmentor(6, map_size=16).segment(uniform, output_size=16)
    assert pred.unique().numel() == 1
    two = sa.make_maps(sa.block_labels(1, 2, 16), 6.0, resolutions=[16])
    pred = KMeansSegmentor(6, map_size=16, resolutions=[16]).segment(two, output_size=16)
    assert sa.region_agreement(pred[0], sa.block_labels(1, 2, 16)) == (1.0, 2)


def test_describe_and_bad_settings():
    described = kmeans_c(weights=[1, 1, 1, 1]).describe()
    assert described["name"] == "kmeans_c" and described["num_clusters"] == 6
    assert described["weights"] == [1.0, 1.0, 1.0, 1.0] and described["seed"] == 0
    assert "KMeansSegmentor(num_clusters=None" in repr(kmeans_s())
    with pytest.raises(ValueError, match=r"num_clusters=0 is invalid: it must be an integer >= 1"):
        KMeansSegmentor(0)
    with pytest.raises(ValueError, match=r"maps\[8\] must have shape"):
        kmeans_c().segment({64: torch.full((1, 4096, 4096), 1 / 4096), 8: torch.ones(1, 64)})
