"""Bad data gives one clear DataError; folder mode crops, skips and maps back; honest messages."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from diffseg.data import Cityscapes27, CocoStuff27, ImageFolder, read_image_rgb, read_label
from diffseg.data.folder import SKIP_HINT, count_unusual_shapes
from diffseg.data.io import DataFileError, MissingFileError, UnreadableFileError
from diffseg.data.transforms import (
    crop_window,
    preprocess_image,
    preprocess_image_crop,
    resize_label,
    to_original_size,
)
from diffseg.errors import DataError
from diffseg.testing import fakedata


def _noise_jpeg(path: Path, hw=(64, 64)) -> bytes:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)).save(path)
    return path.read_bytes()


# ----------------------------------------------------------------------------- item 6


@pytest.mark.parametrize("kind", ["empty", "truncated", "garbage"])
def test_bad_image_is_one_data_error_naming_file_and_fix(tmp_path, kind):
    path = tmp_path / f"{kind}.jpg"
    data = _noise_jpeg(path)
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"xx"}[kind])
    with pytest.raises(DataError) as err:
        read_image_rgb(path)
    assert isinstance(err.value, OSError)  # still what callers caught before
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg
    assert ("copy it again" if kind == "empty" else "re-download") in msg
    # One message, no chained Pillow traceback to wade through.
    exc = err.value
    assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)


def test_label_file_problems_are_data_errors(tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match=r"rgb\.png is a RGB image"):
        read_label(tmp_path / "rgb.png")
    with pytest.raises(MissingFileError, match=r"gone\.png.*restore it") as err:
        read_label(tmp_path / "gone.png")
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, DataError)


def test_data_error_from_a_dataloader_worker_keeps_type_and_one_message(tmp_path):
    root = tmp_path / "c"
    ids = fakedata.write_cocostuff(root, n=2)
    bad = root / "images" / "val2017" / f"{ids[1]}.jpg"
    bad.write_bytes(b"\xff\xd8garbage")
    loader = DataLoader(CocoStuff27(root, ids=ids), batch_size=1, num_workers=1)
    with pytest.raises(DataError) as err:
        list(loader)
    assert type(err.value) is UnreadableFileError
    msg = str(err.value)
    assert msg.startswith(f"cannot decode image file {bad}") and "\n" not in msg
    assert "Traceback" not in msg and "worker" not in msg


def test_worker_unwrap_leaves_ordinary_messages_alone():
    assert str(DataFileError("Caught nothing here")) == "Caught nothing here"
    assert str(UnreadableFileError("plain")) == "plain"


def test_label_value_error_is_a_data_error(tmp_path):
    root = tmp_path / "c"
    ids = fakedata.write_cocostuff(root, n=1)
    label = root / "annotations" / "val2017" / f"{ids[0]}.png"
    Image.fromarray(np.full((48, 64), 200, np.uint8)).save(label)
    with pytest.raises(DataError, match=rf"{ids[0]}\.png holds value 200"):
        CocoStuff27(root, ids=ids).load_label(0)


# ----------------------------------------------------------------------------- item 9


@pytest.mark.parametrize("bad", [34, 100, 254, 255])
def test_cityscapes_refuses_label_ids_outside_0_33(tmp_path, bad):
    root = tmp_path / "cs"
    fakedata.write_cityscapes(root, n=1, size=(16, 16), extras=False)
    values = np.arange(256, dtype=np.uint8).reshape(16, 16) % 34
    values[5, 6] = bad
    Image.fromarray(values).save(next((root / "gtFine").rglob("*_labelIds.png")))
    ds = Cityscapes27(root, label_size=16)
    with pytest.raises(ValueError, match=rf"holds value {bad} \(at row 5, column 6.*0\.\.33"):
        ds.load_label(0)


def test_cityscapes_still_maps_0_to_33(tmp_path):
    root = tmp_path / "cs"
    fakedata.write_cityscapes(root, n=1, size=(16, 16), extras=False)
    values = (np.arange(256, dtype=np.uint8) % 34).reshape(16, 16)
    Image.fromarray(values).save(next((root / "gtFine").rglob("*_labelIds.png")))
    label = Cityscapes27(root, label_size=16).load_label(0).numpy()
    expected = np.where(values >= 7, values.astype(np.int64) - 7, -1)
    np.testing.assert_array_equal(label, expected)


# ----------------------------------------------------------------------------- item 10


def test_partial_coco_copy_says_how_to_evaluate_a_subset(tmp_path):
    fakedata.write_cocostuff(tmp_path, n=3)
    with pytest.raises(FileNotFoundError) as err:
        CocoStuff27(tmp_path)
    msg = str(err.value)
    assert "of the 4350 image and label files" in msg
    for option in (
        "dataset.curated=false",
        "dataset.ids_file=",
        "--no-curated",
        "--ids-file",
        "dataset.root=DIR",
        "--root DIR",
    ):
        assert option in msg, option
    # An explicit list with a gap does not suggest leaving the curated list.
    with pytest.raises(FileNotFoundError) as err:
        CocoStuff27(tmp_path, ids=["000000000001"])
    assert "dataset.curated=false" not in str(err.value)


# ----------------------------------------------------------------------------- item 7


def test_folder_strict_by_default_with_a_hint(tmp_path):
    fakedata.write_image_folder(tmp_path)
    (tmp_path / "a.jpg").write_bytes(b"")
    with pytest.raises(UnreadableFileError) as err:
        ImageFolder(tmp_path)[0]
    assert str(tmp_path / "a.jpg") in str(err.value) and SKIP_HINT in str(err.value)


def test_folder_skip_unreadable_marks_items_and_batches(tmp_path):
    ids = fakedata.write_image_folder(tmp_path)
    (tmp_path / "b.PNG").write_bytes(b"not a png")
    ds = ImageFolder(tmp_path, image_size=32, skip_unreadable=True)
    batch = next(iter(DataLoader(ds, batch_size=4, num_workers=0)))
    assert batch["id"] == ids
    assert batch["skipped"].tolist() == [False, True, False, False]
    assert batch["error"][0] == "" and str(tmp_path / "b.PNG") in batch["error"][1]
    assert batch["orig_size"][1].tolist() == [0, 0] and batch["orig_size"][0].tolist() == [40, 56]
    assert batch["image"].shape == (4, 3, 32, 32)
    assert ds.describe()["skip_unreadable"] is True


# ----------------------------------------------------------------------------- item 12


def test_crop_modes_and_center_is_unchanged(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (20, 50, 3), dtype=np.uint8)
    assert torch.equal(preprocess_image_crop(rgb, 16, "center"), preprocess_image(rgb, 16))
    padded = preprocess_image_crop(rgb, 50, "pad")
    assert padded.shape == (3, 50, 50)
    # 50x50 square, photo rows 15..34: the padding is exactly 0.0 (mid-grey), the photo exact.
    assert torch.all(padded[:, :15] == 0) and torch.all(padded[:, 35:] == 0)
    expected = torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(padded[:, 15:35], expected)
    squashed = preprocess_image_crop(rgb, 16, "resize")
    assert squashed.shape == (3, 16, 16)
    assert not torch.equal(squashed, preprocess_image(rgb, 16))
    with pytest.raises(ValueError, match="crop must be one of center, pad, resize.*'fit'"):
        preprocess_image_crop(rgb, 16, "fit")


def test_crop_windows():
    assert crop_window(20, 50, "center") == (0, 15, 20, 20)
    assert crop_window(20, 50, "pad") == (-15, 0, 50, 50)
    assert crop_window(21, 50, "pad") == (-14, 0, 50, 50)
    assert crop_window(20, 50, "resize") == (0, 0, 20, 50)


def test_to_original_size_center_marks_uncovered_borders():
    seg = torch.arange(16).reshape(4, 4)
    out = to_original_size(seg, (4, 8), "center")
    assert out.shape == (4, 8) and out.dtype == torch.int64
    assert torch.all(out[:, :2] == -1) and torch.all(out[:, 6:] == -1)
    assert torch.equal(out[:, 2:6], seg)
    nearest = to_original_size(seg.numpy(), (4, 8), "center", fill=None)
    assert isinstance(nearest, np.ndarray)
    np.testing.assert_array_equal(nearest[:, 0], seg[:, 0].numpy())
    np.testing.assert_array_equal(nearest[:, 7], seg[:, 3].numpy())


def test_to_original_size_pad_and_resize():
    seg = np.arange(64).reshape(8, 8)
    # A 4x8 photo padded to 8x8 (rows 2..5 of the square): cutting the padding gives them back.
    np.testing.assert_array_equal(to_original_size(seg, (4, 8), "pad"), seg[2:6])
    # resize: nearest resize back to the photo's size, no -1 anywhere.
    out = to_original_size(seg, (16, 4), "resize")
    assert out.shape == (16, 4) and out.min() >= 0
    np.testing.assert_array_equal(out[::2], seg[:, 1::2])
    # Round trip of a label through a square and back (sizes that divide evenly).
    photo = np.random.default_rng(0).integers(0, 9, (6, 12))
    square = resize_label(photo, 12)
    np.testing.assert_array_equal(to_original_size(square, (6, 12), "resize"), photo)


def test_folder_items_carry_crop_and_map_back(tmp_path):
    fakedata.write_image_folder(tmp_path, size=(40, 56))
    for crop in ("center", "pad", "resize"):
        item = ImageFolder(tmp_path, image_size=32, crop=crop)[0]
        assert item["crop"] == crop and item["orig_size"].tolist() == [40, 56]
        assert item["crop_box"].tolist() == list(crop_window(40, 56, crop))
        back = to_original_size(torch.zeros(32, 32, dtype=torch.long), item["orig_size"], crop)
        assert back.shape == (40, 56)
        assert bool((back == -1).any()) == (crop == "center")
    with pytest.raises(ValueError, match="crop must be one of"):
        ImageFolder(tmp_path, crop="square")


def test_count_unusual_shapes(tmp_path):
    sizes = {"pano": (300, 5412), "tiny": (8, 8), "ok": (480, 640), "tall": (900, 300)}
    for name, (h, w) in sizes.items():
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / f"{name}.png")
    (tmp_path / "broken.jpg").write_bytes(b"")
    start = time.perf_counter()
    counts = count_unusual_shapes(ImageFolder(tmp_path))
    assert time.perf_counter() - start < 2
    assert counts.total == 5 and counts.elongated == ["pano", "tall"]
    assert counts.tiny == ["tiny"] and counts.unreadable == ["broken"]
    # every non-square photo loses 1 - short/long of its area to the centre crop
    assert counts.crop_loss == pytest.approx(
        {"pano": 1 - 300 / 5412, "ok": 1 - 480 / 640, "tall": 1 - 300 / 900}
    )
    text = counts.warning("center")
    assert text.startswith(
        "3 of 5 images lose up to 94% of their area to the centre crop (most: pano); "
        "dataset.crop=pad keeps them whole; 1 of 5 images have a side under 128 px"
    )
    assert counts.warning("resize").startswith("2 of 5 images are more than 2:1 and are squashed")
    assert "centre crop" not in counts.warning("pad")
    (tmp_path / "pano.png").unlink()
    (tmp_path / "tiny.png").unlink()
    (tmp_path / "tall.png").unlink()
    counts = count_unusual_shapes(ImageFolder(tmp_path))  # ok.png (4:3) loses a quarter
    assert counts.warning() == (
        "1 of 2 images lose up to 25% of their area to the centre crop (most: ok); "
        "dataset.crop=pad keeps them whole."
    )
    assert counts.warning("pad") is None
    (tmp_path / "ok.png").unlink()
    Image.fromarray(np.zeros((200, 200, 3), np.uint8)).save(tmp_path / "square.png")
    assert count_unusual_shapes(ImageFolder(tmp_path)).warning() is None
