"""Dataset loaders and their preprocessing (docs/diffseg.md section 1), on fixture files in the
real formats."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import DataLoader

import diffseg
from diffseg.data import (
    CITYSCAPES27_CLASSES,
    Cityscapes27,
    CocoStuff27,
    ImageFolder,
    build_dataset,
    center_crop_square,
    default_data_root,
    from_model_range,
    read_image_rgb,
    read_label,
    read_photo,
    resize_image,
    resize_label,
    to_model_range,
)
from diffseg.data.folder import count_unusual_shapes
from diffseg.data.transforms import center_crop_box, nearest_indices
from diffseg.testing import fakedata

REPO = Path(diffseg.__file__).resolve().parents[1]
META = json.loads((REPO / "datasets" / "coco_stuff27_fine_to_coarse.json").read_text())


# ----------------------------------------------------------------------------- references
# Independent implementations of the formulas of docs/diffseg.md section 1, written from the text,
# in float64 numpy.


def ref_crop(x: np.ndarray) -> np.ndarray:
    h, w = x.shape[:2]
    c = min(h, w)
    return x[(h - c) // 2 : (h - c) // 2 + c, (w - c) // 2 : (w - c) // 2 + c]


def ref_bilinear(img: np.ndarray, size: int) -> np.ndarray:
    """Half-pixel-centre bilinear without antialias (tf.image.resize), (h, w, C) -> (S, S, C)."""
    img = img.astype(np.float64)

    def axis(n_in: int):
        src = (np.arange(size) + 0.5) * n_in / size - 0.5
        src = np.clip(src, 0, None)
        lo = np.minimum(np.floor(src).astype(int), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    y0, y1, fy = axis(img.shape[0])
    x0, x1, fx = axis(img.shape[1])
    top = img[y0][:, x0] * (1 - fx)[None, :, None] + img[y0][:, x1] * fx[None, :, None]
    bot = img[y1][:, x0] * (1 - fx)[None, :, None] + img[y1][:, x1] * fx[None, :, None]
    return top * (1 - fy)[:, None, None] + bot * fy[:, None, None]


def ref_nearest(label: np.ndarray, size: int) -> np.ndarray:
    rows = [
        min(math.floor((i + 0.5) * label.shape[0] / size), label.shape[0] - 1) for i in range(size)
    ]
    cols = [
        min(math.floor((j + 0.5) * label.shape[1] / size), label.shape[1] - 1) for j in range(size)
    ]
    return label[np.ix_(rows, cols)]


def coco_expected(raw: np.ndarray) -> np.ndarray:
    f2c = dict(enumerate(META["fine_to_coarse"]))
    f2c[255] = -1
    return np.vectorize(f2c.__getitem__)(raw).astype(np.int64)


def city_expected(raw: np.ndarray) -> np.ndarray:
    return np.where((raw >= 7) & (raw <= 33), raw.astype(np.int64) - 7, -1)


def write_coco_item(root: Path, image_id: str, rgb: np.ndarray, label: np.ndarray) -> None:
    (root / "images" / "val2017").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "val2017").mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(root / "images" / "val2017" / f"{image_id}.jpg", quality=95)
    Image.fromarray(label).save(root / "annotations" / "val2017" / f"{image_id}.png")


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco") / "cocostuff"
    sizes = [(48, 64), (64, 48), (45, 45), (37, 70)]
    ids = fakedata.write_cocostuff(root, n=4, sizes=sizes)
    return root, ids


@pytest.fixture(scope="module")
def city(tmp_path_factory):
    root = tmp_path_factory.mktemp("city") / "cityscapes"
    return root, fakedata.write_cityscapes(root, n=3, size=(32, 64))


# ----------------------------------------------------------------------------- transforms


def test_center_crop_box_follows_the_spec():
    assert center_crop_box(48, 64) == (0, 8, 48)
    assert center_crop_box(64, 48) == (8, 0, 48)
    assert center_crop_box(5, 8) == (0, 1, 5)  # odd margin: the extra column goes right
    assert center_crop_box(1024, 2048) == (0, 512, 1024)  # Cityscapes: the middle 1024x1024
    x = np.arange(7 * 10 * 3).reshape(7, 10, 3)
    np.testing.assert_array_equal(center_crop_square(x), ref_crop(x))
    t = torch.arange(2 * 3 * 10 * 7).reshape(2, 3, 10, 7)  # tensors crop their last two axes
    np.testing.assert_array_equal(
        center_crop_square(t).numpy(), ref_crop(t.permute(2, 3, 0, 1).numpy()).transpose(2, 3, 0, 1)
    )


@pytest.mark.parametrize(
    "c,size", [(427, 320), (480, 512), (7, 5), (5, 7), (1024, 320), (333, 333)]
)
def test_nearest_indices_match_formula_and_torch_nearest_exact(c, size):
    idx = nearest_indices(c, size)
    expected = [min(math.floor((i + 0.5) * c / size), c - 1) for i in range(size)]
    np.testing.assert_array_equal(idx, expected)
    src = torch.arange(c, dtype=torch.float32).view(1, 1, c, 1)
    torch_idx = F.interpolate(src, size=(size, 1), mode="nearest-exact").view(-1).long().numpy()
    np.testing.assert_array_equal(idx, torch_idx)


def test_resize_label_numpy_and_tensor_agree_with_reference():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 200, size=(37, 53)).astype(np.int16)
    for size in (20, 64):  # non-square input: each axis on its own
        np.testing.assert_array_equal(resize_label(label, size), ref_nearest(label, size))
    square = label[:, :37]
    np.testing.assert_array_equal(resize_label(square, 50), ref_nearest(square, 50))
    t = torch.from_numpy(square).expand(2, 37, 37)
    out = resize_label(t, 50)
    assert out.shape == (2, 50, 50) and out.dtype == torch.int16
    np.testing.assert_array_equal(out[1].numpy(), ref_nearest(square, 50))


@pytest.mark.parametrize("shape,size", [((45, 45), 512), ((333, 333), 64), ((48, 48), 320)])
def test_resize_image_is_half_pixel_bilinear_without_antialias(shape, size):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(*shape, 3)).astype(np.uint8)
    out = resize_image(img, size)
    assert out.shape == (3, size, size) and out.dtype == torch.float32
    ref = ref_bilinear(img, size).transpose(2, 0, 1)
    np.testing.assert_allclose(out.numpy(), ref, atol=2e-3)
    # Not rounded (tf.image.resize returns float32); cv2.INTER_LINEAR on uint8 agrees to 1 level.
    assert not np.allclose(out.numpy(), np.round(out.numpy()))
    cv = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1)
    assert np.abs(cv.astype(np.float64) - ref).max() <= 1.0
    # PIL's bilinear antialiases when shrinking: a different function (why we do not use it).
    if shape[0] > size:
        pil = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR)).transpose(
            2, 0, 1
        )
        assert np.abs(pil.astype(np.float64) - ref).max() > 5


# Outputs of tf.image.resize (TensorFlow 2.21, the release's function) on a small input, recorded
# once so that the comparison stays in the suite without TensorFlow.
TF_INPUT = ((np.arange(36) * 37) % 256).astype(np.uint8).reshape(6, 6, 1)
TF_BILINEAR_4 = [
    [48.75, 56.25, 111.75, 167.25],
    [189.75, 53.25, 60.75, 116.25],
    [154.75, 210.25, 57.75, 65.25],
    [103.75, 159.25, 198.75, 62.25],
]
TF_BILINEAR_9_ROWS_0_2_8 = [
    [0.0, 18.5, 43.16667, 67.83334, 92.5, 117.16667, 141.83334, 166.5, 185.0],
    [216.33333, 128.16667, 39.05557, 35.27778, 52.833332, 77.5, 102.16667, 126.83333, 145.33333],
    [86.0, 104.5, 129.16667, 153.83334, 178.5, 203.16667, 227.83334, 124.5, 15.0],
]
TF_NEAREST = {
    (7, 5): [0, 2, 3, 4, 6],
    (5, 7): [0, 1, 1, 2, 3, 3, 4],
    (10, 4): [1, 3, 6, 8],
    (427, 13): [16, 49, 82, 114, 147, 180, 213, 246, 279, 312, 344, 377, 410],
}


def test_resize_matches_recorded_tensorflow_outputs():
    np.testing.assert_allclose(resize_image(TF_INPUT, 4)[0].numpy(), TF_BILINEAR_4, atol=1e-4)
    up = resize_image(TF_INPUT, 9)[0].numpy()
    np.testing.assert_allclose(up[[0, 2, 8]], TF_BILINEAR_9_ROWS_0_2_8, atol=1e-4)
    for (c, size), expected in TF_NEAREST.items():
        np.testing.assert_array_equal(nearest_indices(c, size), expected)


def test_model_range_round_trip():
    x = torch.tensor([0.0, 127.5, 255.0])
    np.testing.assert_allclose(to_model_range(x).numpy(), [-1.0, 0.0, 1.0])
    img = torch.randint(0, 256, (3, 5, 5), dtype=torch.uint8)
    back = from_model_range(to_model_range(img))
    assert back.dtype == np.uint8 and back.shape == (5, 5, 3)
    np.testing.assert_array_equal(back, img.permute(1, 2, 0).numpy())


# ----------------------------------------------------------------------------- COCO-Stuff-27


@pytest.mark.parametrize("label_size", [320, 512])
def test_coco_items_shapes_ranges_and_independent_preprocessing(coco, label_size):
    root, ids = coco
    ds = CocoStuff27(root, ids=ids, label_size=label_size)
    assert len(ds) == 4 and ds.ids == ids and ds.num_classes == 27
    assert ds.class_names == META["coarse_names"]
    for k in (0, 1, 3):  # landscape, portrait, odd sizes
        item = ds[k]
        assert set(item) == {"image", "label", "id", "orig_size"}
        assert item["id"] == ids[k]
        img, lab = item["image"], item["label"]
        assert img.shape == (3, 512, 512) and img.dtype == torch.float32
        assert -1.0 <= img.min() and img.max() <= 1.0
        assert lab.shape == (label_size, label_size) and lab.dtype == torch.int64
        assert lab.min() >= -1 and lab.max() < 27
        rgb = np.asarray(Image.open(ds.image_paths[k]).convert("RGB"))
        raw = np.asarray(Image.open(ds.label_paths[k]))
        assert item["orig_size"].tolist() == list(rgb.shape[:2])
        assert item["orig_size"].dtype == torch.int64
        ref_img = ref_bilinear(ref_crop(rgb), 512).transpose(2, 0, 1) / 127.5 - 1
        np.testing.assert_allclose(img.numpy(), ref_img, atol=2e-5)
        ref_lab = coco_expected(ref_nearest(ref_crop(raw), label_size))
        np.testing.assert_array_equal(lab.numpy(), ref_lab)
        assert torch.equal(ds.load_label(k), lab)


def test_coco_mapping_of_every_fine_value(tmp_path):
    values = np.array([*range(182), 255] * 2, dtype=np.uint8)[:196].reshape(14, 14)
    rgb = np.full((14, 14, 3), 100, np.uint8)
    write_coco_item(tmp_path, "000000000001", rgb, values)
    ds = CocoStuff27(tmp_path, ids=["000000000001"], label_size=14)
    label = ds.load_label(0).numpy()
    for v, coarse in enumerate(META["fine_to_coarse"]):
        assert np.all(label[values == v] == coarse), v
    assert np.all(label[values == 255] == -1)
    assert (values == 255).any() and set(np.unique(values)) >= set(range(182))


@pytest.mark.parametrize("bad", [182, 200, 254])
def test_coco_bad_label_value_names_file_and_value(tmp_path, bad):
    label = np.zeros((20, 20), np.uint8)
    label[3, 4] = bad
    write_coco_item(tmp_path, "000000000002", np.zeros((20, 20, 3), np.uint8), label)
    ds = CocoStuff27(tmp_path, ids=["000000000002"])
    with pytest.raises(
        ValueError, match=rf"000000000002\.png holds value {bad} \(at row 3, column 4"
    ):
        ds[0]


def test_coco_sixteen_bit_label_out_of_range_is_an_error(tmp_path):
    write_coco_item(
        tmp_path, "000000000003", np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8)
    )
    label = np.zeros((8, 8), np.uint16)
    label[0, 0] = 300
    Image.fromarray(label).save(tmp_path / "annotations" / "val2017" / "000000000003.png")
    with pytest.raises(ValueError, match="holds value 300"):
        CocoStuff27(tmp_path, ids=["000000000003"]).load_label(0)


def test_coco_palette_label_gives_indices(tmp_path):
    idx = np.arange(64, dtype=np.uint8).reshape(8, 8) % 30
    pal = Image.fromarray(idx, mode="P")
    pal.putpalette([(i * 37) % 256 for i in range(768)])
    write_coco_item(tmp_path, "000000000004", np.zeros((8, 8, 3), np.uint8), idx)
    pal.save(tmp_path / "annotations" / "val2017" / "000000000004.png")
    assert Image.open(tmp_path / "annotations" / "val2017" / "000000000004.png").mode == "P"
    label = CocoStuff27(tmp_path, ids=["000000000004"], label_size=8).load_label(0).numpy()
    np.testing.assert_array_equal(label, coco_expected(idx))


def test_rgb_label_is_refused(tmp_path):
    write_coco_item(
        tmp_path, "000000000005", np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8)
    )
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(
        tmp_path / "annotations" / "val2017" / "000000000005.png"
    )
    with pytest.raises(ValueError, match=r"000000000005\.png is a RGB image.*single-channel"):
        CocoStuff27(tmp_path, ids=["000000000005"])[0]


def test_coco_label_size_mismatch(tmp_path):
    write_coco_item(
        tmp_path, "000000000006", np.zeros((8, 10, 3), np.uint8), np.zeros((8, 9), np.uint8)
    )
    with pytest.raises(ValueError, match=r"000000000006\.png is 8x9 but its image .* is 8x10"):
        CocoStuff27(tmp_path, ids=["000000000006"])[0]


def test_coco_curated_uses_shipped_list_and_names_missing_files(tmp_path):
    (tmp_path / "images" / "val2017").mkdir(parents=True)
    (tmp_path / "annotations" / "val2017").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as err:
        CocoStuff27(tmp_path)
    msg = str(err.value)
    assert "4350 of the 4350" in msg and "(2175 ids)" in msg
    assert str(tmp_path / "images" / "val2017" / "000000000139.jpg") in msg
    assert "prepare_cocostuff.py --root" in msg


def test_coco_ids_file_and_missing_curated_label(coco, tmp_path):
    root, ids = coco
    ds = CocoStuff27(root, ids_file=fakedata.write_id_list(tmp_path / "ids.txt", ids[2:]))
    assert ds.ids == ids[2:] and not ds.curated
    missing_label = tmp_path / "c"
    fakedata.write_cocostuff(missing_label, n=2)
    first = sorted((missing_label / "annotations" / "val2017").glob("*.png"))[0]
    first.unlink()
    with pytest.raises(FileNotFoundError, match=rf"1 of the 4 .* first: {first}"):
        CocoStuff27(
            missing_label,
            curated=False,
            ids=[p.stem for p in sorted((missing_label / "images" / "val2017").glob("*.jpg"))],
        )


def test_coco_uncurated_takes_every_labelled_image(coco, tmp_path):
    root, ids = coco
    assert CocoStuff27(root, curated=False).ids == sorted(ids)
    extra = tmp_path / "c"
    ids2 = fakedata.write_cocostuff(extra, n=3)
    (extra / "annotations" / "val2017" / f"{ids2[1]}.png").unlink()
    assert CocoStuff27(extra, curated=False).ids == [ids2[0], ids2[2]]
    with pytest.raises(ValueError, match="curated COCO-Stuff-27 list covers val2017 only"):
        CocoStuff27(extra, split="train")


def test_coco_missing_root_and_wrong_layout(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        CocoStuff27(tmp_path / "nowhere")
    msg = str(err.value)
    assert "does not exist" in msg and "images/val2017/<id>.jpg" in msg
    assert "annotations/val2017/<id>.png" in msg
    assert f"python datasets/prepare_cocostuff.py --root {tmp_path / 'nowhere'}" in msg
    (tmp_path / "flat" / "val2017").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"val2017 should be .*images/val2017"):
        CocoStuff27(tmp_path / "flat")


def test_default_data_root_and_env(tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFSEG_DATA", raising=False)
    assert default_data_root() == REPO / "datasets"
    monkeypatch.setenv("DIFFSEG_DATA", str(tmp_path))
    assert default_data_root() == tmp_path
    fakedata.write_cocostuff(tmp_path / "cocostuff", n=1)
    assert CocoStuff27(curated=False).root == tmp_path / "cocostuff"
    fakedata.write_cityscapes(tmp_path / "cityscapes", n=1)
    assert Cityscapes27().root == tmp_path / "cityscapes"


def test_shipped_metadata():
    ids = (REPO / "datasets" / "coco_stuff27_val_curated.txt").read_text().split()
    assert len(ids) == 2175 == len(set(ids)) and all(len(i) == 12 and i.isdigit() for i in ids)
    assert len(META["fine_to_coarse"]) == 182 == len(META["fine_names"])
    assert len(META["coarse_names"]) == 27 and set(META["fine_to_coarse"]) == set(range(27))


# ----------------------------------------------------------------------------- Cityscapes-27


@pytest.mark.parametrize("label_size", [320, 512])
def test_cityscapes_items(city, label_size):
    root, ids = city
    ds = Cityscapes27(root, label_size=label_size)
    assert ds.ids == ids and ds.num_classes == 27
    assert ds.class_names == CITYSCAPES27_CLASSES and ds.class_names[0] == "road"
    assert ds.class_names[-1] == "bicycle" and ds.class_names[16] == "sky"
    assert all(p.name.endswith("_gtFine_labelIds.png") for p in ds.label_paths)
    item = ds[1]
    rgb = np.asarray(Image.open(ds.image_paths[1]))
    raw = np.asarray(Image.open(ds.label_paths[1]))
    assert item["orig_size"].tolist() == [32, 64]
    np.testing.assert_allclose(
        item["image"].numpy(),
        ref_bilinear(ref_crop(rgb), 512).transpose(2, 0, 1) / 127.5 - 1,
        atol=2e-5,
    )
    np.testing.assert_array_equal(
        item["label"].numpy(), city_expected(ref_nearest(ref_crop(raw), label_size))
    )


def test_cityscapes_mapping_of_every_value(tmp_path):
    root = tmp_path / "cs"
    fakedata.write_cityscapes(root, n=1, size=(16, 16), extras=False)
    values = (np.arange(256) % 34).astype(np.uint8).reshape(16, 16)  # every valid labelId
    Image.fromarray(values).save(next((root / "gtFine").rglob("*_labelIds.png")))
    label = Cityscapes27(root, label_size=16).load_label(0).numpy()
    np.testing.assert_array_equal(label, city_expected(values))
    assert sorted(np.unique(label[(values >= 7) & (values <= 33)])) == list(range(27))


def test_cityscapes_errors(city, tmp_path):
    subset = fakedata.write_id_list(tmp_path / "ids.txt", city[1][2:0:-1])
    assert Cityscapes27(city[0], ids_file=subset).ids == [city[1][2], city[1][1]]
    with pytest.raises(FileNotFoundError, match="1 requested Cityscapes ids have no image"):
        Cityscapes27(city[0], ids=["nowhere_000000_000000"])
    with pytest.raises(
        FileNotFoundError, match=r"(?s)leftImg8bit/val/<city>/.*prepare_cityscapes\.py --root"
    ):
        Cityscapes27(tmp_path / "nowhere")
    root = tmp_path / "cs"
    ids = fakedata.write_cityscapes(root, n=2, extras=False)
    gone = next((root / "gtFine").rglob(f"{ids[0]}_gtFine_labelIds.png"))
    gone.unlink()
    with pytest.raises(
        FileNotFoundError, match=rf"1 of the 2 Cityscapes label files are missing, first: {gone}"
    ):
        Cityscapes27(root)


# ----------------------------------------------------------------------------- decoding


def test_image_modes_convert_to_rgb(tmp_path):
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, size=(6, 7, 3)).astype(np.uint8)
    gray = rng.integers(0, 256, size=(6, 7)).astype(np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    np.testing.assert_array_equal(
        read_image_rgb(tmp_path / "gray.png"), np.repeat(gray[:, :, None], 3, 2)
    )
    rgba = np.dstack([rgb, np.full((6, 7), 10, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_image_rgb(tmp_path / "rgba.png"), rgb)  # alpha dropped
    pal = Image.fromarray(gray % 16, mode="P")
    palette = rng.integers(0, 256, size=768).astype(np.uint8)
    pal.putpalette(palette.tolist())
    pal.save(tmp_path / "pal.png")
    np.testing.assert_array_equal(
        read_image_rgb(tmp_path / "pal.png"), palette.reshape(256, 3)[gray % 16]
    )
    g16 = rng.integers(0, 65536, size=(6, 7)).astype(np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    np.testing.assert_array_equal(
        read_image_rgb(tmp_path / "g16.png"), np.repeat((g16 >> 8)[:, :, None], 3, 2)
    )
    c16 = rng.integers(0, 65536, size=(6, 7, 3)).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "c16.png"), c16[:, :, ::-1])  # 48-bit RGB PNG
    out = read_image_rgb(tmp_path / "c16.png")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, (c16 >> 8).astype(np.uint8))


def _write_rotated(path: Path, orientation: int = 6) -> np.ndarray:
    """A 16x32 picture stored with an EXIF orientation tag; returns the stored pixels."""
    pixels = np.zeros((16, 32, 3), np.uint8)
    pixels[:, :, 0] = np.arange(32, dtype=np.uint8) * 8  # a ramp: left dark, right red
    pixels[:4, :, 1] = 255  # a green band at the top, to tell a turn from a flip
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif.tobytes())
    return pixels


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_benchmarks_read_stored_pixels_photos_are_turned_upright(tmp_path, suffix):
    path = tmp_path / "folder" / f"rot{suffix}"
    path.parent.mkdir()
    stored = _write_rotated(path, orientation=6)  # "rotate 90 degrees clockwise to display"
    with Image.open(path) as img:
        assert img.getexif()[0x0112] == 6 and img.size == (32, 16)
        upright = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    # benchmarks: as stored (their labels are stored the same way)
    assert read_image_rgb(path).shape == (16, 32, 3)
    # photos: as seen, the stored picture turned clockwise
    photo = read_photo(path)
    assert photo.shape == (32, 16, 3)
    np.testing.assert_array_equal(photo, upright)
    if suffix == ".png":  # lossless: the turn is exact
        np.testing.assert_array_equal(photo, np.rot90(stored, k=-1))
    folder = ImageFolder(tmp_path / "folder", image_size=16)
    item = folder[0]
    assert item["orig_size"].tolist() == [32, 16] and folder.load_rgb(0).shape == (32, 16, 3)
    np.testing.assert_array_equal(item["crop_box"].numpy(), [8, 0, 16, 16])
    counts = count_unusual_shapes(folder)
    assert counts.crop_loss == {"rot": 0.5} and counts.elongated == []


def test_unreadable_and_truncated_images(tmp_path):
    (tmp_path / "junk.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(OSError, match=r"cannot decode image file .*junk\.jpg"):
        read_image_rgb(tmp_path / "junk.jpg")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        tmp_path / "whole.jpg"
    )
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match=r"cut\.jpg.*truncated"):
        read_image_rgb(tmp_path / "cut.jpg")
    with pytest.raises(FileNotFoundError, match="label file not found"):
        read_label(tmp_path / "none.png")


def test_corrupt_image_in_dataset_names_file(coco, tmp_path):
    root = tmp_path / "c"
    ids = fakedata.write_cocostuff(root, n=1)
    (root / "images" / "val2017" / f"{ids[0]}.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(OSError, match=rf"{ids[0]}\.jpg"):
        CocoStuff27(root, ids=ids)[0]


# ----------------------------------------------------------------------------- folder, factory


def test_image_folder(tmp_path):
    ids = fakedata.write_image_folder(tmp_path / "pics")
    ds = build_dataset("folder", root=tmp_path / "pics", image_size=64)
    assert isinstance(ds, ImageFolder) and ds.ids == ids == ["a", "b", "sub/c", "sub/deeper/d"]
    assert ds.class_names == [] and ds.num_classes == 0 and not ds.has_labels
    item = ds[3]
    assert set(item) == {"image", "id", "orig_size", "crop", "crop_box", "skipped", "error"}
    assert item["id"] == "sub/deeper/d"
    assert item["image"].shape == (3, 64, 64) and item["orig_size"].tolist() == [40, 56]
    one = ImageFolder(tmp_path / "pics" / "b.PNG")
    assert one.ids == ["b"] and len(one) == 1
    (tmp_path / "pics" / "a.png").write_bytes((tmp_path / "pics" / "b.PNG").read_bytes())
    with pytest.raises(ValueError, match="would share the id 'a'"):
        ImageFolder(tmp_path / "pics")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        ImageFolder(tmp_path / "nope")
    for both_or_none in ({"path": tmp_path, "root": tmp_path}, {}):
        with pytest.raises(ValueError, match="pass path= or root= for the folder dataset"):
            ImageFolder(**both_or_none)


def test_build_dataset(coco, city):
    assert isinstance(build_dataset("coco_stuff27", root=coco[0], ids=coco[1]), CocoStuff27)
    assert len(build_dataset("cityscapes", root=city[0], label_size=320)) == 3
    with pytest.raises(ValueError, match="unknown dataset 'pascal'; choose one of") as err:
        build_dataset("pascal")
    assert all(n in str(err.value) for n in ("coco_stuff27", "cityscapes", "folder", "voc"))
    assert isinstance(build_dataset("cityscapes27", root=city[0]), Cityscapes27)  # an alias
    with pytest.raises(ValueError, match="label_size must be a positive integer"):
        build_dataset("cityscapes", root=city[0], label_size=0)


def test_dataloader_with_workers(coco):
    root, ids = coco
    ds = CocoStuff27(root, ids=ids, image_size=64, label_size=32)
    batches = list(DataLoader(ds, batch_size=2, num_workers=2))
    assert len(batches) == 2
    b = batches[0]
    assert b["image"].shape == (2, 3, 64, 64) and b["label"].shape == (2, 32, 32)
    assert b["id"] == ids[:2] and b["orig_size"].tolist() == [[48, 64], [64, 48]]
    assert torch.equal(batches[1]["label"][1], ds[3]["label"])


def test_diffcut_preprocessing_crop_and_label_indices():
    """DiffCut's protocol: square of side min(H, W) - 1 placed as torchvision's CenterCrop
    (round half to even), labels nearest-exact to 1024 then torch's legacy nearest to 128."""
    import torch.nn.functional as F

    from diffseg.data.transforms import diffcut_crop_box, preprocess_image, preprocess_label

    assert diffcut_crop_box(480, 640) == (0, 80, 479)  # round(0.5) = 0, round(80.5) = 80
    assert diffcut_crop_box(300, 303) == (0, 2, 299)  # round(2.0) = 2
    h, w = 37, 50
    label = (np.arange(h)[:, None] * 100 + np.arange(w)[None, :]).astype(np.int64)
    out = preprocess_label(label, 128, "diffcut")
    top, left, c = diffcut_crop_box(h, w)
    for i in range(128):
        src = int(np.floor((8 * i + 0.5) * c / 1024))  # legacy picks 8 i of the 1024 grid
        assert out[i, 0] == label[top + src, left] and out[0, i] == label[top, left + src]
    rgb = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    image = preprocess_image(rgb, 64, "diffcut")
    crop = torch.from_numpy(rgb[top : top + c, left : left + c]).permute(2, 0, 1).float()
    expected = F.interpolate(crop[None] / 255, size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(image, expected[0] * 2 - 1, atol=1e-5, rtol=0)
