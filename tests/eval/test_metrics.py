"""Per-image Hungarian matching (eval/metrics.py) against hand-computed cases and brute force."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from eval.metrics import HungarianMetrics, confusion_matrix, json_safe, match_image

# ---------------------------------------------------------------- hand-computed cases


def test_perfect_prediction_any_pred_on_ignored_pixels():
    label = np.array([[0, 0, 1, 1], [2, 2, 1, -1], [2, 2, -1, -1]])
    pred = np.where(label >= 0, label, 9)  # ignored pixels carry a segment of their own
    m = HungarianMetrics(num_classes=3)
    (rec,) = m.update(pred, label)
    assert rec["tp"] == [2, 3, 4] and rec["fp"] == [0, 0, 0] and rec["fn"] == [0, 0, 0]
    assert rec["acc"] == 100.0 and rec["miou"] == 100.0
    assert rec["pixels"] == 9 and rec["num_classes"] == 3
    assert rec["num_segments"] == 4  # 0, 1, 2 and 9 (counted over all pixels)
    out = m.compute()
    assert out["acc"] == 100.0 and out["miou"] == 100.0 and out["classes_counted"] == 3


def test_permuted_ids_are_still_perfect():
    rng = np.random.default_rng(1)
    label = rng.integers(-1, 5, size=(2, 16, 16))
    perm = np.array([40, 3, 17, 0, 1000])  # arbitrary, non-contiguous ids
    pred = np.where(label >= 0, perm[label.clip(0)], 0)
    m = HungarianMetrics(num_classes=5)
    recs = m.update(torch.from_numpy(pred), torch.from_numpy(label))
    assert all(r["acc"] == 100.0 and r["miou"] == 100.0 for r in recs)
    assert m.fp.sum() == 0 and m.fn.sum() == 0 and m.tp.sum() == (label >= 0).sum()
    # Segment 1000 is column 1000 of a 5 x 1001 matrix: ids are not renumbered.
    assert confusion_matrix(pred[0], label[0], 5).shape == (5, 1001)
    assert match_image(pred[0], label[0], 5).segment_of_class.tolist() == perm.tolist()


def test_extra_segment_counts_as_false_negative_only():
    # Class 0 (8 px) split into segments 0 (6 px) and 2 (2 px); class 1 (4 px) = segment 1.
    label = np.array([[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1]])
    pred = np.array([[0, 0, 0, 2, 1, 1], [0, 0, 0, 2, 1, 1]])
    (rec,) = HungarianMetrics(num_classes=2).update(pred, label)
    assert rec["tp"] == [6, 4] and rec["fn"] == [2, 0] and rec["fp"] == [0, 0]
    assert rec["acc"] == pytest.approx(100 * 10 / 12)
    assert rec["miou"] == pytest.approx(100 * (6 / 8 + 1) / 2)
    assert rec["num_segments"] == 3


def test_fewer_segments_than_classes():
    # Segment 0 covers class 0 (4 px) and class 1 (2 px); segment 1 covers class 2 (3 px).
    label = np.array([[0, 0, 0, 0, 1, 1, 2, 2, 2]])
    pred = np.array([[0, 0, 0, 0, 0, 0, 1, 1, 1]])
    m = HungarianMetrics(num_classes=3)
    (rec,) = m.update(pred, label)
    assert confusion_matrix(pred, label, 3).tolist() == [[4, 0, 0], [2, 0, 0], [0, 3, 0]]
    assert rec["tp"] == [4, 0, 3] and rec["fn"] == [0, 2, 0] and rec["fp"] == [2, 0, 0]
    out = m.compute()
    assert out["acc"] == pytest.approx(100 * 7 / 9)
    assert out["iou_per_class"] == pytest.approx([100 * 4 / 6, 0.0, 100.0])
    assert out["miou"] == pytest.approx(100 * (4 / 6 + 0 + 1) / 3)
    assert out["classes_counted"] == 3


def test_all_pixels_ignored():
    label = np.full((4, 4), -1)
    pred = np.arange(16).reshape(4, 4)
    m = HungarianMetrics(num_classes=3)
    (rec,) = m.update(pred, label)
    assert rec["pixels"] == 0 and rec["acc"] is None and rec["miou"] is None
    assert rec["tp"] == rec["fp"] == rec["fn"] == [0, 0, 0]
    assert rec["num_segments"] == 16 and rec["num_classes"] == 0
    out = m.compute()
    assert out["num_images"] == 1 and out["pixels"] == 0
    assert math.isnan(out["acc"]) and math.isnan(out["miou"]) and out["classes_counted"] == 0
    json.dumps(json_safe(out), allow_nan=False)  # strict JSON after json_safe


def test_classes_missing_from_an_image_are_left_out_of_the_mean():
    label = np.array([[1, 1, 3, 3], [1, 1, 3, 3]])
    pred = np.array([[0, 0, 1, 1], [0, 0, 1, 0]])  # one class-3 pixel goes to segment 0
    m = HungarianMetrics(num_classes=5)
    (rec,) = m.update(pred, label)
    # Absent classes 0, 2, 4 take the empty columns 2..4 (col sum 0): no FP, IoU undefined.
    assert rec["tp"] == [0, 4, 0, 3, 0] and rec["fn"] == [0, 0, 0, 1, 0]
    assert rec["fp"] == [0, 1, 0, 0, 0]
    assert rec["miou"] == pytest.approx(100 * (4 / 5 + 3 / 4) / 2) and rec["num_classes"] == 2
    out = m.compute()
    assert out["classes_counted"] == 2
    assert [math.isnan(v) for v in out["iou_per_class"]] == [True, False, True, False, True]
    # A second image with class 0 adds it to the dataset mean.
    m.update(np.zeros((2, 2), dtype=np.int64), np.zeros((2, 2), dtype=np.int64))
    assert m.compute()["classes_counted"] == 3


def test_absent_class_ties_follow_the_solver_on_the_release_matrix():
    # Class 2 is absent: its zero row ties between every column, and the solver's choice
    # decides whether the leftover segment's 2 pixels become its FP (IoU 0, counted in the
    # mean). So the result depends on the segment ids themselves, exactly as in the release:
    # here renaming the leftover segment from 2 to 3 moves class 2 from FP = 2 to FP = 0.
    label = np.array([[0, 0, 0, 0, 1, 1, -1], [0, 0, 0, 0, 1, 1, -1]])
    base = np.array([[0, 0, 0, 9, 1, 1, 3], [0, 0, 0, 9, 1, 1, 2]])
    fps = []
    for leftover, hist in [
        (2, [[6, 0, 2, 0], [0, 4, 0, 0], [0, 0, 0, 0]]),
        (3, [[6, 0, 0, 2], [0, 4, 0, 0], [0, 0, 0, 0]]),
    ]:
        pred = np.where(base == 9, leftover, base)
        hist = np.array(hist, dtype=np.int64)
        assert confusion_matrix(pred, label, 3).tolist() == hist.tolist()
        _, cols = linear_sum_assignment(hist, maximize=True)
        m = match_image(pred, label, num_classes=3)
        assert m.segment_of_class.tolist() == cols.tolist()
        assert m.tp.tolist() == [6, 4, 0] and m.fn.tolist() == [2, 0, 0]
        fps.append(m.fp.tolist())
    assert fps == [[0, 0, 2], [0, 0, 0]]


def test_columns_come_from_the_largest_id_over_all_pixels():
    # Segment 7 covers only an unlabelled pixel, yet it widens the matrix to 8 columns,
    # as in the release (which takes K before masking).
    label = np.array([[0, 1, -1]])
    pred = np.array([[0, 1, 7]])
    assert confusion_matrix(pred, label, 2).shape == (2, 8)
    assert confusion_matrix(pred[:, :2], label[:, :2], 2).shape == (2, 2)
    assert confusion_matrix(np.array([[0, 0]]), np.array([[0, 1]]), 4).shape == (4, 4)


# ---------------------------------------------------------------- brute force


def brute_force(pred, label, num_classes, ignore_index=-1):
    """Enumerate every one-to-one class -> column assignment on a loop-built matrix."""
    ncols = max(num_classes, max(max(row) for row in pred) + 1)
    hist = [[0] * ncols for _ in range(num_classes)]
    for prow, lrow in zip(pred, label, strict=True):
        for p, lab in zip(prow, lrow, strict=True):
            if lab != ignore_index:
                hist[lab][p] += 1
    best, optima = -1, []
    for cols in itertools.permutations(range(ncols), num_classes):
        total = sum(hist[c][k] for c, k in enumerate(cols))
        if total > best:
            best, optima = total, [cols]
        elif total == best:
            optima.append(cols)

    def counts(cols):
        tp = [hist[c][k] for c, k in enumerate(cols)]
        fn = [sum(hist[c]) - tp[c] for c in range(num_classes)]
        fp = [sum(hist[r][k] for r in range(num_classes)) - tp[c] for c, k in enumerate(cols)]
        return tp, fp, fn

    return best, optima, counts


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_on_tiny_images(seed):
    rng = np.random.default_rng(seed)
    unique_seen = 0
    for _ in range(40):
        c = int(rng.integers(2, 5))
        h, w = int(rng.integers(1, 4)), int(rng.integers(2, 5))
        label = rng.integers(-1, c, size=(h, w))
        pred = rng.integers(0, int(rng.integers(1, 7)), size=(h, w))
        best, optima, counts = brute_force(pred.tolist(), label.tolist(), c)
        m = match_image(pred, label, num_classes=c)
        assert int(m.tp.sum()) == best
        cols = tuple(m.segment_of_class.tolist())
        assert cols in optima
        tp, fp, fn = counts(cols)
        assert (m.tp.tolist(), m.fp.tolist(), m.fn.tolist()) == (tp, fp, fn)
        if len(optima) == 1:
            unique_seen += 1
        assert m.pixels == int((label >= 0).sum())
    assert unique_seen > 0  # the unique-optimum comparison really ran


# ---------------------------------------------------------------- combining results


def _random_batch(seed, b=10, size=12, c=6):
    rng = np.random.default_rng(seed)
    label = rng.integers(-1, c, size=(b, size, size))
    label[:, : size // 2] = rng.integers(0, c, size=(b, 1, 1))  # big blobs, some classes absent
    pred = np.where(rng.random((b, size, size)) < 0.7, label.clip(0), rng.integers(0, 9, (b, 1, 1)))
    pred = pred * int(rng.integers(1, 4)) + rng.integers(0, 3, (b, 1, 1))  # odd ids per image
    return pred, label


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], float):
            assert (math.isnan(a[k]) and math.isnan(b[k])) or a[k] == b[k], k
        elif k == "iou_per_class":
            assert np.array_equal(np.array(a[k]), np.array(b[k]), equal_nan=True)
        else:
            assert a[k] == b[k], k


def test_order_batching_merge_records_and_state_agree():
    pred, label = _random_batch(0)
    whole = HungarianMetrics(num_classes=6)
    records = whole.update(pred, label)
    ref = whole.compute()
    assert ref["num_images"] == 10 and ref["pixels"] == int((label >= 0).sum())

    order = np.random.default_rng(1).permutation(10)
    one_by_one = HungarianMetrics(num_classes=6)
    shuffled_records = [one_by_one.update(pred[i], label[i])[0] for i in order]
    _same(one_by_one.compute(), ref)
    assert [
        records[i] for i in order
    ] == shuffled_records  # per-image records don't depend on batch

    parts = [HungarianMetrics(num_classes=6) for _ in range(3)]
    for part, idx in zip(parts, np.array_split(order, 3), strict=True):
        part.update(torch.from_numpy(pred[idx]), torch.from_numpy(label[idx]))
    merged = HungarianMetrics(num_classes=6)
    for part in parts[::-1]:
        merged.merge(part)
    _same(merged.compute(), ref)

    restored = HungarianMetrics.from_state(json.loads(json.dumps(parts[0].state())))
    restored.merge(json.loads(json.dumps(parts[1].state())))
    restored.add_records(json.loads(json.dumps([records[i] for i in np.array_split(order, 3)[2]])))
    _same(restored.compute(), ref)

    replay = HungarianMetrics(num_classes=6)
    replay.add_records(records[::-1])
    _same(replay.compute(), ref)
    assert all(isinstance(v, int) for v in replay.state()["tp"])


def test_records_are_consistent_with_their_counts():
    pred, label = _random_batch(3)
    for rec in HungarianMetrics(num_classes=6).update(pred, label):
        json.dumps(rec, allow_nan=False)
        tp, fp, fn = (np.array(rec[k]) for k in ("tp", "fp", "fn"))
        assert rec["acc"] == pytest.approx(100 * tp.sum() / rec["pixels"])
        denom = tp + fp + fn
        assert rec["miou"] == pytest.approx(100 * np.mean(tp[denom > 0] / denom[denom > 0]))


def test_torch_numpy_and_dtypes_agree():
    pred, label = _random_batch(5, b=3)
    ref = HungarianMetrics(num_classes=6).update(pred, label)
    assert (
        HungarianMetrics(num_classes=6).update(pred.astype(np.uint16), label.astype(np.int8)) == ref
    )
    t = HungarianMetrics(num_classes=6).update(
        torch.from_numpy(pred).to(torch.int32), torch.from_numpy(label)
    )
    assert t == ref


def test_ignore_index_other_than_minus_one():
    label = np.array([[0, 1, 255, 255]], dtype=np.uint8)
    pred = np.array([[3, 4, 3, 9]])
    (rec,) = HungarianMetrics(num_classes=2, ignore_index=255).update(pred, label)
    assert rec["tp"] == [1, 1] and rec["pixels"] == 2 and rec["num_segments"] == 3


def test_class_of_segment_inverts_the_matching():
    label = np.array([[0, 0, 1, 1, 2]])
    pred = np.array([[4, 4, 1, 1, 6]])
    m = match_image(pred, label, num_classes=3)
    colour = m.class_of_segment(7)[pred]
    assert colour.tolist() == label.tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inputs_give_the_same_records():
    pred, label = _random_batch(7)
    ref = HungarianMetrics(num_classes=6).update(pred, label)
    got = HungarianMetrics(num_classes=6).update(
        torch.from_numpy(pred).cuda(), torch.from_numpy(label).cuda()
    )
    assert got == ref


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("pred", "label", "match"),
    [
        (np.zeros((2, 2), int), np.array([[0, 27], [0, 0]]), "class 27"),
        (np.zeros((2, 2), int), np.array([[0, -2], [0, 0]]), "class -2"),
        (np.array([[0, -1], [0, 0]]), np.zeros((2, 2), int), "negative segment id"),
        (np.zeros((2, 2)), np.zeros((2, 2), int), "must hold integers"),
        (np.zeros((2, 2), int), np.zeros((2, 3), int), "shapes differ"),
        (np.zeros((1, 1, 2, 2), int), np.zeros((1, 1, 2, 2), int), r"\(B, H, W\)"),
        ([[0]], np.zeros((1, 1), int), "torch.Tensor or numpy"),
    ],
)
def test_bad_inputs_raise_clear_errors(pred, label, match):
    m = HungarianMetrics()
    with pytest.raises((ValueError, TypeError), match=match):
        m.update(pred, label)
    assert m.num_images == 0 and m.pixels == 0


def test_bad_construction_merge_and_records():
    with pytest.raises(ValueError, match="ignore_index=3"):
        HungarianMetrics(num_classes=5, ignore_index=3)
    with pytest.raises(ValueError, match="27 classes"):
        HungarianMetrics(num_classes=27).merge(HungarianMetrics(num_classes=5))
    m = HungarianMetrics(num_classes=2)
    good = {"tp": [1, 0], "fp": [0, 0], "fn": [0, 1], "pixels": 2}
    with pytest.raises(ValueError, match="expected 2"):
        m.add_records([good, {"tp": [1], "fp": [0], "fn": [0], "pixels": 1}])
    with pytest.raises(ValueError, match="inconsistent"):
        m.add_records([{**good, "pixels": 5}])
    with pytest.raises(ValueError, match="record 0"):
        m.add_records([{"acc": 1.0}])
    assert m.num_images == 0  # nothing half-added
