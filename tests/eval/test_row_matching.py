"""Row matching (eval/metrics.py ``matching="row"``), the Seg4Diff release's evaluator.

The reference below is written from a reading of that release's evaluator: it hands one (H, W)
prediction and label to a function that loops over axis 0 as a batch, so each pixel row gets
its own confusion matrix (N rows, max(N, largest id in the row + 1) columns, pixels with a
label outside [0, N) left out), its own ``linear_sum_assignment(maximize=True)``, and its
TP/FP/FN are added up over the rows.
"""

import json

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import eval.metrics as metrics_module
from eval.metrics import MATCHINGS, HungarianMetrics, match_image


def release_rows(pred, label, n):
    """Plain-loop per-row matching. pred, label: (H, W) int arrays. Returns tp, fp, fn, pixels.

    Every row is matched, even one without a labelled pixel (its matrix is all zeros).
    """
    tp, fp, fn = (np.zeros(n, dtype=np.int64) for _ in range(3))
    pixels = 0
    for prow, lrow in zip(pred.tolist(), label.tolist(), strict=True):
        ncols = max(n, max(prow) + 1)
        hist = np.zeros((n, ncols), dtype=np.int64)
        for p, lab in zip(prow, lrow, strict=True):
            if 0 <= lab < n:
                hist[lab, p] += 1
        rows, cols = linear_sum_assignment(hist, maximize=True)
        matched = hist[rows, cols]
        tp += matched
        fn += hist.sum(axis=1) - matched
        fp += hist[:, cols].sum(axis=0) - matched
        pixels += int(hist.sum())
    return tp, fp, fn, pixels


def _random_case(rng):
    """(pred, label, n, ignore_index) with ignored pixels, fully ignored rows, sparse ids."""
    n = int(rng.integers(1, 7))
    h, w = int(rng.integers(1, 10)), int(rng.integers(1, 10))
    ignore_index = int(rng.choice([-1, 255]))
    label = rng.integers(0, n, size=(h, w))
    label[rng.random((h, w)) < rng.uniform(0, 0.5)] = ignore_index
    label[rng.random(h) < 0.25] = ignore_index  # rows with no labelled pixel
    ids = rng.permutation(int(rng.integers(1, 20)))  # a few ids, possibly > n
    pred = ids[rng.integers(0, min(len(ids), int(rng.integers(1, 8))), size=(h, w))]
    return pred, label, n, ignore_index


def test_row_matching_equals_the_release_loop_on_random_cases():
    rng = np.random.default_rng(0)
    empty_rows = wide_rows = differs = 0
    for _ in range(120):
        pred, label, n, ignore = _random_case(rng)
        m = match_image(pred, label, num_classes=n, ignore_index=ignore, matching="row")
        tp, fp, fn, pixels = release_rows(pred, label, n)
        for got, want in ((m.tp, tp), (m.fp, fp), (m.fn, fn)):
            assert got.tolist() == want.tolist()
        assert m.pixels == pixels == int(m.tp.sum() + m.fn.sum())
        assert m.num_segments == len(np.unique(pred))  # the whole image, as in "image" mode
        assert m.num_classes == len(np.unique(label[label != ignore]))
        assert m.segment_of_class.tolist() == [-1] * n and m.matching == "row"
        empty_rows += int(((label == ignore).all(axis=1)).any())
        wide_rows += int((pred.max(axis=1) >= n).any())
        whole = match_image(pred, label, num_classes=n, ignore_index=ignore)
        differs += int(whole.tp.tolist() != m.tp.tolist() or whole.fp.tolist() != m.fp.tolist())
    # The cases really covered the edges, and row matching is not image matching in disguise.
    assert empty_rows > 10 and wide_rows > 10 and differs > 10


def test_a_single_segment_scores_far_higher_per_row_on_a_striped_scene():
    # Four classes in horizontal bands of 3 rows: every row holds one class only.
    label = np.repeat(np.arange(4), 3)[:, None].repeat(8, axis=1)
    pred = np.zeros_like(label)
    image = match_image(pred, label, num_classes=4)
    row = match_image(pred, label, num_classes=4, matching="row")
    # Per image the segment is one class (IoU 1/4), the other three get nothing.
    assert image.miou == pytest.approx(100 * 0.25 / 4) and image.acc == pytest.approx(25.0)
    # Per row the segment is matched to that row's class: a perfect score.
    assert row.miou == 100.0 and row.acc == 100.0
    assert row.tp.tolist() == [24] * 4 and row.fp.sum() == 0 and row.fn.sum() == 0
    assert row.num_segments == image.num_segments == 1 and row.num_classes == 4


def test_row_records_add_up_through_update_merge_and_add_records():
    rng = np.random.default_rng(4)
    label = rng.integers(-1, 5, size=(6, 10, 12))
    label[:, 2] = -1  # one unlabelled row per image
    pred = rng.integers(0, 9, size=(6, 10, 12))
    m = HungarianMetrics(num_classes=5, matching="row")
    records = m.update(torch.from_numpy(pred), torch.from_numpy(label))
    singles = [match_image(p, lab, 5, matching="row") for p, lab in zip(pred, label, strict=True)]
    assert [r["tp"] for r in records] == [s.tp.tolist() for s in singles]
    assert m.tp.tolist() == np.sum([s.tp for s in singles], axis=0).tolist()
    assert m.fp.tolist() == np.sum([s.fp for s in singles], axis=0).tolist()
    assert m.pixels == int((label >= 0).sum()) and m.num_images == 6
    assert set(records[0]) == set(HungarianMetrics(5).update(pred[0], label[0])[0])  # same keys

    replay = HungarianMetrics(num_classes=5, matching="row")
    replay.add_records(json.loads(json.dumps(records)))
    assert replay.state() == m.state()
    state = json.loads(json.dumps(m.state()))
    assert state["matching"] == "row"
    again = HungarianMetrics.from_state(state)
    assert again.matching == "row" and again.state() == m.state()
    assert "matching='row'" in repr(again) and "matching" not in repr(HungarianMetrics(5))
    # Not the image matching's totals.
    assert HungarianMetrics(5).update(pred, label) != records


def test_merge_refuses_mixed_matchings():
    image, row = HungarianMetrics(3), HungarianMetrics(3, matching="row")
    with pytest.raises(ValueError, match="matching='row' into metrics with matching='image'"):
        image.merge(row)
    with pytest.raises(ValueError, match="matching='image' into metrics with matching='row'"):
        row.merge(image.state())
    old = {k: v for k, v in image.state().items() if k != "matching"}  # a state from before
    assert HungarianMetrics.from_state(old).matching == "image"
    image.merge(old)
    with pytest.raises(ValueError, match="matching='image'"):
        row.merge(old)


@pytest.mark.parametrize("bad", ["rows", "Image", None, 1])
def test_bad_matching_names_the_value_and_the_choices(bad):
    for make in (
        lambda: HungarianMetrics(3, matching=bad),
        lambda: match_image(np.zeros((2, 2), int), np.zeros((2, 2), int), 3, matching=bad),
    ):
        with pytest.raises(ValueError, match=rf"matching={bad!r}.*'image', 'row'"):
            make()
    assert MATCHINGS == ("image", "row")


def test_row_mode_has_no_per_image_class_of_segment():
    m = match_image(np.array([[0, 1]]), np.array([[0, 1]]), 2, matching="row")
    with pytest.raises(ValueError, match="matching='image'"):
        m.class_of_segment()
    image = match_image(np.array([[0, 1]]), np.array([[0, 1]]), 2)
    assert image.class_of_segment().tolist() == [0, 1]


def test_errors_name_the_image_and_the_row():
    label = np.zeros((2, 4, 3), dtype=np.int64)
    label[1, 2, 1] = 7
    with pytest.raises(ValueError, match=r"class 7 \(image 1, pixel row 2\)"):
        HungarianMetrics(3, matching="row").update(np.zeros_like(label), label)
    with pytest.raises(ValueError, match="negative segment id"):
        match_image(-np.ones((2, 2), int), np.zeros((2, 2), int), 3, matching="row")


def test_row_blocks_give_the_same_counts(monkeypatch):
    # Rows are histogrammed in blocks to bound memory; blocks of differing widths must add up.
    rng = np.random.default_rng(8)
    label = rng.integers(-1, 4, size=(9, 7))
    pred = rng.integers(0, 5, size=(9, 7))
    pred[7, 3] = 40  # one late row much wider than the rest
    ref = match_image(pred, label, 4, matching="row")
    monkeypatch.setattr(metrics_module, "_ROW_BLOCK", 1)  # one row a block
    one = match_image(pred, label, 4, matching="row")
    monkeypatch.setattr(metrics_module, "_ROW_BLOCK", 5 * 41 * 3)  # three rows a block
    three = match_image(pred, label, 4, matching="row")
    for m in (one, three):
        assert m.record() == ref.record()
    tp, fp, fn, _ = release_rows(pred, label, 4)
    assert ref.tp.tolist() == tp.tolist() and ref.fp.tolist() == fp.tolist()


def test_empty_images():
    for shape in [(0, 5), (3, 0)]:
        m = match_image(np.zeros(shape, int), np.zeros(shape, int), 3, matching="row")
        assert m.pixels == 0 and m.tp.tolist() == [0, 0, 0] and m.num_segments == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_row_matching_gives_the_same_records():
    rng = np.random.default_rng(9)
    label = rng.integers(-1, 6, size=(4, 16, 16))
    pred = rng.integers(0, 11, size=(4, 16, 16))
    ref = HungarianMetrics(6, matching="row").update(pred, label)
    got = HungarianMetrics(6, matching="row").update(
        torch.from_numpy(pred).cuda(), torch.from_numpy(label).cuda()
    )
    assert got == ref
