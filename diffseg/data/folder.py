"""A folder of one's own pictures, without labels.

Unlike the benchmarks, a folder run may choose how photos are made square (``crop``), may
skip unreadable files (``skip_unreadable``), and maps its predictions back to each photo's own
size with :func:`diffseg.data.transforms.to_original_size`. Photos are read as seen: the EXIF
orientation is applied (:func:`diffseg.data.io.read_photo`). :func:`count_unusual_shapes` counts
the photos that a square input serves badly (how many lose how much to the centre crop, which
are tiny), for a warning once per run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffseg.data.base import ImageDataset
from diffseg.data.catalog import DatasetInfo, register
from diffseg.data.io import IMAGE_EXTENSIONS, DataFileError, photo_size, read_photo
from diffseg.data.transforms import (
    PER_IMAGE_SIZE,
    check_crop,
    crop_window,
    preprocess_image_crop,
)

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


def _folder_layout(root: Path, split: str = "") -> str:
    return (
        f"expected image files ({', '.join(IMAGE_EXTENSIONS)}, any case) under {root}, "
        "nested or flat; hidden files and folders are left out."
    )


@register(
    DatasetInfo(
        name="folder",
        title="folder",
        labelled=False,
        layout=_folder_layout,
        options=("crop", "skip_unreadable"),
        protocol={"crop": "center", "skip_unreadable": False},
    )
)
class ImageFolder(ImageDataset):
    """Every image under a folder (or one image file), preprocessed for the model.

    Photos are read as seen: the EXIF orientation tag is applied, so a phone photo taken
    upright is segmented and saved upright (``orig_size`` is the upright size).

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
        label_size: the shortest side of the predictions with ``preprocessing="seg4diff"``
            (640 when None); unused otherwise (predictions are square, then mapped back).
        preprocessing: ``"seg4diff"`` runs Seg4Diff's chain (the whole photo, no crop;
            ``crop`` is then ``"resize"``, and items carry ``eval_size``); any other value
            leaves it to ``crop`` how a photo is made square.
        crop: "center" (the paper's centre square, the default), "pad" (pad to a square with
            mid-grey, nothing lost) or "resize" (squash to a square).
        skip_unreadable: False: a corrupt, truncated or empty file raises a
            :class:`~diffseg.data.io.DataFileError`. True: its item is returned with
            ``skipped=True``, the error message in ``error``, a mid-grey ``image``,
            ``orig_size`` [0, 0]; the caller drops it from the batch and reports it.
        root: another name for ``path`` (the benchmarks' argument); pass one of the two.
    """

    name = "folder"

    def __init__(
        self,
        path: str | Path | None = None,
        image_size: int = 512,
        label_size: int | None = None,
        crop: str = "center",
        skip_unreadable: bool = False,
        preprocessing: str = "diffseg",
        root: str | Path | None = None,
    ) -> None:
        if (path is None) == (root is None):
            raise ValueError("pass path= or root= for the folder dataset (one of them)")
        path = Path(path if path is not None else root).expanduser()
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
        # Photos follow ``crop`` under the square protocols (recorded as "diffseg", as always).
        own = preprocessing if preprocessing in PER_IMAGE_SIZE else "diffseg"
        super().__init__(ids, files, image_size=image_size, root=root, preprocessing=own)
        self.label_size = label_size
        # Seg4Diff's chain keeps the whole photo (stretched, not cropped): a prediction maps back
        # onto the photo as a "resize" one does.
        self.crop = "resize" if self.per_image_size else check_crop(crop)
        self.skip_unreadable = bool(skip_unreadable)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One item (see the class docstring for the keys)."""
        index = self._check_index(index)
        try:
            rgb = read_photo(self.image_paths[index])
        except DataFileError as err:
            if not self.skip_unreadable:
                raise type(err)(f"{err} {SKIP_HINT}") from None
            return self._skipped_item(index, str(err))
        height, width = rgb.shape[:2]
        if self.per_image_size:
            model_input = self.model_input(rgb)
        else:
            model_input = {"image": preprocess_image_crop(rgb, self.image_size, self.crop)}
        return {
            **model_input,
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
        extra = {"eval_size": torch.ones(2, dtype=torch.int64)} if self.per_image_size else {}
        return {
            "image": torch.zeros(3, size, size, dtype=torch.float32),
            **extra,
            "id": self.ids[index],
            "orig_size": torch.zeros(2, dtype=torch.int64),
            "crop": self.crop,
            "crop_box": torch.zeros(4, dtype=torch.int64),
            "skipped": True,
            "error": message,
        }

    def load_rgb(self, index: int) -> np.ndarray:
        """The photo as seen (EXIF orientation applied), uint8 RGB (H, W, 3), for display."""
        return read_photo(self.image_paths[self._check_index(index)])

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


_WHAT_SQUARING_DOES = {"pad": "are mostly grey padding", "resize": "are squashed"}


@dataclass
class ShapeCounts:
    """How many images of a dataset a square model input serves badly.

    Attributes:
        total: images looked at.
        elongated: ids whose long side exceeds ``max_aspect`` times the short side.
        tiny: ids whose short side is below ``min_side`` pixels (upscaled a lot).
        unreadable: ids whose header could not be read (they fail or are skipped later).
        crop_loss: id -> fraction of the photo's area outside the centre square
            (1 - short / long), for every photo that is not square.
    """

    total: int
    max_aspect: float
    min_side: int
    elongated: list[str] = field(default_factory=list)
    tiny: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    crop_loss: dict[str, float] = field(default_factory=dict)

    def warning(self, crop: str = "center", image_size: int = 512) -> str | None:
        """One sentence for the run's log, or None when every image is fine.

        With ``crop="center"``: how many photos lose part of their area to the centre crop and
        the largest share lost, e.g. "12 of 40 images lose up to 33% of their area to the
        centre crop (most: pano); dataset.crop=pad keeps them whole".
        """
        parts = []
        if crop == "center" and self.crop_loss:
            worst = max(self.crop_loss, key=self.crop_loss.get)
            parts.append(
                f"{len(self.crop_loss)} of {self.total} images lose up to "
                f"{self.crop_loss[worst]:.0%} of their area to the centre crop (most: {worst}); "
                "dataset.crop=pad keeps them whole"
            )
        elif crop != "center" and self.elongated:
            parts.append(
                f"{len(self.elongated)} of {self.total} images are more than "
                f"{self.max_aspect:g}:1 and {_WHAT_SQUARING_DOES.get(crop, 'are cropped')} "
                f"(e.g. {self.elongated[0]})"
            )
        if self.tiny:
            parts.append(
                f"{len(self.tiny)} of {self.total} images have a side under {self.min_side} px "
                f"and are upscaled to {image_size} (e.g. {self.tiny[0]})"
            )
        return "; ".join(parts) + "." if parts else None


def count_unusual_shapes(
    dataset: ImageDataset, max_aspect: float = 2.0, min_side: int = 128
) -> ShapeCounts:
    """Count the non-square, far-from-square and tiny images of ``dataset`` from their headers
    only (Pillow reads the size without decoding: fast even for thousands of photos)."""
    counts = ShapeCounts(total=len(dataset), max_aspect=max_aspect, min_side=min_side)
    for image_id, path in zip(dataset.ids, dataset.image_paths, strict=True):
        try:
            height, width = photo_size(path)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            counts.unreadable.append(image_id)
            continue
        short, long = min(height, width), max(height, width)
        if short < min_side:
            counts.tiny.append(image_id)
        if short > 0 and long / short > max_aspect:
            counts.elongated.append(image_id)
        if 0 < short < long:
            counts.crop_loss[image_id] = 1.0 - short / long
    return counts
