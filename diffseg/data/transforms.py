"""Preprocessing of docs/diffseg.md section 1: centre square crop, resize, scaling to [-1, 1].

The reference (TensorFlow) pipeline is: decode to uint8, crop the centre square of side
c = min(H, W) starting at row (H - c) // 2 and column (W - c) // 2, then
``tf.image.resize`` to 512x512 (bilinear, half-pixel centres, no antialias; it returns
float32 *without rounding*), then x / 127.5 - 1. Labels take the same crop and a
nearest-neighbour resize with half-pixel centres (source index floor((i + 0.5) * c / size)).

Here the image resize is ``torch.nn.functional.interpolate(mode="bilinear",
align_corners=False, antialias=False)`` on the float image, which computes the same formula
as ``tf.image.resize`` and, like it, does not round back to uint8 (``cv2.INTER_LINEAR`` on
uint8 agrees to within one grey level but rounds, and uses 11-bit fixed-point weights).
The label resize uses explicit integer index arithmetic: ``cv2.INTER_NEAREST_EXACT`` does
not give the formula's indices for every size. Both were checked against TensorFlow 2.21:
bilinear within 5e-4, nearest indices identical.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, torch.Tensor)


def center_crop_box(height: int, width: int) -> tuple[int, int, int]:
    """The centre square of an (height, width) image: returns (top, left, side)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"cannot crop an empty image of size {height}x{width}")
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side


def center_crop_square(x: ArrayOrTensor) -> ArrayOrTensor:
    """Centre square crop of side min(H, W).

    Args:
        x: a numpy array laid out (H, W) or (H, W, C) (decoded images and labels), or a torch
            tensor laid out (..., H, W) (e.g. (C, H, W) or (B, C, H, W)).

    Returns:
        the same type, (c, c[, C]) for arrays and (..., c, c) for tensors, c = min(H, W);
        a view, no copy.
    """
    if isinstance(x, torch.Tensor):
        if x.ndim < 2:
            raise ValueError(f"expected a tensor (..., H, W), got shape {tuple(x.shape)}")
        top, left, side = center_crop_box(x.shape[-2], x.shape[-1])
        return x[..., top : top + side, left : left + side]
    if x.ndim not in (2, 3):
        raise ValueError(f"expected an array (H, W) or (H, W, C), got shape {x.shape}")
    top, left, side = center_crop_box(x.shape[0], x.shape[1])
    return x[top : top + side, left : left + side]


def resize_image(image: torch.Tensor | np.ndarray, size: int) -> torch.Tensor:
    """Bilinear resize to (size, size) with half-pixel centres and no antialiasing.

    Args:
        image: float or uint8 tensor (C, h, w) or (B, C, h, w), or a uint8/float numpy array
            (h, w, C) as decoded (converted to (C, h, w)). Values are kept in their range.
        size: output side.

    Returns:
        float32 tensor (C, size, size) or (B, C, size, size), NOT rounded (as
        ``tf.image.resize``). A tensor input keeps its device.
    """
    if isinstance(image, np.ndarray):
        if image.ndim != 3:
            raise ValueError(f"expected a numpy image (h, w, C), got shape {image.shape}")
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if image.ndim not in (3, 4):
        raise ValueError(f"expected (C, h, w) or (B, C, h, w), got shape {tuple(image.shape)}")
    batched = image.ndim == 4
    x = image if batched else image.unsqueeze(0)
    x = x.to(torch.float32)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=False
        )
    return x if batched else x.squeeze(0)


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source indices of a half-pixel-centre nearest resize: floor((i + 0.5) * in / out).

    Computed exactly in integers, ((2i + 1) * in) // (2 * out), clamped to in - 1.

    Returns:
        int64 array (out_size,).
    """
    if in_size <= 0 or out_size <= 0:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    i = np.arange(out_size, dtype=np.int64)
    return np.minimum(((2 * i + 1) * in_size) // (2 * out_size), in_size - 1)


def resize_label(label: ArrayOrTensor, size: int) -> ArrayOrTensor:
    """Nearest-neighbour resize with half-pixel centres (as ``tf.image.resize`` NEAREST_NEIGHBOR,
    PIL's NEAREST and torch's "nearest-exact") of a label map.

    Args:
        label: integer numpy array (h, w) or tensor (..., h, w). Values are copied, never mixed.
        size: output side.

    Returns:
        the same type and dtype, (size, size) (tensors: (..., size, size)).
    """
    if isinstance(label, torch.Tensor):
        rows = torch.from_numpy(nearest_indices(label.shape[-2], size)).to(label.device)
        cols = torch.from_numpy(nearest_indices(label.shape[-1], size)).to(label.device)
        return label.index_select(-2, rows).index_select(-1, cols)
    if label.ndim != 2:
        raise ValueError(f"expected a label array (h, w), got shape {label.shape}")
    rows = nearest_indices(label.shape[0], size)
    cols = nearest_indices(label.shape[1], size)
    return label[rows[:, None], cols[None, :]]


def to_model_range(image: torch.Tensor) -> torch.Tensor:
    """0..255 values to the model's range: x / 127.5 - 1 (float32, [-1, 1] for 0..255 input)."""
    return image.to(torch.float32) / 127.5 - 1.0


def from_model_range(image: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`to_model_range` for display: (3, S, S) in [-1, 1] to uint8 (S, S, 3)."""
    x = ((image.detach().to("cpu", torch.float32) + 1.0) * 127.5).round().clamp(0, 255)
    return x.to(torch.uint8).permute(1, 2, 0).numpy()


#: The benchmarks' preprocessing protocols: DiffSeg's release (centre square of side min(H, W),
#: labels resized once to the evaluation size), DiffCut's (side min(H, W) - 1 placed as
#: torchvision's CenterCrop places it; labels nearest-exact to the model's input size, then
#: torch's legacy nearest down to the evaluation size) and Seg4Diff's (no crop: shortest side to
#: the evaluation size, zero padding to multiples of 32, the canvas stretched to the model's
#: square; labels and predictions at each image's own resized size, see :func:`seg4diff_image`).
PREPROCESSING = ("diffseg", "diffcut", "seg4diff")
#: The preprocessings whose labels and predictions keep each image's aspect ratio (not square).
PER_IMAGE_SIZE = ("seg4diff",)


def check_preprocessing(preprocessing: str) -> str:
    if preprocessing not in PREPROCESSING:
        raise ValueError(
            f"preprocessing={preprocessing!r} is unknown; use one of {', '.join(PREPROCESSING)}"
        )
    return preprocessing


def diffcut_crop_box(height: int, width: int) -> tuple[int, int, int]:
    """DiffCut's centre square ``(top, left, side)``: side ``min(H, W) - 1``, corner
    ``round((H - side) / 2)`` with Python's round-half-to-even (as torchvision's ``CenterCrop``),
    so a one-pixel margin goes to the bottom / right."""
    side = min(height, width) - 1
    if side < 1:
        raise ValueError(f"cannot crop a {height}x{width} image to min(H, W) - 1")
    return round((height - side) / 2), round((width - side) / 2), side


def _crop(x: np.ndarray, preprocessing: str) -> np.ndarray:
    if check_preprocessing(preprocessing) in PER_IMAGE_SIZE:
        raise ValueError(f"preprocessing={preprocessing!r} does not crop: use seg4diff_image")
    if preprocessing == "diffseg":
        return center_crop_square(x)
    top, left, side = diffcut_crop_box(x.shape[0], x.shape[1])
    return x[top : top + side, left : left + side]


def legacy_nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source indices of torch's legacy ``nearest`` (``F.interpolate(mode="nearest")``):
    ``floor(i * in / out)``, int64 (out_size,)."""
    idx = np.floor(np.arange(out_size, dtype=np.float64) * (in_size / out_size)).astype(np.int64)
    return np.minimum(idx, in_size - 1)


def preprocess_image(
    rgb: np.ndarray, image_size: int, preprocessing: str = "diffseg"
) -> torch.Tensor:
    """Decoded uint8 RGB (H, W, 3) to the model input: crop, resize, scale.

    Returns:
        float32 tensor (3, image_size, image_size) in [-1, 1].
    """
    return to_model_range(resize_image(_crop(rgb, preprocessing), image_size))


#: DiffCut's protocol resizes labels to this side first (its model input), whatever model runs.
DIFFCUT_LABEL_STEP = 1024


def preprocess_label(
    label: np.ndarray, label_size: int, preprocessing: str = "diffseg"
) -> np.ndarray:
    """A label map (H, W) (any integer dtype, class mapping before or after: nearest resizes
    only copy values) to (label_size, label_size).

    ``diffseg``: crop, then one nearest resize (half-pixel centres). ``diffcut``: crop, nearest-
    exact to 1024 (:data:`DIFFCUT_LABEL_STEP`), then torch's legacy nearest to ``label_size``.
    """
    cropped = _crop(label, preprocessing)
    if preprocessing == "diffseg":
        return resize_label(cropped, label_size)
    exact = nearest_indices(cropped.shape[0], DIFFCUT_LABEL_STEP)
    index = exact[legacy_nearest_indices(DIFFCUT_LABEL_STEP, label_size)]
    return cropped[index[:, None], index[None, :]]


# ----------------------------------------------------------------------------- Seg4Diff
# Seg4Diff's release (detectron2's test mapper, then its model) neither crops nor keeps the
# aspect ratio: the image is resized by its shortest side, padded to multiples of 32 with zeros
# (black) at the bottom / right, and that canvas is stretched to the model's square input. The
# evaluation happens at the resized, unpadded size (h', w'), which differs from image to image.

#: Seg4Diff's input constants: shortest side 640 (detectron2's MIN_SIZE_TEST; the longest side
#: at most 4x that, MAX_SIZE_TEST 2560), padding to multiples of 32, a 1024 x 1024 model input.
SEG4DIFF_SHORT_SIDE, SEG4DIFF_PAD_TO, SEG4DIFF_MODEL_SIZE = 640, 32, 1024
SEG4DIFF_MAX_RATIO = 4


def seg4diff_size(
    height: int, width: int, short_side: int = SEG4DIFF_SHORT_SIDE
) -> tuple[int, int]:
    """detectron2's ResizeShortestEdge(short_side, max 4 x short_side): the resized ``(h', w')``
    of an H x W image (640 -> at most 2560, as released), rounded half up."""
    longest = SEG4DIFF_MAX_RATIO * short_side
    scale = short_side / min(height, width)
    if max(height, width) * scale > longest:
        scale = longest / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def padded_size(height: int, width: int, multiple: int = SEG4DIFF_PAD_TO) -> tuple[int, int]:
    """``(height, width)`` rounded up to multiples of ``multiple`` (Seg4Diff's canvas)."""
    return -(-height // multiple) * multiple, -(-width // multiple) * multiple


def seg4diff_image(
    rgb: np.ndarray,
    short_side: int = SEG4DIFF_SHORT_SIDE,
    model_size: int = SEG4DIFF_MODEL_SIZE,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Seg4Diff's input chain for a uint8 RGB image (H, W, 3).

    PIL bilinear resize to ``(h', w') = seg4diff_size(H, W, short_side)`` (on uint8, PIL's
    antialiasing when it shrinks), x / 255, zero padding of the bottom / right to multiples of
    32, the padded canvas stretched to ``model_size`` squared (bilinear, half-pixel, no
    antialias; aspect not kept), then 2x - 1.

    Returns:
        ``(image, (h', w'))``: float32 (3, model_size, model_size) in [-1, 1], and the
        evaluation size.
    """
    from PIL import Image

    h, w = seg4diff_size(*rgb.shape[:2], short_side)
    resized = np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))
    x = torch.from_numpy(resized.copy()).permute(2, 0, 1).float() / 255.0
    ph, pw = padded_size(h, w)
    x = resize_image(F.pad(x, (0, pw - w, 0, ph - h)), model_size)
    return 2 * x - 1, (h, w)


def seg4diff_label(label: np.ndarray, short_side: int = SEG4DIFF_SHORT_SIDE) -> np.ndarray:
    """A label map (H, W) at Seg4Diff's evaluation size ``(h', w')``: nearest with half-pixel
    centres (PIL's NEAREST rule, without its limits on integer modes)."""
    h, w = seg4diff_size(*label.shape[:2], short_side)
    rows, cols = nearest_indices(label.shape[0], h), nearest_indices(label.shape[1], w)
    return label[rows[:, None], cols[None, :]]


# ----------------------------------------------------------------------------- own photos
# The benchmarks always take the centre square (the paper's protocol). A folder of one's own
# photos may instead pad to a square or squash to one, and its predictions are mapped back to
# the photo's own size with :func:`to_original_size`.

#: Ways to make a photo square: the paper's centre crop, padding, or squashing.
CROP_MODES = ("center", "pad", "resize")
#: Value of the padding of ``crop="pad"`` in 0..255: mid-grey, exactly 0.0 in the model range.
PAD_VALUE = 127.5


def check_crop(crop: str) -> str:
    """``crop`` if it is one of :data:`CROP_MODES`, else a ValueError naming the choices."""
    if crop not in CROP_MODES:
        raise ValueError(
            f"crop must be one of {', '.join(CROP_MODES)} (dataset.crop= with run.py), got {crop!r}"
        )
    return crop


def crop_window(height: int, width: int, crop: str = "center") -> tuple[int, int, int, int]:
    """The window of the stored image that becomes the square model input.

    Returns ``(top, left, box_height, box_width)`` in the stored image's pixel coordinates:
    ``center``: the centre square (inside the image); ``pad``: the square of side
    max(H, W) centred on the image (``top``/``left`` <= 0; what lies outside the image is
    padding); ``resize``: the whole image (0, 0, H, W), squashed to a square.
    """
    check_crop(crop)
    if height <= 0 or width <= 0:
        raise ValueError(f"cannot crop an empty image of size {height}x{width}")
    if crop == "center":
        top, left, side = center_crop_box(height, width)
        return top, left, side, side
    if crop == "pad":
        side = max(height, width)
        return -((side - height) // 2), -((side - width) // 2), side, side
    return 0, 0, height, width


def preprocess_image_crop(rgb: np.ndarray, image_size: int, crop: str = "center") -> torch.Tensor:
    """:func:`preprocess_image` with a choice of how to make the photo square.

    ``center`` is exactly :func:`preprocess_image`. ``pad`` pads the photo, centred, to a
    square of side max(H, W) with constant mid-grey (:data:`PAD_VALUE`, 0.0 in the model
    range: no edge streaks, and the padding is one flat region), then resizes. ``resize``
    squashes the whole photo to the square (aspect ratio not kept). Resizing is the same
    bilinear, no-antialias resize as the benchmarks'.

    Returns:
        float32 tensor (3, image_size, image_size) in [-1, 1].
    """
    if check_crop(crop) == "center":
        return preprocess_image(rgb, image_size)
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).to(torch.float32)
    if crop == "pad":
        top, left, side, _ = crop_window(rgb.shape[0], rgb.shape[1], "pad")
        bottom, right = side - rgb.shape[0] + top, side - rgb.shape[1] + left
        x = F.pad(x, (-left, right, -top, bottom), value=PAD_VALUE)
    return to_model_range(resize_image(x, image_size))


def to_original_size(
    segments: ArrayOrTensor,
    orig_size: tuple[int, int] | torch.Tensor | np.ndarray,
    crop: str = "center",
    fill: int | None = -1,
) -> ArrayOrTensor:
    """Map a square prediction back onto the photo it was made from.

    Each photo pixel takes the segment at its position in the square (nearest, half-pixel
    centres, like :func:`resize_label`): for ``resize`` this is a nearest resize to (H, W)
    (the segments may then be any (h, w), such as ``preprocessing=seg4diff``'s (h', w')),
    for ``pad`` the padding is cut away. With ``center``, the photo's borders outside the
    centre square were never segmented: they get ``fill`` (-1, "not segmented", drawn black
    by ``diffseg.overlay.colorize``), or with ``fill=None`` the nearest segment (extended
    outwards; prettier, but it claims pixels the model never saw).

    Args:
        segments: (S, S) integer segment ids (numpy or torch, any device); (h, w) for
            ``resize``.
        orig_size: the photo's (H, W), e.g. an item's ``orig_size``.
        crop: the crop mode the item was made with (an item's ``crop``).

    Returns:
        the same type, int64, (H, W).
    """
    height, width = (int(v) for v in orig_size)
    top, left, box_h, box_w = crop_window(height, width, crop)
    if segments.ndim != 2 or (crop != "resize" and segments.shape[0] != segments.shape[1]):
        raise ValueError(
            f"segments must be (S, S) (any (h, w) with crop='resize'), got {tuple(segments.shape)}"
        )
    rows, row_in = _source_indices(height, top, box_h, segments.shape[0])
    cols, col_in = _source_indices(width, left, box_w, segments.shape[1])
    if isinstance(segments, torch.Tensor):
        dev = segments.device
        out = segments.to(torch.int64)[
            torch.from_numpy(rows).to(dev)[:, None], torch.from_numpy(cols).to(dev)[None, :]
        ]
        if fill is not None:
            outside = ~torch.from_numpy(row_in[:, None] & col_in[None, :]).to(dev)
            out = out.masked_fill(outside, fill)
        return out
    out = np.asarray(segments).astype(np.int64)[rows[:, None], cols[None, :]]
    if fill is not None:
        out[~(row_in[:, None] & col_in[None, :])] = fill
    return out


def _source_indices(length: int, start: int, box: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """For photo positions 0..length-1 along one axis: the index in the square (clamped to
    0..size-1) and whether the position lies inside the window [start, start + box)."""
    pos = np.arange(length, dtype=np.int64) - start
    inside = (pos >= 0) & (pos < box)
    index = np.clip(((2 * pos + 1) * size) // (2 * box), 0, size - 1)
    return index, inside
