"""``eval.metrics.merge_background``: DiffCut's many-to-one background rule, on hand-computed cases.

Notation: one-row images; classes 0..C-2 are objects and C-1 the background unless stated.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffseg.data.ade20k import ADE20K
from diffseg.data.voc import PascalVOC
from diffseg.testing import fakedata_diffcut as fx
from eval.metrics import HungarianMetrics, merge_background
from eval.score import main


def merged(pred, label, background_index, **kw) -> list[int]:
    out = merge_background(np.array([pred]), np.array([label]), background_index, **kw)
    return out[0].tolist()


def test_segment_of_an_absent_class_is_merged():
    # Objects 0, 1, 2 (2 absent), background 3. Rows: class 0 -> segment 5, class 1 -> 6; the
    # absent class 2 takes some other column (a tie) and keeps nothing. Segments 7 and 8 cover
    # the background: they become one segment, 8 + 1.
    assert merged([5, 5, 6, 6, 7, 8], [0, 0, 1, 1, 3, 3], 3) == [5, 5, 6, 6, 9, 9]


def test_segment_matched_with_zero_overlap_survives():
    # Objects 0, 1, background 2; two columns (ids 0, 1): class 0 takes segment 0 (3 pixels),
    # so class 1 gets segment 1, which holds none of its pixels. Class 1's row has a pixel in
    # a matched column (segment 0), so the row is kept and segment 1 survives: nothing merges.
    assert merged([0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 2, 2], 2) == [0, 0, 0, 0, 1, 1]


def test_void_pixels_count_for_no_class():
    # Pixels labelled -1 are left out of the matrix: segment 1 lies on them only, segment 2 on
    # the background; class 1 is absent. Both merge into 2 + 1.
    assert merged([0, 0, 1, 1, 2, 2], [0, 0, -1, -1, 2, 2], 2) == [0, 0, 3, 3, 3, 3]


def test_ids_are_not_renumbered_and_new_id_is_max_plus_one():
    # Ten columns (ids up to 9). Segment 9 is the background's: merged into 9 + 1 = 10.
    assert merged([0, 0, 9, 9], [0, 0, 2, 2], 2) == [0, 0, 10, 10]
    # When every segment survives the map is returned unchanged.
    assert merged([4, 4, 7], [0, 0, 1], 2) == [4, 4, 7]


def test_ties_follow_the_solver_on_the_release_matrix():
    # Objects 0, 1, 2, background 3; three columns. Class 0 takes segment 0; class 1 (kept: its
    # pixel is in segment 0) and the absent class 2 tie over segments 1 and 2. The solver on
    # the (objects x segments) matrix gives class 1 segment 1, so segment 2 is merged.
    pred, label = [0, 0, 0, 0, 1, 1, 2], [0, 0, 0, 1, 3, 3, 3]
    assert merged(pred, label, 3) == [0, 0, 0, 0, 1, 1, 3]
    # The background first (index 0): the object rows keep their order, same result.
    shifted = [(v + 1) % 4 for v in label]
    assert merged(pred, shifted, 0, num_classes=4) == [0, 0, 0, 0, 1, 1, 3]


def test_num_classes_default_and_range():
    # By default the classes are 0..max(background_index, label.max()).
    assert merged([0, 1], [3, 1], 1) == merged([0, 1], [3, 1], 1, num_classes=4) == [0, 2]
    with pytest.raises(ValueError, match="label holds class 3"):
        merge_background(np.array([[0, 1]]), np.array([[3, 1]]), 1, num_classes=3)
    with pytest.raises(ValueError, match="background_index=5"):
        merge_background(np.array([[0, 1]]), np.array([[0, 1]]), 5, num_classes=3)


def test_types_and_dtypes_are_kept():
    label = torch.tensor([[0, 0, 2, 2]])
    out = merge_background(torch.tensor([[0, 0, 1, 3]], dtype=torch.int32), label, 2)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.int32
    assert out.tolist() == [[0, 0, 4, 4]]
    pred = np.array([[0, 0, 1, 255]], dtype=np.uint8)  # 255 + 1 does not fit in uint8
    out = merge_background(pred, label.numpy(), 2)
    assert out.dtype == np.int64 and out.tolist() == [[0, 0, 256, 256]]
    assert pred.tolist() == [[0, 0, 1, 255]]  # the input is not modified
    small = merge_background(np.array([[0, 0, 1, 2]], dtype=np.int16), label.numpy(), 2)
    assert small.dtype == np.int16


def test_bad_inputs():
    with pytest.raises(ValueError, match="shapes differ"):
        merge_background(np.zeros((2, 2), int), np.zeros((2, 3), int), 1)
    with pytest.raises(ValueError, match="negative segment id"):
        merge_background(np.array([[-1, 0]]), np.array([[0, 1]]), 1)
    with pytest.raises(ValueError, match="must be one"):
        merge_background(np.zeros((2, 2, 2), int), np.zeros((2, 2, 2), int), 1)


def test_background_split_into_many_segments_scores_as_one():
    # A VOC-like image: object 0 left, background (class 2) split into segments 2, 3, 4.
    label = np.array([[0, 0, 2, 2, 2, 2]] * 2)
    pred = np.array([[1, 1, 2, 3, 4, 4]] * 2)
    before = HungarianMetrics(num_classes=3).update(pred, label)[0]
    after_pred = merge_background(pred, label, 2)
    assert after_pred.tolist() == [[1, 1, 5, 5, 5, 5]] * 2
    after = HungarianMetrics(num_classes=3).update(after_pred, label)[0]
    # Before: segment 4 (4 pixels) is the background's match, segments 2 and 3 count for nothing.
    assert before["acc"] == pytest.approx(100 * 8 / 12) and after["acc"] == 100.0


# ----------------------------------------------------------------------------- eval.score


def test_score_merges_background_for_voc(tmp_path, capsys):
    ids = fx.write_voc(tmp_path / "VOCdevkit")
    labels = PascalVOC(tmp_path, label_size=12)
    preds = tmp_path / "preds"
    preds.mkdir()
    for i, image_id in enumerate(ids):
        label = labels.load_label(i).numpy()
        # Objects keep one segment each (renamed); the background is split in two halves.
        pred = np.where(label == 20, 40 + (np.arange(12) >= 6)[None, :], 3 * label + 1)
        Image.fromarray(pred.astype(np.uint8)).save(preds / f"{image_id}.png")
    args = ["--dataset", "voc", "--root", str(tmp_path), "--predictions", str(preds)]
    args += ["--resolution", "12"]
    out = tmp_path / "results.json"
    assert main([*args, "--output", str(out)]) == 0
    assert "ACC 100.00  mIoU 100.00  (3 images" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["background_merge"] and result["background_index"] == 20
    assert result["class_names"][20] == "background" and "many-to-one" in result["protocol"]
    assert main([*args, "--no-background-merge"]) == 0
    assert "ACC 100.00" not in capsys.readouterr().out
    assert main([*args, "--other-as-class"]) == 2
    assert "applies to ade20k only" in capsys.readouterr().err


def test_score_ade20k_has_no_background(tmp_path, capsys):
    ids = fx.write_ade20k(tmp_path / "ADEChallengeData2016")
    labels = ADE20K(tmp_path, label_size=10)
    preds = tmp_path / "preds"
    preds.mkdir()
    for i, image_id in enumerate(ids):
        pred = labels.load_label(i).numpy() + 1  # "other" (-1) becomes segment 0
        Image.fromarray(pred.astype(np.uint8)).save(preds / f"{image_id}.png")
    args = ["--dataset", "ade20k", "--root", str(tmp_path), "--predictions", str(preds)]
    assert main([*args, "--resolution", "10"]) == 0
    assert "ACC 100.00  mIoU 100.00  (3 images" in capsys.readouterr().out
    assert main([*args, "--resolution", "10", "--background-merge"]) == 2
    assert "no background class" in capsys.readouterr().err
