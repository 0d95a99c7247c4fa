"""Decoding image and label files exactly as stored.

Images are decoded with Pillow, which raises on truncated files instead of returning a partly
grey picture. Benchmark images are used as stored (:func:`read_image_rgb`): the EXIF
orientation tag is NOT applied, as the reference's ``tf.io.decode_jpeg`` does not, and their
labels are stored the same way. One's own photos are used as seen (:func:`read_photo`): a phone
photo whose EXIF tag says "rotate 90 degrees" is turned upright before anything else. Labels are read as the integers
stored in the PNG: a palette PNG gives its indices, never its colours.

A file that cannot be used raises a :class:`DataFileError` (a ``diffseg.errors.DataError``)
with one message naming the file and the fix. Raised in a ``DataLoader`` worker, it reaches the
main process as the same type with the same one message (see :class:`DataFileError`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from diffseg.errors import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataFileError",
    "MissingFileError",
    "UnreadableFileError",
    "read_image_rgb",
    "read_label",
    "read_photo",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")

# Pillow modes holding integers wider than 8 bits (16-bit PNGs and the like).
_WIDE_INT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# Single-channel modes whose stored values are the class ids of a label map.
_LABEL_MODES = ("L", "P", "1", *_WIDE_INT_MODES)


class DataFileError(DataError):
    """A data file that cannot be used: the message names it (and the value) and the fix.

    The constructor takes the message only, which is what lets a ``DataLoader`` re-raise it
    in the main process as the same type: torch rebuilds a worker's exception as
    ``type(message)`` with the message "Caught <type> in DataLoader worker process N.
    Original Traceback ...". Given such a message, the constructor keeps only the original
    message, so the main process sees the one clean line and not the worker's traceback.
    """

    def __init__(self, message: str) -> None:
        super().__init__(_unwrap_worker_message(str(message), type(self)))


def _unwrap_worker_message(text: str, cls: type) -> str:
    """The original message inside torch's worker re-raise text, else ``text`` unchanged."""
    if not (text.startswith("Caught ") and "Original Traceback" in text):
        return text
    # The traceback ends with "<module>.<qualname>: <message>" (format_exception_only).
    name = (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )
    at = text.rfind(f"\n{name}: ")
    return text[at + len(name) + 3 :].strip() if at >= 0 else text


class UnreadableFileError(DataFileError, OSError):
    """A corrupt, truncated, empty or non-image file (also an ``OSError``, as before)."""


class MissingFileError(DataFileError, FileNotFoundError):
    """A data file that disappeared after the dataset was built (also ``FileNotFoundError``)."""


def _open(path: Path, what: str) -> Image.Image:
    """Open and fully decode ``path``; a missing or undecodable file raises one clear error."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(
            f"{what} file not found: {path}; it was listed when the dataset was built: "
            "restore it or rebuild the dataset."
        )
    if path.stat().st_size == 0:
        raise UnreadableFileError(
            f"{what} file {path} is empty (0 bytes): copy it again or delete it."
        )
    try:
        with Image.open(path) as img:
            img.load()
            return img
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
    ) as err:
        # from None: the reason is in the message; Pillow's own traceback adds nothing to fix.
        raise UnreadableFileError(
            f"cannot decode {what} file {path} ({type(err).__name__}: {err}); the file is "
            "corrupt, truncated or not an image: re-extract or re-download it."
        ) from None


def _wide_to_uint8(values: np.ndarray) -> np.ndarray:
    """16-bit intensities to 8 bits by keeping the high byte (what libpng's strip_16 does)."""
    return (np.clip(values.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)


def read_image_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file to RGB, as stored (the benchmarks' reading).

    Grayscale is replicated to three channels, alpha is dropped (not composited, like
    ``tf.io.decode_image(channels=3)``), palette images take their palette colours, 16-bit
    images keep their high byte, CMYK/YCbCr are converted by Pillow. EXIF orientation is
    NOT applied (see :func:`read_photo`).

    Returns:
        uint8 array (H, W, 3), values 0..255, H and W as stored in the file.
    """
    return _to_rgb(_open(Path(path), "image"))


def read_photo(path: str | Path) -> np.ndarray:
    """Decode a photo to RGB as it is seen: :func:`read_image_rgb` after applying the EXIF
    orientation tag (``PIL.ImageOps.exif_transpose``). Folder runs and the predictor read
    images this way; the benchmarks do not (their labels match the stored pixels).

    Returns:
        uint8 array (H, W, 3), H and W upright (swapped from the stored size for the tags
        that turn the picture by 90 degrees).
    """
    img = _open(Path(path), "image")
    try:
        img = ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError):
        pass  # a damaged EXIF block: the pixels are fine, use them as stored
    return _to_rgb(img)


def photo_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of a photo as :func:`read_photo` returns it, from the header only.

    Raises:
        OSError, SyntaxError, ValueError or ``PIL.Image.DecompressionBombError`` from Pillow
        for a file whose header cannot be read.
    """
    with Image.open(path) as img:
        width, height = img.size
        try:
            orientation = img.getexif().get(_ORIENTATION_TAG, 1)
        except (OSError, SyntaxError, ValueError, TypeError):
            orientation = 1
    return (width, height) if orientation in _QUARTER_TURNS else (height, width)


# EXIF tag 274 (Orientation); values 5..8 turn the picture by 90 degrees (swap H and W).
_ORIENTATION_TAG = 0x0112
_QUARTER_TURNS = (5, 6, 7, 8)


def _to_rgb(img: Image.Image) -> np.ndarray:
    """A decoded Pillow image to a uint8 (H, W, 3) array (see :func:`read_image_rgb`)."""
    if img.mode in _WIDE_INT_MODES:
        gray = _wide_to_uint8(np.asarray(img))
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if img.mode != "RGB":
        # P with transparency: Pillow warns that it goes through RGBA; the result is the
        # palette colours with alpha dropped, which is what we want.
        img = img.convert("RGBA").convert("RGB") if img.mode in ("P", "PA") else img.convert("RGB")
    return np.asarray(img, dtype=np.uint8).copy()


def read_label(path: str | Path) -> np.ndarray:
    """Read a label map PNG as its stored integers.

    Accepts single-channel images: 8-bit grayscale, palette (the indices are the values),
    1-bit, 16-bit. A colour (RGB/RGBA/LA) label file is refused with an explanation, since its
    colours are not class ids.

    Returns:
        integer array (H, W): uint8 for 8-bit files, int32/uint16 for wider ones.
    """
    path = Path(path)
    img = _open(path, "label")
    if img.mode not in _LABEL_MODES:
        raise DataFileError(
            f"label file {path} is a {img.mode} image; a label map must be a single-channel "
            "PNG whose pixel values are class ids (8-bit grayscale, palette or 16-bit). A "
            "colour visualisation (such as Cityscapes' *_gtFine_color.png) cannot be used."
        )
    arr = np.asarray(img)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    return arr
