"""Overlay and prediction PNGs: random-weight caption, PNG text metadata, umask, -1 pixels."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from diffseg.io_utils import atomic_write_bytes, atomic_write_text
from diffseg.overlay import (
    MAX_DISPLAY_SIDE,
    MIN_DISPLAY_SIDE,
    RANDOM_WEIGHTS_CAPTION,
    make_overlay,
    png_metadata,
    save_overlay,
    save_png,
    save_segments_png,
)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _inputs(size=32):
    image = torch.linspace(-1, 1, 3 * size * size).reshape(3, size, size)
    segments = (torch.arange(size)[:, None] // 8 + torch.arange(size)[None, :] // 16) % 5
    return image, segments


def test_results_files_respect_the_umask(tmp_path, umask_022):
    image, segments = _inputs()
    written = [
        save_overlay(tmp_path / "o.png", image, segments),
        save_segments_png(tmp_path / "p.png", segments),
        atomic_write_text(tmp_path / "results.json", "{}\n"),
        atomic_write_bytes(tmp_path / "sub" / "b.bin", b"x"),
    ]
    assert [_mode(p) for p in written] == [0o644] * 4
    os.umask(0o077)
    assert _mode(atomic_write_text(tmp_path / "private.json", "{}")) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "o.png",
        "p.png",
        "private.json",
        "results.json",
        "sub",
    ]  # no temp files left behind


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    target = atomic_write_text(tmp_path / "r.json", "old")
    with pytest.raises(TypeError):
        save_png(target, np.zeros((2, 2), dtype=object))
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["r.json"]


def test_random_weights_overlay_has_caption_and_metadata(tmp_path):
    image, segments = _inputs(128)
    plain = make_overlay(image, segments, min_side=MIN_DISPLAY_SIDE)  # captions magnify
    path = save_overlay(
        tmp_path / "o.png",
        image,
        segments,
        random_weights=True,
        metadata={"method": "diffseg", "backbone": "tiny"},
    )
    with Image.open(path) as img:
        text, picture = dict(img.text), np.asarray(img.convert("RGB"))
    assert text == {
        "diffseg:random_weights": "true",
        "diffseg:method": "diffseg",
        "diffseg:backbone": "tiny",
    }
    strip = picture.shape[0] - plain.shape[0]
    assert strip >= 16 and picture.shape[1] == plain.shape[1]
    np.testing.assert_array_equal(picture[strip:], plain)  # the panels are untouched
    top = picture[:strip]
    red = (top[..., 0] == 160) & (top[..., 1] == 0)
    white = (top > 200).all(axis=-1)
    assert red.mean() > 0.5 and white.sum() > 20  # a red strip with text drawn on it


def test_real_weights_overlay_is_unchanged_but_says_so(tmp_path):
    image, segments = _inputs()
    path = save_overlay(tmp_path / "o.png", image, segments, random_weights=False)
    with Image.open(path) as img:
        assert img.text == {"diffseg:random_weights": "false"}
        np.testing.assert_array_equal(np.asarray(img), make_overlay(image, segments))
    with Image.open(save_overlay(tmp_path / "old.png", image, segments)) as img:
        assert img.text == {}  # the old call still works and writes no claim


def _caption_strip(picture: np.ndarray) -> np.ndarray:
    """The rows of the red caption strip on top of an overlay."""
    red = (picture[..., 0] == 160) & (picture[..., 1] == 0)
    rows = red.mean(axis=1) > 0.3
    return picture[: int(np.argmin(rows))]


def _text_extent(strip: np.ndarray) -> float:
    """Fraction of the strip's width spanned by white text."""
    cols = np.flatnonzero((strip > 200).all(axis=-1).any(axis=0))
    return (cols.max() - cols.min() + 1) / strip.shape[1] if cols.size else 0.0


@pytest.mark.parametrize("side", [8, 10, 40])
def test_caption_is_whole_and_readable_on_a_tiny_overlay(side):
    """A 10x10 photo's overlay is magnified (nearest, whole factor) so that the whole caption
    fits at a readable size, instead of being cut to its first words."""
    image, segments = _inputs(side)
    out = make_overlay(image, segments, caption=RANDOM_WEIGHTS_CAPTION)
    factor = -(-MIN_DISPLAY_SIDE // side)
    panels = make_overlay(image, segments, min_side=MIN_DISPLAY_SIDE)
    assert panels.shape[:2] == (side * factor, 3 * side * factor + 2 * 4)
    strip = _caption_strip(out)
    assert strip.shape[0] >= 16 and out.shape[0] == strip.shape[0] + panels.shape[0]
    np.testing.assert_array_equal(out[strip.shape[0] :], panels)
    # the whole sentence, not "RANDOM WEIGHTS" alone: its text spans most of a line
    assert _text_extent(strip) > 0.6
    # magnified by repetition: each photo pixel is a factor x factor block
    np.testing.assert_array_equal(panels[::factor, : side * factor : factor], make_overlay(
        image, segments)[:, :side])  # fmt: skip


def test_large_photo_overlay_is_bounded_and_labels_are_not():
    """A 3000x2000 photo: the overlay's panels are 1024 px on the long side, the label PNG
    keeps every pixel."""
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 255, (2000, 3000, 3), dtype=np.uint8)
    segments = np.zeros((2000, 3000), dtype=np.int64)
    segments[:, 1500:] = 1
    segments[1000:, :] += 2
    out = make_overlay(photo, segments, max_side=MAX_DISPLAY_SIDE)
    assert out.shape == (683, 3 * 1024 + 2 * 4, 3)
    colours = out[:, 1024 + 4 : 2 * 1024 + 4].reshape(-1, 3)
    assert len(np.unique(colours, axis=0)) == 4  # the segments, never blended by the resize
    captioned = make_overlay(photo, segments, caption=RANDOM_WEIGHTS_CAPTION, max_side=1024)
    strip = _caption_strip(captioned)
    assert captioned.shape[1] == out.shape[1] and strip.shape[0] >= 40  # large type
    assert _text_extent(strip) > 0.3


def test_save_overlay_bounds_the_picture(tmp_path):
    photo = np.full((1500, 2500, 3), 90, dtype=np.uint8)
    segments = np.zeros((1500, 2500), dtype=np.int64)
    with Image.open(save_overlay(tmp_path / "o.png", photo, segments)) as img:
        assert img.size == (3 * MAX_DISPLAY_SIDE + 8, 614)
    # and a benchmark overlay at 512 is drawn as before (no caption: no magnifying)
    image, seg = _inputs(64)
    with Image.open(save_overlay(tmp_path / "b.png", image, seg)) as img:
        np.testing.assert_array_equal(np.asarray(img), make_overlay(image, seg))


def test_prediction_png_metadata_and_values(tmp_path):
    _, segments = _inputs()
    path = save_segments_png(
        tmp_path / "p.png", segments, metadata={"method": "kmeans_c"}, random_weights=True
    )
    with Image.open(path) as img:
        assert img.text == {"diffseg:method": "kmeans_c", "diffseg:random_weights": "true"}
        np.testing.assert_array_equal(np.asarray(img), segments.numpy())


def test_unsegmented_pixels_are_stored_and_named(tmp_path):
    seg = np.array([[-1, 0, 3], [-1, 2, 2]])
    with Image.open(save_segments_png(tmp_path / "a.png", seg)) as img:
        assert img.mode == "L" and img.text == {"diffseg:unsegmented": "255"}
        np.testing.assert_array_equal(np.asarray(img), np.where(seg < 0, 255, seg))
    wide = np.array([[-1, 255]])
    with Image.open(save_segments_png(tmp_path / "b.png", wide)) as img:
        assert img.text == {"diffseg:unsegmented": "65535"}
        np.testing.assert_array_equal(np.asarray(img).astype(np.int64), [[65535, 255]])
    with pytest.raises(ValueError, match="segment ids must lie in"):
        save_segments_png(tmp_path / "c.png", np.array([[-2, 0]]))
    with pytest.raises(ValueError, match="segment ids must lie in"):
        save_segments_png(tmp_path / "d.png", np.array([[-1, 65535]]))


def test_png_metadata_rules():
    assert png_metadata({"a": 1, "b": None, "x:y": True}, random_weights=False) == {
        "diffseg:a": "1",
        "x:y": "true",
        "diffseg:random_weights": "false",
    }
