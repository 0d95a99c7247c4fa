"""Pictures of segmentations: colour maps, edges, side-by-side overlays and segment-id PNGs.

Everything here takes CPU or GPU tensors (or numpy arrays) and writes PNGs atomically (a temp
file renamed into place), so an interrupted run never leaves a truncated image behind.
"""

from __future__ import annotations

import colorsys
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = [
    "colorize",
    "edges",
    "image_to_uint8",
    "make_overlay",
    "palette",
    "save_overlay",
    "save_png",
    "save_segments_png",
]


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


def make_overlay(
    image: torch.Tensor | np.ndarray,
    segments: torch.Tensor | np.ndarray,
    label: torch.Tensor | np.ndarray | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """Side-by-side panels: image | segments (colour) | image blended with segments and edges
    [| ground truth (colour, unlabelled black) when ``label`` is given].

    Args:
        image: (3, H, W) float in [-1, 1] at any size (resized to the segments' size), or an
            (H, W, 3) uint8 array at the segments' size.
        segments: (S, S) integer segment ids.
        label: optional (S, S) integer classes, -1 = unlabelled.

    Returns:
        (S, k * S + gaps, 3) uint8.
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
    colour = colorize(seg)
    blend = (rgb.astype(np.float32) * (1 - alpha) + colour.astype(np.float32) * alpha).round()
    blend = blend.astype(np.uint8)
    blend[edges(seg)] = 255
    panels = [rgb, colour, blend]
    if label is not None:
        panels.append(colorize(label, ignore_index=-1))
    gap = np.full((h, 4, 3), 255, dtype=np.uint8)
    row: list[np.ndarray] = []
    for k, panel in enumerate(panels):
        if k:
            row.append(gap)
        row.append(panel)
    return np.concatenate(row, axis=1)


def save_png(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write a uint8/uint16 array as PNG atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(array).save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_segments_png(path: str | os.PathLike, segments: torch.Tensor | np.ndarray) -> Path:
    """Save (H, W) segment ids exactly as predicted (not renumbered: the metric depends on them).

    8-bit grayscale when every id is < 256, else 16-bit; ``eval.score`` reads both.
    """
    seg = _to_numpy(segments).astype(np.int64)
    if seg.ndim != 2:
        raise ValueError(f"segments must have shape (H, W), got {seg.shape}")
    if seg.size and (seg.min() < 0 or seg.max() > 65535):
        raise ValueError(f"segment ids must lie in [0, 65535], got [{seg.min()}, {seg.max()}]")
    dtype = np.uint8 if seg.max(initial=0) < 256 else np.uint16
    return save_png(path, seg.astype(dtype))


def save_overlay(
    path: str | os.PathLike,
    image: torch.Tensor | np.ndarray,
    segments: torch.Tensor | np.ndarray,
    label: torch.Tensor | np.ndarray | None = None,
) -> Path:
    """``make_overlay`` written to ``path`` as PNG (atomically)."""
    return save_png(path, make_overlay(image, segments, label))
