"""ADE20K (ADEChallengeData2016, validation: 2000 images): 150 classes, 0 ("other") ignored."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffseg.data.base import (
    _INVALID,
    IGNORE_INDEX,
    LabelledDataset,
    choose_ids,
    make_lut,
    require_files,
)
from diffseg.data.catalog import DatasetInfo, register
from diffseg.data.class_tables import layout_listing, load_class_table

log = logging.getLogger(__name__)

ADE_CLASSES_FILE = "ade20k150_classes.json"
ADE_PREPARE_COMMAND = "python datasets/prepare_ade20k.py --root {root}"
_SPLITS = {
    "val": "validation",
    "validation": "validation",
    "train": "training",
    "training": "training",
}


def ade_layout_help(root: Path, folder: str = "validation") -> str:
    """The sentence telling a user what ADE20K layout is expected and how to make it."""
    return (
        "expected the official ADEChallengeData2016.zip layout:\n"
        f"  {root}/images/{folder}/ADE_val_<n>.jpg\n"
        f"  {root}/annotations/{folder}/ADE_val_<n>.png   (0 other, 1..150 the classes)\n"
        f"Prepare it with: {ADE_PREPARE_COMMAND.format(root=root.parent)}  (see "
        "datasets/README.md), or point root= or the DIFFSEG_DATA environment variable at an "
        "existing copy (root may be ADEChallengeData2016/ or the folder holding it)."
    )


def _ade_names() -> list[str]:
    return load_class_table(ADE_CLASSES_FILE, num_classes=150)[0]["class_names"]


def _ade_layout(root: Path, split: str = "val") -> str:
    inner = root / "ADEChallengeData2016"
    root = inner if not (root / "images").is_dir() and inner.is_dir() else root
    return ade_layout_help(root, _SPLITS.get(split, split))


@register(
    DatasetInfo(
        name="ade20k",
        title="ADE20K",
        aliases=("ade",),
        class_names=_ade_names,
        # the split is recorded as the folder name: validation (the benchmark) or training
        official_sizes={"validation": 2000, "training": 20210},
        folder="ADEChallengeData2016",
        layout=_ade_layout,
        prepare=ADE_PREPARE_COMMAND,
        options=("other_as_class",),
        protocol={"split": "val"},
    )
)
class ADE20K(LabelledDataset):
    """ADE20K scene parsing, 150 classes, no background class.

    Layout under ``root`` (default ``<data root>/ADEChallengeData2016``; the folder holding it
    works too): ``images/<folder>/<id>.jpg`` and ``annotations/<folder>/<id>.png``, every image
    of the folder (sorted by id) with its annotation, ``<folder>`` = ``validation`` or
    ``training``.

    Stored values: 1..150 -> classes 0..149 (wall .. flag), 0 ("other") -> -1 (ignored).

    ``other_as_class=True`` reproduces how the DiffCut release scores ADE20K instead: it reads
    the stored values as classes 0..149 directly, so "other" (0) is scored as class 0 and
    value 150 (flag) is ignored; the class names are then "other" and the first 149.

    Args:
        root: see above. split: "val" (2000 images, the benchmark) or "train" (20210).
        image_size, label_size: model input and evaluation sides.
        ids / ids_file: a subset of ids (or a file of them) in the wanted order.
        **kwargs: passed to :class:`LabelledDataset` (preprocessing options).

    Attributes:
        background_index: None (no background class: no many-to-one matching).
    """

    name = "ade20k"
    background_index = None
    _allowed_values = "0 (other, ignored) and 1..150 (the classes)"

    def __init__(
        self,
        root: str | Path | None = None,
        split: str = "val",
        image_size: int = 512,
        label_size: int = 512,
        ids: Sequence[str] | None = None,
        ids_file: str | Path | None = None,
        other_as_class: bool = False,
        **kwargs: Any,
    ) -> None:
        given = self.resolve_root(root)
        if split not in _SPLITS:
            raise ValueError(f"unknown ADE20K split {split!r}; use 'val' or 'train'")
        folder = _SPLITS[split]
        root_dir = given
        if not (given / "images").is_dir() and (given / "ADEChallengeData2016").is_dir():
            root_dir = given / "ADEChallengeData2016"
        image_dir, label_dir = root_dir / "images" / folder, root_dir / "annotations" / folder
        layout_help = ade_layout_help(root_dir, folder)
        missing = [str(p) for p in (image_dir, label_dir) if not p.is_dir()]
        if missing:
            raise FileNotFoundError(
                f"ADE20K not found at {root_dir}: missing {', '.join(missing)} "
                f"({layout_listing(root_dir)}).\n" + layout_help
            )
        ids, own = choose_ids(ids, ids_file, lambda: self._scan(image_dir))
        image_paths = [image_dir / f"{i}.jpg" for i in ids]
        label_paths = [label_dir / f"{i}.png" for i in ids]
        require_files(
            [*image_paths, *label_paths],
            f"image and label files of ADE20K {folder}",
            "complete the dataset.",
            layout_help,
        )

        meta, lut = load_class_table(ADE_CLASSES_FILE, num_classes=150)
        names = meta["class_names"]
        if other_as_class:
            names = ["other", *names[:149]]
            lut = make_lut({v: v for v in range(150)}, default=_INVALID)
            lut[150] = IGNORE_INDEX
        super().__init__(
            ids,
            image_paths,
            label_paths,
            lut=lut,
            class_names=names,
            image_size=image_size,
            label_size=label_size,
            root=root_dir,
            split=folder,
            own_ids=own,
            **kwargs,
        )
        self.other_as_class = bool(other_as_class)

    @staticmethod
    def _scan(image_dir: Path) -> list[str]:
        """Every ``<id>.jpg`` of the folder, sorted (the release's order)."""
        ids = sorted(p.stem for p in image_dir.glob("*.jpg"))
        if not ids:
            raise FileNotFoundError(
                f"no .jpg images in {image_dir}.\n" + ade_layout_help(image_dir.parents[1])
            )
        return ids

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "background_index": self.background_index,
            "other_as_class": self.other_as_class,
        }
