"""Shared machinery of the dataset classes: decoding, preprocessing and label mapping."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from diffseg.data.io import DataFileError, read_image_rgb, read_label
from diffseg.data.transforms import check_preprocessing, preprocess_image, preprocess_label

#: Label value meaning "not labelled": ignored by the metric.
IGNORE_INDEX = -1
# Marks stored values that a dataset's files must never hold (a lookup-table entry).
_INVALID = -2
# Lookup tables have 256 entries for 8-bit values plus one shared by every value outside 0..255.
_LUT_SIZE = 257


def check_size(value: Any, what: str) -> int:
    """A positive integer side length, or a ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def make_lut(mapping: dict[int, int], default: int) -> np.ndarray:
    """A lookup table from stored label values to class indices.

    Args:
        mapping: stored value (0..255) -> class index (0..C-1) or IGNORE_INDEX.
        default: what every other value becomes: IGNORE_INDEX, or -2 to make it an error.

    Returns:
        int16 array (257,): entry v for v in 0..255, entry 256 for any value outside 0..255.
    """
    lut = np.full(_LUT_SIZE, default, dtype=np.int16)
    for value, target in mapping.items():
        lut[value] = target
    return lut


class ImageDataset(Dataset):
    """A list of image files, preprocessed as docs/diffseg.md section 1 (no labels).

    Attributes:
        ids: one string per image (file stem or relative path without extension).
        image_paths: the image files, in ``ids`` order.
        image_size: side of the model input (512 for Stable Diffusion v1).
        class_names: names of the classes (empty without labels); ``num_classes`` their count.
        has_labels: whether items carry a ``label``.
    """

    name = "images"
    has_labels = False

    def __init__(
        self,
        ids: Sequence[str],
        image_paths: Sequence[Path],
        image_size: int = 512,
        root: Path | None = None,
        split: str | None = None,
        preprocessing: str = "diffseg",
    ) -> None:
        if len(ids) != len(image_paths):
            raise ValueError(f"{len(ids)} ids for {len(image_paths)} images")
        self.ids = [str(i) for i in ids]
        self.image_paths = [Path(p) for p in image_paths]
        self.image_size = check_size(image_size, "image_size")
        self.root = Path(root) if root is not None else None
        self.split = split
        self.preprocessing = check_preprocessing(preprocessing)
        self.class_names: list[str] = []

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.ids)

    def _check_index(self, index: int) -> int:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        return index % len(self)

    def load_rgb(self, index: int) -> np.ndarray:
        """The stored image as uint8 RGB (H, W, 3), no crop or resize (for display)."""
        return read_image_rgb(self.image_paths[self._check_index(index)])

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One item.

        Returns:
            dict with ``image`` float32 (3, image_size, image_size) in [-1, 1], ``id`` str and
            ``orig_size`` int64 tensor [H, W] (the stored size, before the crop).
        """
        index = self._check_index(index)
        rgb = read_image_rgb(self.image_paths[index])
        return {
            "image": preprocess_image(rgb, self.image_size, self.preprocessing),
            "id": self.ids[index],
            "orig_size": torch.tensor(rgb.shape[:2], dtype=torch.int64),
        }

    def describe(self) -> dict[str, Any]:
        """JSON-able summary for logs and results."""
        return {
            "name": self.name,
            "root": None if self.root is None else str(self.root),
            "split": self.split,
            "num_images": len(self),
            "image_size": self.image_size,
            "preprocessing": self.preprocessing,
            "num_classes": self.num_classes,
        }

    def __repr__(self) -> str:
        desc = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "name")
        return f"{type(self).__name__}({desc})"


class LabelledDataset(ImageDataset):
    """Images with label maps; stored label values go through a lookup table to class indices.

    Subclasses set ``class_names``, ``label_paths``, ``_lut`` (see :func:`make_lut`) and
    ``_allowed_values`` (a sentence naming the values the files may hold).

    Attributes:
        label_paths: the label files, in ``ids`` order.
        label_size: side of the evaluation resolution (320 or 512 in the paper).
    """

    has_labels = True
    _allowed_values = ""

    def __init__(
        self,
        ids: Sequence[str],
        image_paths: Sequence[Path],
        label_paths: Sequence[Path],
        lut: np.ndarray,
        class_names: Sequence[str],
        image_size: int = 512,
        label_size: int = 512,
        root: Path | None = None,
        split: str | None = None,
        preprocessing: str = "diffseg",
    ) -> None:
        super().__init__(
            ids, image_paths, image_size=image_size, root=root, split=split,
            preprocessing=preprocessing,
        )  # fmt: skip
        if len(label_paths) != len(self.ids):
            raise ValueError(f"{len(label_paths)} label files for {len(self.ids)} images")
        self.label_paths = [Path(p) for p in label_paths]
        self.label_size = check_size(label_size, "label_size")
        self.class_names = list(class_names)
        self._lut = lut

    def map_label(self, raw: np.ndarray, path: Path | str = "<array>") -> np.ndarray:
        """Stored label values (H, W) to class indices (H, W) int16, -1 = ignore.

        Raises:
            ValueError: naming the file and the value when a value is outside the dataset's set.
        """
        if raw.dtype == np.uint8:
            mapped = self._lut[raw]
        else:
            wide = raw.astype(np.int64)
            mapped = self._lut[np.where((wide >= 0) & (wide < 256), wide, 256)]
        bad = mapped == _INVALID
        if bad.any():
            values = np.unique(raw[bad])
            row, col = (int(v[0]) for v in np.nonzero(bad))
            shown = ", ".join(str(int(v)) for v in values[:10]) + (
                " ..." if len(values) > 10 else ""
            )
            raise DataFileError(
                f"label file {path} holds value {int(raw[row, col])} (at row {row}, column "
                f"{col}; {int(bad.sum())} pixels with values {shown}) outside the "
                f"{self.name} label set: {self._allowed_values}. The file is not a label map of "
                "this dataset or is damaged; re-extract it."
            )
        return mapped

    def _label_tensor(self, raw: np.ndarray, path: Path) -> torch.Tensor:
        mapped = self.map_label(raw, path)
        label = preprocess_label(mapped, self.label_size, self.preprocessing)
        return torch.from_numpy(label.astype(np.int64))

    def load_label(self, index: int) -> torch.Tensor:
        """The evaluation label of one image, without decoding the image.

        Returns:
            int64 tensor (label_size, label_size): class indices 0..num_classes-1, -1 = ignore.
        """
        index = self._check_index(index)
        path = self.label_paths[index]
        return self._label_tensor(read_label(path), path)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One item.

        Returns:
            dict with ``image`` float32 (3, image_size, image_size) in [-1, 1], ``label`` int64
            (label_size, label_size) (-1 = ignore), ``id`` str and ``orig_size`` int64 [H, W].
        """
        index = self._check_index(index)
        image_path, label_path = self.image_paths[index], self.label_paths[index]
        rgb = read_image_rgb(image_path)
        raw = read_label(label_path)
        if raw.shape != rgb.shape[:2]:
            raise DataFileError(
                f"label file {label_path} is {raw.shape[0]}x{raw.shape[1]} but its image "
                f"{image_path} is {rgb.shape[0]}x{rgb.shape[1]} (height x width); they must "
                "match pixel for pixel."
            )
        return {
            "image": preprocess_image(rgb, self.image_size, self.preprocessing),
            "label": self._label_tensor(raw, label_path),
            "id": self.ids[index],
            "orig_size": torch.tensor(rgb.shape[:2], dtype=torch.int64),
        }

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "label_size": self.label_size}
