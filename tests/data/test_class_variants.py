"""The class-list variants: Cityscapes with the official 19 trainIds besides its 27 classes, and
Pascal Context with its 59 classes alone (background ignored) besides 59 + background; read
from fixture files in the real on-disk formats, scored by eval.score, and run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from diffseg.data import CITYSCAPES27_CLASSES, Cityscapes27, PascalContext, build_dataset
from diffseg.errors import ConfigError, ResumeError
from diffseg.testing import fakedata
from diffseg.testing import fakedata_diffcut as fx

REPO = Path(__file__).resolve().parents[2]
SIZE = 16  # evaluation side of the fixtures

# cityscapesscripts' labels.py, written out here by name: labelId -> trainId of the 19 classes.
OFFICIAL_TRAIN_IDS = {
    "road": (7, 0), "sidewalk": (8, 1), "building": (11, 2), "wall": (12, 3),
    "fence": (13, 4), "pole": (17, 5), "traffic light": (19, 6), "traffic sign": (20, 7),
    "vegetation": (21, 8), "terrain": (22, 9), "sky": (23, 10), "person": (24, 11),
    "rider": (25, 12), "car": (26, 13), "truck": (27, 14), "bus": (28, 15), "train": (31, 16),
    "motorcycle": (32, 17), "bicycle": (33, 18),
}  # fmt: skip


def _all_label_ids(root: Path) -> np.ndarray:
    """One 16x16 labelIds file holding every labelId 0..33; returns the stored map."""
    fakedata.write_cityscapes(root, n=1, size=(SIZE, SIZE), extras=False)
    values = (np.arange(SIZE * SIZE) % 34).astype(np.uint8).reshape(SIZE, SIZE)
    Image.fromarray(values).save(next((root / "gtFine").rglob("*_gtFine_labelIds.png")))
    return values


def _context_file(root: Path, image_id: str) -> Path:
    return root / "VOCdevkit" / "VOC2010" / "SegmentationClassContext" / f"{image_id}.png"


# ----------------------------------------------------------------------------- Cityscapes-19


def test_cityscapes19_maps_every_label_id_to_its_train_id(tmp_path):
    values = _all_label_ids(tmp_path / "cs")
    ds = Cityscapes27(tmp_path / "cs", label_size=SIZE, classes=19)
    by_id = {label_id: train_id for label_id, train_id in OFFICIAL_TRAIN_IDS.values()}
    expected = np.vectorize(lambda v: by_id.get(int(v), -1))(values)
    np.testing.assert_array_equal(ds.load_label(0).numpy(), expected)
    assert sorted(set(range(34)) - set(by_id)) == [0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18,
                                                   29, 30]  # fmt: skip
    assert ds.class_names == list(OFFICIAL_TRAIN_IDS) and ds.num_classes == 19
    # the 27-class reading of the same file is unchanged: labelId - 7, 0..6 ignored
    default = Cityscapes27(tmp_path / "cs", label_size=SIZE)
    wide = values.astype(np.int64)
    np.testing.assert_array_equal(default.load_label(0).numpy(), np.where(wide >= 7, wide - 7, -1))
    assert default.classes == 27 and default.class_names == CITYSCAPES27_CLASSES


def test_cityscapes19_names_are_the_27_class_names_of_their_label_ids():
    for name, (label_id, _) in OFFICIAL_TRAIN_IDS.items():
        assert CITYSCAPES27_CLASSES[label_id - 7] == name


def test_cityscapes19_keeps_values_outside_0_33_errors(tmp_path):
    root = tmp_path / "cs"
    values = _all_label_ids(root)
    values[3, 5] = 34
    Image.fromarray(values).save(next((root / "gtFine").rglob("*_gtFine_labelIds.png")))
    ds = Cityscapes27(root, label_size=SIZE, classes=19)
    with pytest.raises(ValueError, match=r"value 34 \(at row 3, column 5.*labelIds 0\.\.33"):
        ds.load_label(0)


def test_cityscapes_describe_and_title_say_the_classes(tmp_path):
    fakedata.write_cityscapes(tmp_path / "cs", n=1, extras=False)
    ds19 = build_dataset("cityscapes", root=tmp_path / "cs", classes=19)
    desc = ds19.describe()
    assert desc["classes"] == 19 and desc["num_classes"] == 19 and ds19.title == "Cityscapes-19"
    ds27 = Cityscapes27(tmp_path / "cs")
    assert ds27.describe()["classes"] == 27 and ds27.title == "Cityscapes-27"
    assert "classes=19" not in repr(ds27) and "classes=19" in repr(ds19)


@pytest.mark.parametrize("bad", [18, 26, 0, "19", 19.0, True, None])
def test_cityscapes_refuses_other_class_counts(tmp_path, bad):
    fakedata.write_cityscapes(tmp_path / "cs", n=1, extras=False)
    message = rf"Cityscapes: classes={bad!r} is not offered; choose 27 or 19\."
    with pytest.raises(ValueError, match=message):
        Cityscapes27(tmp_path / "cs", classes=bad)


# ----------------------------------------------------------------------------- Pascal Context-59


def test_context59_ignores_the_background(tmp_path):
    ids = fx.write_context(tmp_path / "VOCdevkit")
    ds = PascalContext(tmp_path, label_size=SIZE, classes=59)
    full = PascalContext(tmp_path, label_size=SIZE)
    assert ds.num_classes == 59 and ds.class_names == full.class_names[:59]
    assert ds.class_names[-1] == "wood" and "background" not in ds.class_names
    assert ds.background_index is None and full.background_index == 59
    for k in range(len(ids)):
        label, with_bg = ds.load_label(k).numpy(), full.load_label(k).numpy()
        np.testing.assert_array_equal(label, np.where(with_bg == 59, -1, with_bg))
        assert (label == -1).any() and label.max() <= 58  # the fixtures hold background
    # a value no converted file holds is still an error
    bad = _context_file(tmp_path, ids[0])
    stored = np.array(Image.open(bad))
    stored[0, 0] = 60
    Image.fromarray(stored).save(bad)
    with pytest.raises(ValueError, match=rf"{bad}.*value 60"):
        ds.load_label(0)


def test_context_describe_title_and_bad_class_counts(tmp_path):
    fx.write_context(tmp_path / "VOCdevkit")
    desc = PascalContext(tmp_path, classes=59).describe()
    assert (desc["classes"], desc["num_classes"], desc["background_index"]) == (59, 59, None)
    assert PascalContext(tmp_path, classes=59).title == "Pascal Context-59"
    default = PascalContext(tmp_path)
    assert (default.classes, default.describe()["background_index"]) == (60, 59)
    assert default.title == "Pascal Context"
    for bad in (58, 61, 27, "59"):
        message = rf"Pascal Context: classes={bad!r} is not offered; choose 60 or 59\."
        with pytest.raises(ValueError, match=message):
            PascalContext(tmp_path, classes=bad)


# ----------------------------------------------------------------------------- eval.score


def _perfect_predictions(out: Path, labels) -> Path:
    """Predictions = the labels with classes renamed (and ignored pixels as one more segment)."""
    out.mkdir(parents=True)
    for i, image_id in enumerate(labels.ids):
        pred = (labels.load_label(i).numpy() + 1) * 3
        Image.fromarray(pred.astype(np.uint8)).save(out / f"{image_id}.png")
    return out


def test_eval_score_takes_the_class_variants(tmp_path, capsys):
    from eval.score import main

    root = tmp_path / "cs"
    fakedata.write_cityscapes(root, n=2, size=(20, 40))
    preds = _perfect_predictions(tmp_path / "p19", Cityscapes27(root, label_size=SIZE, classes=19))
    out = tmp_path / "cs19.json"
    args = ["--dataset", "cityscapes", "--root", str(root), "--resolution", str(SIZE)]
    assert main([*args, "--classes", "19", "--predictions", str(preds), "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["classes"] == 19 and res["num_classes"] == 19 and res["miou"] == 100.0
    assert res["class_names"] == list(OFFICIAL_TRAIN_IDS)
    assert main([*args, "--classes", "20", "--predictions", str(preds)]) == 2
    assert "classes=20 is not offered; choose 27 or 19" in capsys.readouterr().err

    fx.write_context(tmp_path / "VOCdevkit")
    ctx = PascalContext(tmp_path, label_size=SIZE, classes=59)
    preds = _perfect_predictions(tmp_path / "p59", ctx)
    args = ["--dataset", "context", "--root", str(tmp_path), "--resolution", str(SIZE),
            "--predictions", str(preds)]  # fmt: skip
    assert main([*args, "--classes", "59", "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["classes"] == 59 and len(res["class_names"]) == 59 and res["miou"] == 100.0
    assert res["background_index"] is None and res["background_merge"] is False
    assert main([*args, "--classes", "59", "--background-merge"]) == 2
    assert "Pascal Context-59 has no background class" in capsys.readouterr().err
    voc = ["--dataset", "voc", "--root", str(tmp_path), "--predictions", str(preds)]
    assert main([*voc, "--classes", "59"]) == 2
    assert "--classes applies to cityscapes and context only" in capsys.readouterr().err


# ----------------------------------------------------------------------------- run.py


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture(scope="module")
def tiny(one_thread):
    from diffseg.backbones import build_backbone

    return build_backbone("tiny", seed=0)


def test_run_on_cityscapes19_gives_19_class_results(tmp_path, tiny):
    from diffseg.tasks.evaluate import evaluate

    root = tmp_path / "cs"
    fakedata.write_cityscapes(root, n=2, size=(32, 64), seed=1)
    common = ["backbone=tiny", "logger=none", "resolution=32", "num_workers=0", "num_overlays=0",
              "dataset=cityscapes", f"dataset.root={root}"]  # fmt: skip
    evaluate(_cfg(*common, "dataset.classes=19"), tmp_path / "run", backbone=tiny)
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert list(res["iou_per_class"]) == list(OFFICIAL_TRAIN_IDS)
    assert res["dataset"]["classes"] == 19 and res["dataset"]["num_classes"] == 19
    fingerprint = json.loads((tmp_path / "run" / "run.json").read_text())["fingerprint"]
    assert fingerprint["dataset"]["classes"] == 19
    with pytest.raises(ResumeError, match=r"dataset\.classes: 19 -> \(default\)"):
        evaluate(_cfg(*common), tmp_path / "run", backbone=tiny)
    with pytest.raises(ConfigError, match="classes=21 is not offered"):
        evaluate(_cfg(*common, "dataset.classes=21"), tmp_path / "other", backbone=tiny)


def test_run_on_context59_merges_no_background(tmp_path, tiny, monkeypatch):
    import eval.metrics
    from diffseg.tasks.evaluate import evaluate

    merged = []
    real = eval.metrics.merge_background
    monkeypatch.setattr(
        eval.metrics, "merge_background", lambda *a, **k: merged.append(a[2]) or real(*a, **k)
    )
    fx.write_context(tmp_path / "VOCdevkit")
    common = ["backbone=tiny", "logger=none", "resolution=32", "num_workers=0", "num_overlays=0",
              "dataset=context", f"dataset.root={tmp_path / 'VOCdevkit'}"]  # fmt: skip
    evaluate(_cfg(*common, "dataset.classes=59"), tmp_path / "r59", backbone=tiny)
    res = json.loads((tmp_path / "r59" / "results.json").read_text())
    assert len(res["iou_per_class"]) == 59 and "background" not in res["iou_per_class"]
    assert res["dataset"]["background_index"] is None and merged == []
    evaluate(_cfg(*common), tmp_path / "r60", backbone=tiny)  # the default merges, into 59
    res = json.loads((tmp_path / "r60" / "results.json").read_text())
    assert len(res["iou_per_class"]) == 60 and merged and set(merged) == {59}
