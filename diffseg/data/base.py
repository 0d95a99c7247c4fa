"""Shared machinery of the dataset classes: finding the files (root, ids, missing files),
decoding, preprocessing, label mapping, and how much of the benchmark a run covers."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from diffseg.data.catalog import DatasetInfo
from diffseg.data.io import DataFileError, read_image_rgb, read_label
from diffseg.data.paths import default_data_root
from diffseg.data.transforms import (
    PER_IMAGE_SIZE,
    SEG4DIFF_SHORT_SIDE,
    check_preprocessing,
    preprocess_image,
    preprocess_label,
    seg4diff_image,
    seg4diff_label,
)

log = logging.getLogger(__name__)

#: Label value meaning "not labelled": ignored by the metric.
IGNORE_INDEX = -1
#: Lookup-table entry for stored values that a dataset's files must never hold (an error).
INVALID = -2
_INVALID = INVALID
# Lookup tables have 256 entries for 8-bit values plus one shared by every value outside 0..255.
_LUT_SIZE = 257


def check_size(value: Any, what: str) -> int:
    """A positive integer side length, or a ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def check_classes(value: Any, choices: Sequence[int], dataset: str) -> int:
    """The ``classes`` option of a dataset with several class lists: one of ``choices``.

    Raises:
        ValueError: any other value (booleans and floats too), naming it and the choices.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value not in choices:
        shown = " or ".join(str(c) for c in choices)
        raise ValueError(f"{dataset}: classes={value!r} is not offered; choose {shown}.")
    return int(value)


def read_id_list(path: str | Path) -> list[str]:
    """Image ids, one per line (blank lines and surrounding spaces ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image id list not found: {path}")
    ids = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    ids = [i for i in ids if i]
    if not ids:
        raise ValueError(f"image id list {path} is empty")
    return ids


def choose_ids(
    ids: Sequence[str] | None,
    ids_file: str | Path | None,
    default: Callable[[], Sequence[str]],
) -> tuple[list[str], bool]:
    """The ids a dataset uses: ``ids``, those of ``ids_file``, or ``default()`` (the split's
    own list, called only when needed).

    Returns:
        (the ids as strings, whether the user chose them: a list of their own is never
        taken for the benchmark, and never reported as an incomplete one either).

    Raises:
        ValueError: both ``ids`` and ``ids_file`` given, or no id at all.
    """
    if ids is not None and ids_file is not None:
        raise ValueError("pass ids= or ids_file=, not both")
    own = ids is not None or ids_file is not None
    chosen = read_id_list(ids_file) if ids_file is not None else ids if own else default()
    out = [str(i) for i in chosen]
    if not out:
        raise ValueError("no image ids given")
    return out, own


def require_files(paths: Sequence[Path], what: str, fix: str, layout_help: str = "") -> None:
    """Every file must exist: nothing is skipped silently.

    Raises:
        FileNotFoundError: "<n> of the <len(paths)> <what> are missing, first: <path>. Nothing is
            skipped: <fix>" and the layout help on the next line.
    """
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of the {len(paths)} {what} are missing, first: {missing[0]}. Nothing "
            f"is skipped: {fix}" + (f"\n{layout_help}" if layout_help else "")
        )


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
    #: The catalog entry (set by :func:`diffseg.data.catalog.register`).
    info: ClassVar[DatasetInfo | None] = None

    def __init__(
        self,
        ids: Sequence[str],
        image_paths: Sequence[Path],
        image_size: int = 512,
        root: Path | None = None,
        split: str | None = None,
        preprocessing: str = "diffseg",
        own_ids: bool = False,
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
        #: True when the user chose the ids (``ids=`` / ``ids_file=``), not the split's list.
        self.own_ids = bool(own_ids)
        note = self.coverage_note()
        if note:  # a partial copy is said when it is opened, not only in the results
            log.warning("%s", note)

    @classmethod
    def resolve_root(cls, root: str | Path | None) -> Path:
        """``root`` expanded, or ``<data root>/<catalog folder>`` when None."""
        if root is not None:
            return Path(root).expanduser()
        folder = cls.info.folder if cls.info is not None else None
        if folder is None:
            raise ValueError(f"{cls.__name__} needs a root folder")
        return default_data_root() / folder

    @property
    def title(self) -> str:
        """The name printed in messages ("Cityscapes-27"): the catalog's title, or ``name``."""
        return self.info.title if self.info is not None else self.name

    def is_benchmark_list(self) -> bool:
        """Whether the ids are the benchmark's own list (not the user's, not a scan that a
        subclass marks as a subset, such as COCO-Stuff's ``curated=False``)."""
        return not self.own_ids

    def benchmark_coverage(self, ids: Sequence[str] | None = None) -> dict[str, Any]:
        """How much of the benchmark a run on ``ids`` (default: every image) covers.

        Returns:
            ``full_benchmark``: the run covers every image of the benchmark's split (also True
            for a dataset with no official size, such as a folder, when every image runs);
            ``images_found``: the images this copy lists; ``images_expected``: the official
            count, None for the user's own id list or a split with no official size;
            ``incomplete``: fewer images found than expected (a partial copy).
        """
        run = len(self) if ids is None else len(ids)
        benchmark = self.is_benchmark_list()
        expected = self.info.official_size(self.split) if self.info and benchmark else None
        found = len(self)
        full = benchmark and run == found and (expected is None or found == expected)
        return {
            "full_benchmark": bool(full),
            "images_found": found,
            "images_expected": expected,
            "incomplete": expected is not None and found < expected,
        }

    def coverage_note(self, ids: Sequence[str] | None = None) -> str | None:
        """One sentence for the log when the copy is short of the benchmark, else None."""
        cov = self.benchmark_coverage(ids)
        if not cov["incomplete"]:
            return None
        title = self.title
        return (
            f"{title} {self.split} at {self.root}: {cov['images_found']} of the benchmark's "
            f"{cov['images_expected']} images found; results are marked NOT the full benchmark"
        )

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
            ``orig_size`` int64 tensor [H, W] (the stored size, before the crop); with
            ``preprocessing=seg4diff`` also ``eval_size`` (see :meth:`model_input`).
        """
        index = self._check_index(index)
        rgb = read_image_rgb(self.image_paths[index])
        return {
            **self.model_input(rgb),
            "id": self.ids[index],
            "orig_size": torch.tensor(rgb.shape[:2], dtype=torch.int64),
        }

    @property
    def per_image_size(self) -> bool:
        """Whether predictions keep each image's aspect (``preprocessing=seg4diff``): items then
        carry ``eval_size`` and labels are not square."""
        return self.preprocessing in PER_IMAGE_SIZE

    @property
    def eval_side(self) -> int:
        """The side the evaluation size follows: the label side (the shortest side with
        ``preprocessing=seg4diff``); 640 for a dataset without one."""
        return getattr(self, "label_size", None) or SEG4DIFF_SHORT_SIDE

    def model_input(self, rgb) -> dict[str, torch.Tensor]:
        """The item fields made from the decoded image (H, W, 3) uint8: ``image`` float32
        (3, image_size, image_size) in [-1, 1], and with a per-image size (``seg4diff``)
        ``eval_size`` int64 [h', w'], the size of the prediction and the label."""
        if not self.per_image_size:
            return {"image": preprocess_image(rgb, self.image_size, self.preprocessing)}
        image, size = seg4diff_image(rgb, self.eval_side, self.image_size)
        return {"image": image, "eval_size": torch.tensor(size, dtype=torch.int64)}

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
        own_ids: bool = False,
    ) -> None:
        super().__init__(
            ids, image_paths, image_size=image_size, root=root, split=split,
            preprocessing=preprocessing, own_ids=own_ids,
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
        if self.per_image_size:
            label = seg4diff_label(mapped, self.label_size)
        else:
            label = preprocess_label(mapped, self.label_size, self.preprocessing)
        return torch.from_numpy(label.astype(np.int64))

    def load_label(self, index: int) -> torch.Tensor:
        """The evaluation label of one image, without decoding the image.

        Returns:
            int64 tensor (label_size, label_size) (``seg4diff``: (h', w')): class indices
            0..num_classes-1, -1 = ignore.
        """
        index = self._check_index(index)
        path = self.label_paths[index]
        return self._label_tensor(read_label(path), path)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One item.

        Returns:
            dict with ``image`` float32 (3, image_size, image_size) in [-1, 1], ``label`` int64
            (label_size, label_size) (-1 = ignore), ``id`` str and ``orig_size`` int64 [H, W];
            with ``preprocessing=seg4diff`` the label is (h', w') and ``eval_size`` [h', w'].
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
            **self.model_input(rgb),
            "label": self._label_tensor(raw, label_path),
            "id": self.ids[index],
            "orig_size": torch.tensor(rgb.shape[:2], dtype=torch.int64),
        }

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "label_size": self.label_size}
