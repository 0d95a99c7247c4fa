"""DiffSeg's steps (docs/diffseg.md sections 4-5) and the whole segmentor on structured synthetic
attention."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffseg.methods.diffseg import DiffSeg
from diffseg.methods.merging import (
    anchor_indices,
    anchor_points,
    first_merge,
    greedy_groups,
    greedy_merge,
    proposals_to_labels,
    refine_proposals,
    symmetric_kl,
    symmetric_kl_reference,
)
from diffseg.ops.aggregation import aggregate_attention, resolution_weights
from diffseg.testing import synthetic_attention as sa

SMALL = (16, 8, 4)  # a 16x16 grid: same algorithm, 256 maps instead of 4096


def _small_segmentor(**kw):
    return DiffSeg(map_size=16, num_points=8, **kw)


# ---- anchors and weights --------------------------------------------------------------------


def test_anchor_grid_is_the_release_grid():
    pts = anchor_points(16, 64)
    assert pts.shape == (256, 2)
    expected = list(range(1, 62, 4))
    assert sorted(set(pts[:, 0].tolist())) == expected == sorted(set(pts[:, 1].tolist()))
    # Row-major ('ij'): the column varies fastest.
    assert pts[:3].tolist() == [[1, 1], [1, 5], [1, 9]]
    assert pts[16].tolist() == [5, 1]
    assert anchor_indices(16, 64)[:2].tolist() == [1 * 64 + 1, 1 * 64 + 5]
    assert anchor_points(1, 64).tolist() == [[31, 31]]
    with pytest.raises(ValueError, match="num_points"):
        anchor_points(0)


def test_resolution_weights():
    assert resolution_weights([64, 32, 16, 8]) == pytest.approx(
        {64: 64 / 120, 32: 32 / 120, 16: 16 / 120, 8: 8 / 120}
    )
    assert resolution_weights([32, 16]) == pytest.approx({32: 2 / 3, 16: 1 / 3})
    assert resolution_weights([64, 8], [1, 3]) == pytest.approx({64: 0.25, 8: 0.75})
    assert resolution_weights([64, 8], {8: 2, 64: 0}) == pytest.approx({64: 0.0, 8: 1.0})
    assert resolution_weights([64, 8], "uniform") == pytest.approx({64: 0.5, 8: 0.5})
    with pytest.raises(ValueError, match="one weight per resolution"):
        resolution_weights([64, 32], [1.0])
    with pytest.raises(ValueError, match=">= 0"):
        resolution_weights([64, 32], [1.0, -1.0])
    with pytest.raises(ValueError, match="no entry for resolution"):
        resolution_weights([64, 32], {64: 1.0})
    with pytest.raises(ValueError, match="not understood"):
        resolution_weights([64], "sqrt")


# ---- aggregation ----------------------------------------------------------------------------


def test_aggregate_hand_worked_2_to_4():
    """A 4x4 output grid from resolutions 4 and 2, computed by hand."""
    # Resolution 4: every query attends uniformly (key map = 1/16 everywhere).
    m4 = torch.full((1, 16, 16), 1 / 16)
    # Resolution 2: query row q has key map [[a, b], [c, d]] = rows below (each sums to 1).
    rows = torch.tensor(
        [[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]]
    )
    m2 = rows.unsqueeze(0)
    out = aggregate_attention({4: m4, 2: m2}, out_res=4)
    assert out.shape == (1, 16, 4, 4) and out.dtype == torch.float32
    # Bilinear x2 with half-pixel centres: output i samples source (i + 0.5) / 2 - 0.5, clamped.
    up = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
    for y in range(4):
        for x in range(4):
            q2 = (y // 2) * 2 + x // 2  # nearest tiling of the query grid
            key = up @ rows[q2].reshape(2, 2) @ up.T  # sums to 4 * 1
            expected = (4 / 6) * torch.full((4, 4), 1 / 16) + (2 / 6) * key / key.sum()
            torch.testing.assert_close(out[0, y * 4 + x], expected)


def _aggregate_queries(maps, weights, queries, out_res=64):
    """Independent aggregation of a few query positions ``(y, x)``, one by one."""
    rows = []
    for y, x in queries:
        total = torch.zeros(out_res, out_res, dtype=torch.float64)
        for r, w in weights.items():
            s = out_res // r
            key = maps[r][0, (y // s) * r + x // s].reshape(1, 1, r, r).double()
            up = F.interpolate(key, size=(out_res, out_res), mode="bilinear", align_corners=False)[
                0, 0
            ]
            total += w * up / up.sum()
        rows.append(total)
    return torch.stack(rows)


def test_aggregate_matches_reference_and_sums_to_one():
    maps = sa.make_maps(sa.voronoi_labels(5, seed=1), 4.0, noise=1.0, seed=1)
    out = aggregate_attention(maps)
    assert out.shape == (1, 4096, 64, 64) and out.dtype == torch.float32
    torch.testing.assert_close(out.sum((2, 3)), torch.ones(1, 4096), atol=1e-5, rtol=0)
    g = torch.Generator().manual_seed(0)
    queries = [(0, 0), (63, 63), (7, 8), (8, 7)] + torch.randint(64, (40, 2), generator=g).tolist()
    ref = _aggregate_queries(maps, {64: 64 / 120, 32: 32 / 120, 16: 16 / 120, 8: 8 / 120}, queries)
    got = torch.stack([out[0, y * 64 + x] for y, x in queries]).double()
    torch.testing.assert_close(got, ref, atol=1e-9, rtol=1e-5)


def test_aggregate_single_resolution_tiling():
    maps = sa.make_maps(sa.voronoi_labels(6, seed=2), 3.0, noise=0.5, seed=2)
    only8 = aggregate_attention(maps, weights={64: 0, 32: 0, 16: 0, 8: 1})
    # Query (y, x) takes the map of query (y // 8, x // 8): constant over each 8x8 block of queries.
    grid = only8[0].reshape(8, 8, 8, 8, 4096)
    torch.testing.assert_close(grid, grid[:, :1, :, :1].expand_as(grid), atol=0, rtol=0)
    assert not torch.allclose(grid[0, 0, 0, 0], grid[0, 0, 1, 0])
    # resolutions=[8] is the same thing, and so is the reference.
    torch.testing.assert_close(aggregate_attention(maps, resolutions=[8]), only8)
    ref = _aggregate_queries(maps, {8: 1.0}, [(9, 17), (15, 23)])
    torch.testing.assert_close(
        only8[0, [9 * 64 + 17, 15 * 64 + 23]].double(), ref, atol=1e-9, rtol=1e-5
    )
    torch.testing.assert_close(only8[0, 9 * 64 + 17], only8[0, 15 * 64 + 23], atol=0, rtol=0)


def test_aggregate_grids_that_do_not_nest():
    # 12x12 output from 12, 6 and 4: the 4 grid does not tile into the 6 grid.
    labels = sa.block_labels(3, 2, 12)
    maps = sa.make_maps(labels, 3.0, noise=0.5, seed=4, resolutions=(12, 6, 4))
    out = aggregate_attention(maps, out_res=12)
    queries = [(y, x) for y in range(12) for x in range(12)]
    ref = _aggregate_queries(maps, {12: 12 / 22, 6: 6 / 22, 4: 4 / 22}, queries, out_res=12)
    torch.testing.assert_close(out[0].double(), ref, atol=1e-9, rtol=1e-5)
    ref = _aggregate_queries(maps, {6: 0.6, 4: 0.4}, queries, out_res=12)
    got = aggregate_attention(maps, resolutions=[6, 4], out_res=12)
    torch.testing.assert_close(got[0].double(), ref, atol=1e-9, rtol=1e-5)


def test_aggregate_weights_are_linear_and_renormalised():
    maps = sa.make_maps(sa.voronoi_labels(6, 16, seed=2), 3.0, noise=0.5, seed=2, resolutions=SMALL)
    parts = {r: aggregate_attention(maps, resolutions=[r], out_res=16) for r in SMALL}
    # The default is the r-proportional mix of the single-resolution aggregates.
    mix = sum(r / 28 * parts[r] for r in parts)
    torch.testing.assert_close(aggregate_attention(maps, out_res=16), mix)
    # Weights are renormalised over the resolutions used.
    torch.testing.assert_close(
        aggregate_attention(maps, resolutions=[8, 4], out_res=16),
        2 / 3 * parts[8] + 1 / 3 * parts[4],
    )
    torch.testing.assert_close(
        aggregate_attention(maps, weights=[3.0, 1.0], resolutions=[16, 4], out_res=16),
        0.75 * parts[16] + 0.25 * parts[4],
    )


def test_aggregate_bad_input():
    good = sa.make_maps(sa.block_labels(2, 2, 16), 3.0, resolutions=SMALL)
    with pytest.raises(ValueError, match=r"maps\[16\] must have shape \(B, 256, 256\).*unsqueeze"):
        aggregate_attention({**good, 16: good[16][0]}, out_res=16)
    with pytest.raises(ValueError, match=r"maps\[8\] must have shape"):
        aggregate_attention({**good, 8: good[8][:, :10]}, out_res=16)
    with pytest.raises(ValueError, match="no resolution 32"):
        aggregate_attention(good, resolutions=[32, 16], out_res=16)
    neg = good[4].clone()
    neg[0, 0, 0] = -0.1
    with pytest.raises(ValueError, match=r"maps\[4\].*1 negative"):
        aggregate_attention({**good, 4: neg}, out_res=16)
    nan = good[8].clone()
    nan[0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"maps\[8\].*1 non-finite"):
        aggregate_attention({**good, 8: nan}, out_res=16)
    with pytest.raises(ValueError, match="batch size 2"):
        aggregate_attention({**good, 8: good[8].expand(2, -1, -1)}, out_res=16)
    zero_row = good[4].clone()
    zero_row[0, 5] = 0
    with pytest.raises(ValueError, match=r"maps\[4\].*zero total attention.*query row 5"):
        aggregate_attention({**good, 4: zero_row}, out_res=16)
    with pytest.raises(ValueError, match="does not divide"):
        aggregate_attention(good, out_res=12)
    with pytest.raises(ValueError, match="non-empty dict"):
        aggregate_attention({})


# ---- KL ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
def test_fast_kl_equals_direct_formula(dtype, tol):
    g = torch.Generator().manual_seed(0)
    # Peaked and flat distributions, entries down to ~1e-12, like sharp attention.
    logits_p = (
        torch.randn(2, 7, 300, generator=g, dtype=torch.float64)
        * torch.tensor([1.0, 8.0]).repeat(4)[:7, None]
    )
    logits_q = torch.randn(2, 5, 300, generator=g, dtype=torch.float64) * 4
    p, q = torch.softmax(logits_p, -1).to(dtype), torch.softmax(logits_q, -1).to(dtype)
    fast = symmetric_kl(p, q)
    assert fast.shape == (2, 7, 5) and fast.dtype == dtype
    direct = symmetric_kl_reference(p.double(), q.double(), chunk=3)
    torch.testing.assert_close(fast.double(), direct, atol=tol, rtol=tol)
    assert direct.max() > 10  # a real range of distances, not only near-zero ones
    # 2-D input, symmetry and zero self-distance.
    torch.testing.assert_close(symmetric_kl(p[0], p[0]), symmetric_kl(p[0], p[0]).T)
    torch.testing.assert_close(
        torch.diagonal(symmetric_kl(p[0], p[0])), torch.zeros(7, dtype=dtype), atol=tol, rtol=0
    )


def test_kl_bad_input():
    p = torch.full((1, 3, 4), 0.25)
    with pytest.raises(ValueError, match=r"p \(1, 3, 4\) and q \(1, 3, 5\)"):
        symmetric_kl(p, torch.full((1, 3, 5), 0.2))
    with pytest.raises(ValueError, match="expects p"):
        symmetric_kl(p, p[0])
    z = p.clone()
    z[0, 1, 2] = 0.0
    with pytest.raises(ValueError, match="input q must be strictly positive.*1 entries"):
        symmetric_kl(p, z)


# ---- merging -------------------------------------------------------------------------------


def test_greedy_groups_hand_worked():
    # close[i, j] = D(p_i, p_j) < tau (symmetric). 0-1, 1-2, 2-3 are close; 4 is alone.
    close = np.zeros((5, 5), bool)
    for i, j in [(0, 1), (1, 2), (2, 3)]:
        close[i, j] = close[j, i] = True
    np.fill_diagonal(close, True)
    groups = greedy_groups(close)
    # i=0 opens {0,1}; 1 is marked; i=2 opens {1,2,3}: the already-marked 1 is absorbed again;
    # 3 is marked; i=4 opens {4}.
    assert [np.flatnonzero(g).tolist() for g in groups] == [[0, 1], [1, 2, 3], [4]]
    # A proposal is always in its own group, even if its diagonal entry is False.
    assert greedy_groups(np.zeros((2, 2), bool)).tolist() == [[True, False], [False, True]]


def test_greedy_merge_on_distributions():
    # Two-outcome distributions (t, 1-t): neighbours 0.05 apart are ~0.005 apart in symmetric KL,
    # two steps apart ~0.02, and 0.8 is far from all.
    t = torch.tensor([0.30, 0.35, 0.40, 0.45, 0.80], dtype=torch.float64)
    props = torch.stack([t, 1 - t], 1)
    tau = 0.01
    close = (symmetric_kl_reference(props, props) < tau).numpy()
    expected_close = np.eye(5, dtype=bool)
    for i, j in [(0, 1), (1, 2), (2, 3)]:
        expected_close[i, j] = expected_close[j, i] = True
    np.testing.assert_array_equal(close, expected_close)  # the relation the hand example needs
    merged = greedy_merge(props, tau)
    expected = torch.stack([props[[0, 1]].mean(0), props[[1, 2, 3]].mean(0), props[4]])
    torch.testing.assert_close(merged, expected)


def test_first_merge_is_mean_of_close_maps():
    maps = aggregate_attention(
        sa.make_maps(sa.voronoi_labels(4, 16, seed=3), 4.0, resolutions=SMALL, noise=1.0),
        out_res=16,
    )
    flat = maps[0].reshape(256, 256).double()
    anchors = anchor_indices(8, 16)
    tau = 0.5
    props = first_merge(flat, anchors, tau)
    dist = symmetric_kl_reference(flat[anchors], flat)
    sizes = []
    for k, a in enumerate(anchors.tolist()):
        member = dist[k] < tau
        member[a] = True
        sizes.append(int(member.sum()))
        torch.testing.assert_close(props[k], flat[member].mean(0))
    # Partial neighbourhoods, not all or nothing.
    assert max(sizes) < 256 and np.median(sizes) > 1
    # Batched input gives the same proposals.
    torch.testing.assert_close(
        first_merge(flat.unsqueeze(0).expand(2, -1, -1), anchors, tau)[1], props
    )


# ---- the whole segmentor --------------------------------------------------------------------


@pytest.mark.parametrize(
    "labels,noise",
    [(sa.block_labels(2, 2), 0.0), (sa.voronoi_labels(6, seed=5), 0.7)],
    ids=["blocks", "voronoi-noisy"],
)
def test_segments_structured_attention_into_its_regions(labels, noise):
    maps = sa.make_maps(labels, 6.0, batch=1, noise=noise, seed=5)
    pred = DiffSeg().segment(maps, output_size=64)
    assert pred.shape == (1, 64, 64) and pred.dtype == torch.int64
    acc, n_seg = sa.region_agreement(pred[0], labels)
    assert n_seg == int(labels.max()) + 1
    assert acc > 0.97


def test_threshold_sweep_merges_monotonically():
    # Four blocks in two pairs: a pair attends to each other a bit, the pairs not at all.
    aff = torch.tensor([[6.0, 3, 0, 0], [3, 6, 0, 0], [0, 0, 6, 3], [0, 0, 3, 6]])
    labels = sa.block_labels(2, 2, 16)
    maps = sa.make_maps(labels, aff, resolutions=SMALL)
    counts = []
    for tau in [0.05, 0.3, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 15.0]:
        pred = _small_segmentor(kl_threshold=tau).segment(maps, output_size=16)[0]
        counts.append(int(pred.unique().numel()))
    assert counts == sorted(counts, reverse=True)
    assert counts[0] == 4 and counts[-1] == 1 and 2 in counts
    # At the 2-segment level the pairs are the segments.
    tau2 = [0.05, 0.3, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 15.0][counts.index(2)]
    pred = _small_segmentor(kl_threshold=tau2).segment(maps, output_size=16)[0]
    acc, _ = sa.region_agreement(pred, torch.tensor([0, 0, 1, 1])[labels])
    assert acc == 1.0


def test_thresholds_per_iteration_and_describe():
    ds = DiffSeg(kl_threshold=[1.1, 0.9])
    assert ds.num_iterations == 2 and ds.thresholds == [1.1, 0.9]
    assert DiffSeg().thresholds == [1.1, 1.1, 1.1]
    assert DiffSeg(0.9, num_iterations=1).thresholds == [0.9]
    described = ds.describe()
    assert described["kl_threshold"] == [1.1, 0.9] and described["num_iterations"] == 2
    assert described["name"] == "diffseg" and described["pamr"] is False
    assert ds.hints == () and ds.name == "diffseg"
    with pytest.raises(ValueError, match="one threshold per iteration"):
        DiffSeg(kl_threshold=[1.1, 0.9], num_iterations=3)
    with pytest.raises(ValueError, match=r"kl_threshold=0.0 is invalid: it must be a number > 0"):
        DiffSeg(kl_threshold=0.0)
    with pytest.raises(ValueError, match=r"kl_threshold='abc' is invalid"):
        DiffSeg(kl_threshold="abc")
    with pytest.raises(ValueError, match=r"num_points=0 is invalid: it must be an integer >= 1"):
        DiffSeg(num_points=0)
    with pytest.raises(ValueError, match="not understood"):
        DiffSeg(weights="nope")
    # A single iteration keeps one proposal per anchor before NMS.
    maps = sa.make_maps(sa.block_labels(2, 2, 16), 6.0, resolutions=SMALL)
    assert _small_segmentor(num_iterations=1).propose(maps)[0].shape == (64, 16, 16)
    assert _small_segmentor().propose(maps)[0].shape[0] == 4


def test_batch_shapes_and_output_sizes():
    labels = torch.stack(
        [sa.block_labels(1, 2, 16), sa.block_labels(2, 2, 16), sa.block_labels(1, 1, 16)]
    )
    maps = sa.make_maps(labels, 6.0, resolutions=SMALL)
    ds = _small_segmentor()
    out = ds.segment(maps, output_size=40)
    assert out.shape == (3, 40, 40) and out.dtype == torch.int64 and out.device == maps[16].device
    assert [int(o.unique().numel()) for o in out] == [2, 4, 1]
    # Each image alone gives the same answer as in the batch.
    for b in range(3):
        alone = ds.segment({r: m[b : b + 1] for r, m in maps.items()}, output_size=40)
        assert torch.equal(alone[0], out[b])
    assert ds.segment(maps, output_size=(24, 32)).shape == (3, 24, 32)
    # Half-precision attention is accepted (aggregated in float32).
    assert torch.equal(ds.segment({r: m.half() for r, m in maps.items()}, output_size=40), out)
    # Inputs meant for other methods are errors, not silently ignored.
    with pytest.raises(TypeError):
        ds.segment(maps, output_size=8, num_clusters=[2, 2, 2])
    with pytest.raises(ValueError, match="takes no hint"):
        ds.segment(maps, output_size=8, hints={"num_classes": [2, 2, 2]})


def test_degenerate_inputs():
    uniform = {r: torch.full((2, r * r, r * r), 1.0 / (r * r)) for r in (64, 32, 16, 8)}
    out = DiffSeg().segment(uniform, output_size=32)
    assert out.shape == (2, 32, 32) and bool((out == out[0, 0, 0]).all())
    single = sa.make_maps(sa.block_labels(1, 1, 16), 6.0, resolutions=SMALL, noise=0.1)
    assert _small_segmentor().segment(single, output_size=16).unique().numel() == 1


def test_zero_aggregated_entries_refused_or_floored():
    maps = sa.make_maps(sa.block_labels(2, 2, 16), 6.0, resolutions=SMALL)
    # A key column that every resolution leaves at exactly 0 (float16 underflow).
    zeroed = {}
    for r, m in maps.items():
        m = m.clone()
        m[..., 0] = 0
        zeroed[r] = m / m.sum(-1, keepdim=True)
    zeroed = {16: zeroed[16]}
    with pytest.raises(ValueError, match="zero entries.*min_prob"):
        _small_segmentor(resolutions=[16]).segment(zeroed, output_size=16)
    out = _small_segmentor(resolutions=[16], min_prob=1e-12).segment(zeroed, output_size=16)
    assert out.unique().numel() == 4


def test_refinement_matches_sklearn_kmeans():
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    maps = aggregate_attention(
        sa.make_maps(sa.voronoi_labels(5, 16, seed=7), 3.0, resolutions=SMALL, noise=1.5, seed=7),
        out_res=16,
    )
    flat = maps[0].reshape(256, 256).double()
    init = first_merge(flat, anchor_indices(4, 16), 1.0)
    km = sklearn_cluster.KMeans(n_clusters=16, init=init.numpy(), n_init=1).fit(flat.numpy())
    expected = np.stack(
        [flat.numpy()[km.labels_ == k].mean(0) for k in range(16) if (km.labels_ == k).any()]
    )
    refined = refine_proposals(flat, init)
    np.testing.assert_allclose(refined.numpy(), expected, rtol=1e-8, atol=1e-12)
    # The option runs end to end.
    pred = _small_segmentor(refine=True).segment(
        sa.make_maps(sa.block_labels(2, 2, 16), 6.0, resolutions=SMALL), output_size=16
    )
    assert sa.region_agreement(pred[0], sa.block_labels(2, 2, 16)) == (1.0, 4)


def test_proposals_to_labels():
    # Two proposals, left-high and right-high ramps: the argmax splits the image in halves.
    ramp = torch.linspace(0, 1, 8).expand(8, 8)
    props = torch.stack([1 - ramp, ramp])
    lab = proposals_to_labels(props, 16)
    assert lab.shape == (16, 16) and lab.dtype == torch.int64
    assert bool((lab[:, :8] == 0).all()) and bool((lab[:, 8:] == 1).all())
    # It is the argmax of the bilinear (half-pixel, no antialias) upsampling, whatever the chunk.
    many = torch.rand(40, 8, 8, generator=torch.Generator().manual_seed(0))
    up = F.interpolate(many[None], size=(24, 24), mode="bilinear", align_corners=False)[0]
    for chunk in (1, 7, 64):
        assert torch.equal(proposals_to_labels(many, 24, chunk=chunk), up.argmax(0))
    batched = proposals_to_labels(torch.stack([props, props.flip(0)]), 16)
    assert batched.shape == (2, 16, 16) and torch.equal(batched[1], 1 - lab)
    assert proposals_to_labels([props, props[:1]], 16).shape == (2, 16, 16)
    assert torch.equal(proposals_to_labels(props.reshape(2, 64), 16), lab)
    with pytest.raises(ValueError, match="K >= 1"):
        proposals_to_labels(torch.zeros(0, 8, 8), 16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    maps = sa.make_maps(sa.voronoi_labels(6, seed=5), 6.0, batch=2, noise=0.7, seed=5)
    cpu = DiffSeg().segment(maps, output_size=128)
    gpu = DiffSeg().segment({r: m.cuda() for r, m in maps.items()}, output_size=128)
    assert gpu.device.type == "cuda"
    assert (gpu.cpu() == cpu).float().mean() > 0.999
