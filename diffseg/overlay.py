"""Pictures of segmentations: colour maps, edges, side-by-side overlays and segment-id PNGs.

Everything here takes CPU or GPU tensors (or numpy arrays) and writes PNGs atomically (a temp
file renamed into place, mode 0666 & ~umask like any other file), so an interrupted run never
leaves a truncated image behind.

Outputs say where they come from: the writers take optional PNG text metadata (keys
``diffseg:<name>``, e.g. ``diffseg:random_weights=true``, ``diffseg:method``,
``diffseg:backbone``; read back with ``PIL.Image.open(path).text``), and an overlay made with
random weights carries a caption strip saying that its segments are meaningless.

Overlays are drawn at a display size (:data:`MAX_DISPLAY_SIDE` per panel at most; a captioned
small picture is magnified to :data:`MIN_DISPLAY_SIDE` so that the whole caption is readable);
label maps (:func:`save_segments_png`) always keep every pixel.
"""

from __future__ import annotations

import colorsys
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from diffseg.io_utils import atomic_write_with

__all__ = [
    "MAX_DISPLAY_SIDE",
    "MIN_DISPLAY_SIDE",
    "RANDOM_WEIGHTS_CAPTION",
    "add_caption",
    "colorize",
    "display_size",
    "edges",
    "image_to_uint8",
    "make_overlay",
    "palette",
    "png_metadata",
    "save_overlay",
    "save_png",
    "save_segments_png",
]

#: The caption of every overlay made with random weights.
RANDOM_WEIGHTS_CAPTION = "RANDOM WEIGHTS - these segments are meaningless (code-path check only)"
#: Overlays are pictures to look at: each panel's long side is at most this many pixels (a
#: 6000x4000 photo gives a 1024x683 panel, not an 18000 px strip); label PNGs keep the photo's size.
MAX_DISPLAY_SIDE = 1024
#: ... and a smaller picture is magnified (nearest, whole factor: pixels stay sharp) until its
#: long side reaches this, so that a caption fits on a 10x10 photo's overlay.
MIN_DISPLAY_SIDE = 256
#: Prefix of the PNG text keys written here.
METADATA_PREFIX = "diffseg:"


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 distinct colours: hues spaced by the golden ratio, alternating brightness.

    Deterministic, so the same segment id has the same colour in every picture.
    """
    golden = 0.618033988749895
    colours = [
        colorsys.hsv_to_rgb(
            (0.1 + k * golden) % 1.0, 0.55 + 0.35 * (k % 2), 0.95 - 0.25 * (k % 3 == 2)
        )
        for k in range(n)
    ]
    return (np.asarray(colours, dtype=np.float64).reshape(n, 3) * 255).round().astype(np.uint8)


def _to_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def image_to_uint8(image: torch.Tensor | np.ndarray, size: int | None = None) -> np.ndarray:
    """A model-range image as uint8 RGB.

    Args:
        image: (3, H, W) float in [-1, 1] (the datasets' ``image``), any device.
        size: resize (bilinear, antialiased, for display only) to (size, size) if given.

    Returns:
        (H', W', 3) uint8.
    """
    x = image.detach().float().cpu() if isinstance(image, torch.Tensor) else torch.as_tensor(image)
    if x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(f"image must have shape (3, H, W), got {tuple(x.shape)}")
    if size is not None and tuple(x.shape[1:]) != (size, size):
        x = torch.nn.functional.interpolate(
            x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )[0]
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 0).numpy()


def colorize(segments: torch.Tensor | np.ndarray, ignore_index: int | None = None) -> np.ndarray:
    """(H, W) integer ids -> (H, W, 3) uint8 colours (``palette``); ``ignore_index`` -> black."""
    seg = _to_numpy(segments).astype(np.int64)
    if seg.ndim != 2:
        raise ValueError(f"segments must have shape (H, W), got {seg.shape}")
    valid = seg >= 0 if ignore_index is None else (seg != ignore_index) & (seg >= 0)
    colours = palette(int(seg[valid].max(initial=0)) + 1)
    out = np.zeros((*seg.shape, 3), dtype=np.uint8)
    out[valid] = colours[seg[valid]]
    return out


def edges(segments: torch.Tensor | np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose right or lower neighbour has another id (segment boundaries)."""
    seg = _to_numpy(segments)
    out = np.zeros(seg.shape, dtype=bool)
    right = seg[:, 1:] != seg[:, :-1]
    down = seg[1:, :] != seg[:-1, :]
    out[:, :-1] |= right
    out[:-1, :] |= down
    return out


def display_size(
    height: int, width: int, max_side: int | None, min_side: int | None = None
) -> tuple[int, int]:
    """The (height, width) a picture is shown at: scaled down (aspect kept) so that its long
    side is at most ``max_side``, or magnified by the smallest whole factor that brings its long
    side to ``min_side``; None leaves that bound out."""
    long = max(height, width)
    if max_side is not None and long > max_side:
        scale = max_side / long
        return max(1, round(height * scale)), max(1, round(width * scale))
    if min_side is not None and long < min_side:
        factor = -(-min_side // long)  # ceil
        return height * factor, width * factor
    return height, width


def _resize_for_display(rgb: np.ndarray, seg: np.ndarray, size: tuple[int, int]):
    """Photo (antialiased) and segment ids (nearest, never mixed) at ``size`` = (h, w)."""
    h, w = size
    if (h, w) == seg.shape:
        return rgb, seg
    shrink = h < seg.shape[0]
    photo = Image.fromarray(rgb).resize(
        (w, h), Image.Resampling.BILINEAR if shrink else Image.Resampling.NEAREST, reducing_gap=None
    )
    rows = np.minimum((np.arange(h) * seg.shape[0]) // h, seg.shape[0] - 1)
    cols = np.minimum((np.arange(w) * seg.shape[1]) // w, seg.shape[1] - 1)
    return np.asarray(photo, dtype=np.uint8), seg[rows[:, None], cols[None, :]]


def make_overlay(
    image: torch.Tensor | np.ndarray,
    segments: torch.Tensor | np.ndarray,
    label: torch.Tensor | np.ndarray | None = None,
    alpha: float = 0.5,
    caption: str | None = None,
    max_side: int | None = None,
    min_side: int | None = None,
) -> np.ndarray:
    """Side-by-side panels: image | segments (colour) | image blended with segments and edges
    [| ground truth (colour, unlabelled black) when ``label`` is given].

    Args:
        image: (3, H, W) float in [-1, 1] at any size (resized to the segments' size), or an
            (H, W, 3) uint8 array at the segments' size.
        segments: (S, S) integer segment ids (or (H, W) with a uint8 image of that size; -1 =
            not segmented, drawn black).
        label: optional (S, S) integer classes, -1 = unlabelled.
        caption: optional text on a red strip above the panels (see :func:`add_caption`); the
            panels are then magnified to at least :data:`MIN_DISPLAY_SIDE` so that it is
            readable.
        max_side, min_side: the panels' display bounds (:func:`display_size`); None = the
            segments' size (``save_overlay`` and the predictor use :data:`MAX_DISPLAY_SIDE`).

    Returns:
        (h, k * w + gaps, 3) uint8 with (h, w) the display size, plus the strip's height in
        rows with a caption.
    """
    seg = _to_numpy(segments)
    h, w = seg.shape
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3:
        rgb = image
    else:
        if h != w:
            raise ValueError(f"segments must be square to resize the image, got {seg.shape}")
        rgb = image_to_uint8(image, size=h)
    if rgb.shape[:2] != (h, w):
        raise ValueError(f"image {rgb.shape[:2]} and segments {(h, w)} differ in size")
    if caption and min_side is None:
        min_side = MIN_DISPLAY_SIDE
    size = display_size(h, w, max_side, min_side)
    rgb, seg_shown = _resize_for_display(rgb, seg, size)
    colour = colorize(seg_shown)
    blend = (rgb.astype(np.float32) * (1 - alpha) + colour.astype(np.float32) * alpha).round()
    blend = blend.astype(np.uint8)
    blend[edges(seg_shown)] = 255
    panels = [rgb, colour, blend]
    if label is not None:
        lab = _to_numpy(label)
        panels.append(colorize(_resize_for_display(rgb, lab, size)[1], ignore_index=-1))
    gap = np.full((size[0], 4, 3), 255, dtype=np.uint8)
    row: list[np.ndarray] = []
    for k, panel in enumerate(panels):
        if k:
            row.append(gap)
        row.append(panel)
    out = np.concatenate(row, axis=1)
    return add_caption(out, caption) if caption else out


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """Words of ``text`` in lines no wider than ``width`` (a single long word keeps its line)."""
    lines: list[str] = []
    for word in text.split():
        trial = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(trial, font=font) <= width:
            lines[-1] = trial
        else:
            lines.append(word)
    return lines


def add_caption(picture: np.ndarray, text: str) -> np.ndarray:
    """``picture`` (H, W, 3) uint8 with a dark red strip holding ``text`` in white on top.

    The font is 1/40 of the width (12 to 40 px) and the words wrap onto as many lines as the
    width needs, so the whole caption is readable at any overlay size (:func:`make_overlay`
    magnifies small pictures first).
    """
    width = picture.shape[1]
    size = max(12, min(40, width // 40))
    font = _font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = _wrap(probe, text, font, width - 8)
    line_height = int(size * 1.3)
    height = max(16, line_height * len(lines) + size // 2)
    strip = Image.new("RGB", (width, height), (160, 0, 0))
    draw = ImageDraw.Draw(strip)
    top = (height - line_height * len(lines)) // 2
    for k, line in enumerate(lines):
        y = top + k * line_height + line_height // 2
        draw.text((4, y), line, fill=(255, 255, 255), font=font, anchor="lm")
    return np.concatenate([np.asarray(strip, dtype=np.uint8), picture], axis=0)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font at ``size`` px (a fixed small bitmap font without FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def png_metadata(
    metadata: Mapping[str, object] | None = None, random_weights: bool | None = None
) -> dict[str, str]:
    """PNG text entries: ``metadata`` keys get the ``diffseg:`` prefix (unless they hold a
    ':' already), booleans are written ``true``/``false``, None values are left out;
    ``random_weights`` (when not None) adds ``diffseg:random_weights``."""
    items = dict(metadata or {})
    if random_weights is not None:
        items["random_weights"] = bool(random_weights)
    out = {}
    for key, value in items.items():
        if value is None:
            continue
        name = key if ":" in key else METADATA_PREFIX + key
        out[name] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return out


def save_png(
    path: str | os.PathLike, array: np.ndarray, metadata: Mapping[str, object] | None = None
) -> Path:
    """Write a uint8/uint16 array as PNG atomically (temp file in the same folder, then
    rename), mode 0666 & ~umask. ``metadata`` goes in as PNG text (see :func:`png_metadata`)."""
    info = None
    if metadata:
        info = PngInfo()
        for key, value in png_metadata(metadata).items():
            info.add_text(key, value)
    img = Image.fromarray(array)
    return atomic_write_with(path, lambda f: img.save(f, format="PNG", pnginfo=info))


def save_segments_png(
    path: str | os.PathLike,
    segments: torch.Tensor | np.ndarray,
    metadata: Mapping[str, object] | None = None,
    random_weights: bool | None = None,
) -> Path:
    """Save (H, W) segment ids exactly as predicted (not renumbered: the metric depends on them).

    8-bit grayscale when every id is < 256, else 16-bit; ``eval.score`` reads both. Pixels
    -1 ("not segmented", e.g. a photo's borders outside the centre crop, see
    ``diffseg.data.transforms.to_original_size``) are stored as the format's largest value
    (255 or 65535), which no id may then use, and named in the text entry
    ``diffseg:unsegmented``. ``metadata``/``random_weights``: PNG text (:func:`png_metadata`).
    """
    seg = _to_numpy(segments).astype(np.int64)
    if seg.ndim != 2:
        raise ValueError(f"segments must have shape (H, W), got {seg.shape}")
    unsegmented = seg == -1
    ids = seg[~unsegmented]
    top = 65535 if unsegmented.any() else 65536
    if ids.size and (ids.min() < 0 or ids.max() >= top):
        raise ValueError(
            f"segment ids must lie in [0, {top - 1}] (-1 = not segmented), got "
            f"[{ids.min()}, {ids.max()}]"
        )
    eight_bit = ids.max(initial=0) < (255 if unsegmented.any() else 256)
    dtype = np.uint8 if eight_bit else np.uint16
    text = dict(png_metadata(metadata, random_weights))
    if unsegmented.any():
        fill = int(np.iinfo(dtype).max)
        seg = np.where(unsegmented, fill, seg)
        text[METADATA_PREFIX + "unsegmented"] = str(fill)
    return save_png(path, seg.astype(dtype), text)


def save_overlay(
    path: str | os.PathLike,
    image: torch.Tensor | np.ndarray,
    segments: torch.Tensor | np.ndarray,
    label: torch.Tensor | np.ndarray | None = None,
    random_weights: bool | None = None,
    caption: str | None = None,
    metadata: Mapping[str, object] | None = None,
    max_side: int | None = MAX_DISPLAY_SIDE,
) -> Path:
    """``make_overlay`` written to ``path`` as PNG (atomically), its panels' long side at most
    ``max_side`` (the label map itself is saved at full size by :func:`save_segments_png`).

    ``random_weights=True`` puts :data:`RANDOM_WEIGHTS_CAPTION` on top (unless ``caption``
    gives another text) and writes ``diffseg:random_weights=true``; ``metadata`` adds PNG text
    such as ``{"method": "diffseg", "backbone": "tiny"}`` (see :func:`png_metadata`).
    """
    if caption is None and random_weights:
        caption = RANDOM_WEIGHTS_CAPTION
    picture = make_overlay(image, segments, label, caption=caption, max_side=max_side)
    return save_png(path, picture, png_metadata(metadata, random_weights))
