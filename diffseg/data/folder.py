"""A folder of one's own pictures, without labels.

Unlike the benchmarks, a folder run may choose how photos are made square (``crop``), may
skip unreadable files (``skip_unreadable``), and maps its predictions back to each photo's own
size with :func:`diffseg.data.transforms.to_original_size`. :func:`count_unusual_shapes`
counts the photos that a square input serves badly, for a warning once per run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from diffseg.data.base import ImageDataset
from diffseg.data.io import IMAGE_EXTENSIONS, DataFileError, read_image_rgb
from diffseg.data.transforms import check_crop, crop_window, preprocess_image_crop

#: Appended to a read error in a strict folder run.
SKIP_HINT = "To skip unreadable files in a folder run, set dataset.skip_unreadable=true."


def find_images(path: Path) -> list[Path]:
    """Image files (jpg, jpeg, png, webp; any case) under ``path``, nested or flat, sorted by
    relative path. Hidden files and folders (name starting with '.') are left out."""
    files = []
    for p in path.rglob("*"):
        rel = p.relative_to(path)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
            files.append(p)
    return sorted(files, key=lambda p: p.relative_to(path).as_posix())


class ImageFolder(ImageDataset):
    """Every image under a folder (or one image file), preprocessed for the model.

    Items have ``image`` float32 (3, image_size, image_size) in [-1, 1], ``id`` (the path
    relative to the folder without extension, with '/' separators), ``orig_size`` int64 [H, W],
    ``crop`` (the mode, str), ``crop_box`` int64 [top, left, height, width] (see
    :func:`~diffseg.data.transforms.crop_window`), ``skipped`` (bool) and ``error`` (str, ""
    unless skipped); no ``label``. ``class_names`` is empty and ``num_classes`` 0. A
    prediction goes back to the photo's size with
    ``to_original_size(pred, item["orig_size"], item["crop"])``.

    Args:
        path: a folder (searched recursively) or a single image file.
        image_size: model input side (512).
        label_size: accepted for a uniform interface with the benchmarks; unused.
        preprocessing: accepted for the same reason; ``crop`` says how a photo is made square.
        crop: "center" (the paper's centre square, the default), "pad" (pad to a square with
            mid-grey, nothing lost) or "resize" (squash to a square).
        skip_unreadable: False: a corrupt, truncated or empty file raises a
            :class:`~diffseg.data.io.DataFileError`. True: its item is returned with
            ``skipped=True``, the error message in ``error``, a mid-grey ``image``,
            ``orig_size`` [0, 0]; the caller drops it from the batch and reports it.
    """

    name = "folder"

    def __init__(
        self,
        path: str | Path,
        image_size: int = 512,
        label_size: int | None = None,
        crop: str = "center",
        skip_unreadable: bool = False,
        preprocessing: str = "diffseg",
    ) -> None:
        path = Path(path).expanduser()
        if path.is_file():
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise ValueError(f"{path} is not a supported image ({', '.join(IMAGE_EXTENSIONS)})")
            files, root, ids = [path], path.parent, [path.stem]
        elif path.is_dir():
            files, root = find_images(path), path
            if not files:
                raise FileNotFoundError(
                    f"no images ({', '.join(IMAGE_EXTENSIONS)}, any case) found under {path}"
                )
            ids = [f.relative_to(path).with_suffix("").as_posix() for f in files]
            _check_unique_ids(ids, files)
        else:
            raise FileNotFoundError(f"image folder not found: {path}")
        super().__init__(ids, files, image_size=image_size, root=root)
        self.label_size = label_size
        self.crop = check_crop(crop)
        self.skip_unreadable = bool(skip_unreadable)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One item (see the class docstring for the keys)."""
        index = self._check_index(index)
        try:
            rgb = read_image_rgb(self.image_paths[index])
        except DataFileError as err:
            if not self.skip_unreadable:
                raise type(err)(f"{err} {SKIP_HINT}") from None
            return self._skipped_item(index, str(err))
        height, width = rgb.shape[:2]
        return {
            "image": preprocess_image_crop(rgb, self.image_size, self.crop),
            "id": self.ids[index],
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
            "crop": self.crop,
            "crop_box": torch.tensor(crop_window(height, width, self.crop), dtype=torch.int64),
            "skipped": False,
            "error": "",
        }

    def _skipped_item(self, index: int, message: str) -> dict[str, Any]:
        """An item with the keys and shapes of a good one, so the default collate batches it."""
        size = self.image_size
        return {
            "image": torch.zeros(3, size, size, dtype=torch.float32),
            "id": self.ids[index],
            "orig_size": torch.zeros(2, dtype=torch.int64),
            "crop": self.crop,
            "crop_box": torch.zeros(4, dtype=torch.int64),
            "skipped": True,
            "error": message,
        }

    def load_label(self, index: int):
        raise TypeError(f"ImageFolder({self.root}) has no labels")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "crop": self.crop, "skip_unreadable": self.skip_unreadable}


def _check_unique_ids(ids: list[str], files: list[Path]) -> None:
    """Outputs are named by id: two files with one id (a.jpg, a.png) would overwrite."""
    seen: dict[str, Path] = {}
    for i, f in zip(ids, files, strict=True):
        if i in seen:
            raise ValueError(
                f"{seen[i]} and {f} would share the id {i!r} (outputs are named by id); "
                "rename one of them"
            )
        seen[i] = f


_WHAT_CROP_DOES = {
    "center": "lose their sides to the centre crop",
    "pad": "are mostly grey padding",
    "resize": "are squashed",
}


@dataclass
class ShapeCounts:
    """How many images of a dataset a square model input serves badly.

    Attributes:
        total: images looked at.
        elongated: ids whose long side exceeds ``max_aspect`` times the short side.
        tiny: ids whose short side is below ``min_side`` pixels (upscaled a lot).
        unreadable: ids whose header could not be read (they fail or are skipped later).
    """

    total: int
    max_aspect: float
    min_side: int
    elongated: list[str] = field(default_factory=list)
    tiny: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)

    def warning(self, crop: str = "center", image_size: int = 512) -> str | None:
        """One sentence for the run's log, or None when every image is fine."""
        parts = []
        if self.elongated:
            lost = _WHAT_CROP_DOES.get(crop, "are cropped")
            parts.append(
                f"{len(self.elongated)} are more than {self.max_aspect:g}:1 and {lost} "
                f"(e.g. {self.elongated[0]})"
            )
        if self.tiny:
            parts.append(
                f"{len(self.tiny)} have a side under {self.min_side} px and are upscaled to "
                f"{image_size} (e.g. {self.tiny[0]})"
            )
        if not parts:
            return None
        hint = " (dataset.crop=pad keeps whole photos)" if crop == "center" else ""
        return f"of {self.total} images, " + "; ".join(parts) + hint + "."


def count_unusual_shapes(
    dataset: ImageDataset, max_aspect: float = 2.0, min_side: int = 128
) -> ShapeCounts:
    """Count the far-from-square and tiny images of ``dataset`` from their headers only
    (Pillow reads the size without decoding: fast even for thousands of photos)."""
    counts = ShapeCounts(total=len(dataset), max_aspect=max_aspect, min_side=min_side)
    for image_id, path in zip(dataset.ids, dataset.image_paths, strict=True):
        try:
            with Image.open(path) as img:
                width, height = img.size
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            counts.unreadable.append(image_id)
            continue
        short, long = min(height, width), max(height, width)
        if short < min_side:
            counts.tiny.append(image_id)
        if short > 0 and long / short > max_aspect:
            counts.elongated.append(image_id)
    return counts
