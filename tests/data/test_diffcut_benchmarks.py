"""The background benchmarks' loaders (VOC, Pascal Context, COCO-Object, ADE20K) on fixture
datasets in the official layouts, against an independent computation of the expected labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffseg.data.ade20k import ADE20K
from diffseg.data.base import LabelledDataset
from diffseg.data.coco_object import CocoObject
from diffseg.data.context import PascalContext
from diffseg.data.paths import metadata_dir
from diffseg.data.voc import PascalVOC
from diffseg.testing import fakedata_diffcut as fx

SIZE = 16  # evaluation side of the fixtures


def expected(raw: np.ndarray, to_class, size: int = SIZE) -> np.ndarray:
    """Centre square crop, nearest resize with half-pixel centres, then the class map, written
    out with floats (the loader computes the indices in integers)."""
    h, w = raw.shape
    c = min(h, w)
    crop = raw[(h - c) // 2 : (h - c) // 2 + c, (w - c) // 2 : (w - c) // 2 + c]
    idx = [int(np.floor((i + 0.5) * c / size)) for i in range(size)]
    return np.vectorize(to_class)(crop[np.ix_(idx, idx)].astype(np.int64))


def stored(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.array(img)


def write_png(path: Path, label: np.ndarray) -> None:
    Image.fromarray(label.astype(np.uint8)).save(path)


# ----------------------------------------------------------------------------- metadata


def test_shipped_class_tables():
    voc = json.loads((metadata_dir() / "pascal_voc21_classes.json").read_text())
    assert len(voc["class_names"]) == 21 and voc["class_names"][20] == "background"
    assert voc["class_names"][0] == "aeroplane" and voc["class_names"][19] == "tvmonitor"
    ctx = json.loads((metadata_dir() / "pascal_context59_classes.json").read_text())
    assert len(ctx["class_names"]) == 60 and ctx["class_names"][59] == "background"
    assert (
        ctx["context459_ids"] == sorted(set(ctx["context459_ids"]))
        and len(ctx["context459_ids"]) == 59
    )
    # Alphabetical names follow the alphabetical full-annotation ids.
    assert ctx["class_names"][:59] == sorted(ctx["class_names"][:59])
    ade = json.loads((metadata_dir() / "ade20k150_classes.json").read_text())
    assert len(ade["class_names"]) == 150 and ade["class_names"][0] == "wall"
    assert ade["class_names"][149] == "flag"
    coco = json.loads((metadata_dir() / "coco_object_fine_to_class.json").read_text())
    assert len(coco["class_names"]) == 81 and coco["background_class"] == 80
    assert sorted(coco["fine_to_class"].values()) == list(range(80))
    unused = {str(v) for v in fx.COCO_UNUSED_THING_VALUES}
    assert set(coco["fine_to_class"]) == {str(v) for v in range(91)} - unused


# ----------------------------------------------------------------------------- Pascal VOC


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    base = tmp_path_factory.mktemp("voc")
    return base, fx.write_voc(base / "VOCdevkit")


def voc_class(v: int) -> int:
    return v - 1 if 1 <= v <= 20 else 20  # background 0 and void 255 are background


def test_voc_labels_and_ids(voc):
    base, ids = voc
    ds = PascalVOC(base / "VOCdevkit", label_size=SIZE, image_size=32)
    assert ds.ids == ids and len(ds) == 3 and ds.num_classes == 21
    assert ds.background_index == 20 and ds.class_names[20] == "background"
    assert ds.describe()["background_index"] == 20
    saw_void = False
    for k, image_id in enumerate(ids):
        raw = stored(base / "VOCdevkit" / "VOC2012" / "SegmentationClass" / f"{image_id}.png")
        saw_void |= bool((raw == 255).any())
        item = ds[k]
        assert item["image"].shape == (3, 32, 32) and item["id"] == image_id
        assert tuple(item["orig_size"].tolist()) == raw.shape
        np.testing.assert_array_equal(item["label"].numpy(), expected(raw, voc_class))
        np.testing.assert_array_equal(ds.load_label(k).numpy(), item["label"].numpy())
    assert saw_void


def test_voc_void_ignored_on_request_and_roots(voc):
    base, ids = voc
    ds = PascalVOC(base, label_size=SIZE, void_as_background=False)  # the folder above VOCdevkit
    raw = stored(base / "VOCdevkit" / "VOC2012" / "SegmentationClass" / f"{ids[0]}.png")
    np.testing.assert_array_equal(
        ds.load_label(0).numpy(), expected(raw, lambda v: -1 if v == 255 else voc_class(v))
    )
    assert PascalVOC(base / "VOCdevkit" / "VOC2012", label_size=SIZE).ids == ids
    train = PascalVOC(base / "VOCdevkit", split="train", label_size=SIZE)
    assert train.ids == [fx.VOC_IDS[3]]
    assert PascalVOC(base / "VOCdevkit", ids=ids[1:], label_size=SIZE).ids == ids[1:]


def test_voc_bad_value_names_file_and_value(voc, tmp_path):
    base, ids = voc
    root = tmp_path / "VOCdevkit"
    fx.write_voc(root)
    bad = root / "VOC2012" / "SegmentationClass" / f"{ids[1]}.png"
    label = stored(bad)
    label[3, 4] = 21
    write_png(bad, label)
    ds = PascalVOC(root, label_size=SIZE)
    ds.load_label(0)  # the others are fine
    with pytest.raises(ValueError, match=rf"{bad}.*value 21 \(at row 3, column 4"):
        ds.load_label(1)


def test_voc_missing_layout_says_what_and_how(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        PascalVOC(tmp_path / "nowhere")
    msg = str(err.value)
    assert "missing JPEGImages, SegmentationClass, ImageSets/Segmentation/val.txt" in msg
    assert "does not exist" in msg and "python datasets/prepare_voc.py --root" in msg
    folder = tmp_path / "VOCdevkit" / "VOC2012"
    (folder / "JPEGImages").mkdir(parents=True)
    (folder / "SegmentationClassAug").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        PascalVOC(tmp_path)
    msg = str(err.value)
    assert f"not found at {folder}: missing SegmentationClass, ImageSets" in msg
    assert "SBD-augmented" in msg and "SegmentationClassAug/" in msg


def test_voc_missing_file_is_named(voc, tmp_path):
    base, ids = voc
    root = tmp_path / "VOCdevkit"
    fx.write_voc(root)
    (root / "VOC2012" / "SegmentationClass" / f"{ids[2]}.png").unlink()
    with pytest.raises(FileNotFoundError, match=rf"1 of the 6 .* first: .*{ids[2]}\.png"):
        PascalVOC(root)


def test_kwargs_reach_the_base_class(voc, monkeypatch):
    base, _ = voc
    seen = {}
    original = LabelledDataset.__init__

    def spy(self, *args, preprocessing=None, **kwargs):
        seen["preprocessing"] = preprocessing
        original(self, *args, **kwargs)

    monkeypatch.setattr(LabelledDataset, "__init__", spy)
    PascalVOC(base, preprocessing="diffcut")
    assert seen == {"preprocessing": "diffcut"}


# ----------------------------------------------------------------------------- Pascal Context


def test_context_labels(tmp_path):
    ids = fx.write_context(tmp_path / "VOCdevkit")
    ds = PascalContext(tmp_path, label_size=SIZE)
    assert ds.ids == ids and ds.num_classes == 60 and ds.background_index == 59
    assert ds.class_names[0] == "aeroplane" and ds.class_names[58] == "wood"
    for k, image_id in enumerate(ids):
        raw = stored(
            tmp_path / "VOCdevkit" / "VOC2010" / "SegmentationClassContext" / f"{image_id}.png"
        )
        np.testing.assert_array_equal(
            ds[k]["label"].numpy(), expected(raw, lambda v: v - 1 if v else 59)
        )
    bad = tmp_path / "VOCdevkit" / "VOC2010" / "SegmentationClassContext" / f"{ids[0]}.png"
    label = stored(bad)
    label[0, 0] = 60
    write_png(bad, label)
    with pytest.raises(ValueError, match=rf"{bad}.*value 60"):
        ds.load_label(0)


def test_context_unconverted_copy_is_explained(tmp_path):
    folder = tmp_path / "VOCdevkit" / "VOC2010"
    (folder / "JPEGImages").mkdir(parents=True)
    (folder / "trainval").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        PascalContext(tmp_path / "VOCdevkit")
    msg = str(err.value)
    assert "missing SegmentationClassContext, ImageSets/SegmentationContext/val.txt" in msg
    assert "459-category .mat" in msg and "python datasets/prepare_context.py" in msg


# ----------------------------------------------------------------------------- ADE20K


def test_ade20k_labels_other_ignored(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    ids = fx.write_ade20k(root)
    ds = ADE20K(tmp_path, label_size=SIZE)  # the folder holding ADEChallengeData2016
    assert ds.ids == ids and ds.num_classes == 150 and ds.background_index is None
    for k, image_id in enumerate(ids):
        raw = stored(root / "annotations" / "validation" / f"{image_id}.png")
        assert (raw == 0).any() and (raw == 150).any()
        np.testing.assert_array_equal(ds[k]["label"].numpy(), expected(raw, lambda v: v - 1))
    release = ADE20K(root, label_size=SIZE, other_as_class=True)
    raw = stored(root / "annotations" / "validation" / f"{ids[0]}.png")
    np.testing.assert_array_equal(
        release.load_label(0).numpy(), expected(raw, lambda v: -1 if v == 150 else v)
    )
    assert release.class_names[:2] == ["other", "wall"] and len(release.class_names) == 150


def test_ade20k_errors(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    ids = fx.write_ade20k(root)
    bad = root / "annotations" / "validation" / f"{ids[2]}.png"
    label = stored(bad)
    label[5, 5] = 151
    write_png(bad, label)
    with pytest.raises(ValueError, match=rf"{bad}.*value 151"):
        ADE20K(root).load_label(2)
    (root / "annotations" / "validation" / f"{ids[1]}.png").unlink()
    with pytest.raises(FileNotFoundError, match=rf"first: .*{ids[1]}\.png"):
        ADE20K(root)
    with pytest.raises(FileNotFoundError) as err:
        ADE20K(tmp_path / "empty")
    msg = str(err.value)
    assert "images/validation" in msg and "python datasets/prepare_ade20k.py" in msg


# ----------------------------------------------------------------------------- COCO-Object


def test_coco_object_labels(tmp_path):
    ids = fx.write_coco_object(tmp_path)
    table = json.loads((metadata_dir() / "coco_object_fine_to_class.json").read_text())
    f2c = {int(k): v for k, v in table["fine_to_class"].items()}
    ds = CocoObject(tmp_path, ids=ids, label_size=SIZE)
    assert ds.num_classes == 81 and ds.background_index == 80 and ds.class_names[80] == "background"
    assert not ds.curated and ds.describe()["background_index"] == 80
    for k, image_id in enumerate(ids):
        raw = stored(tmp_path / "annotations" / "val2017" / f"{image_id}.png")
        assert (raw == 255).any() or (raw == 91).any()
        np.testing.assert_array_equal(
            ds[k]["label"].numpy(), expected(raw, lambda v: f2c.get(v, 80) if v < 91 else 80)
        )
    # person (0) and toothbrush (89) are the first and last classes.
    assert ds.class_names[f2c[0]] == "person" and ds.class_names[f2c[89]] == "toothbrush"


def test_coco_object_unused_thing_value_is_an_error(tmp_path):
    ids = fx.write_coco_object(tmp_path)
    bad = tmp_path / "annotations" / "val2017" / f"{ids[0]}.png"
    label = stored(bad)
    label[1, 2] = 11  # COCO id 12 ("street sign") has no annotations
    write_png(bad, label)
    with pytest.raises(ValueError, match=rf"{bad}.*value 11"):
        CocoObject(tmp_path, ids=ids).load_label(0)


def test_coco_object_missing_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare_cocostuff.py"):
        CocoObject(tmp_path / "nothing")
