"""Cityscapes, read from the ``*_gtFine_labelIds.png`` files, with one of two class lists:

- 27 classes (the default, DiffSeg's and DiffCut's benchmark): labelIds 7..33 -> 0..26,
  0..6 unlabelled;
- 19 classes (``classes=19``, the official training classes that Seg4Diff reports): each
  labelId -> its trainId, every other labelId unlabelled.

Any value outside 0..33 is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffseg.data.base import (
    _INVALID,
    IGNORE_INDEX,
    LabelledDataset,
    check_classes,
    choose_ids,
    make_lut,
    require_files,
)
from diffseg.data.catalog import DatasetInfo, register

#: The 27 classes, labelIds 7..33 in order.
CITYSCAPES27_CLASSES = [
    "road",
    "sidewalk",
    "parking",
    "rail track",
    "building",
    "wall",
    "fence",
    "guard rail",
    "bridge",
    "tunnel",
    "pole",
    "polegroup",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "caravan",
    "trailer",
    "train",
    "motorcycle",
    "bicycle",
]
#: The official 19 training classes: labelId -> trainId (cityscapesscripts' ``labels.py``); the
#: other labelIds of 0..33 have trainId 255 (ignored) there.
TRAIN_IDS = {
    7: 0,  # road
    8: 1,  # sidewalk
    11: 2,  # building
    12: 3,  # wall
    13: 4,  # fence
    17: 5,  # pole
    19: 6,  # traffic light
    20: 7,  # traffic sign
    21: 8,  # vegetation
    22: 9,  # terrain
    23: 10,  # sky
    24: 11,  # person
    25: 12,  # rider
    26: 13,  # car
    27: 14,  # truck
    28: 15,  # bus
    31: 16,  # train
    32: 17,  # motorcycle
    33: 18,  # bicycle
}
FIRST_LABEL_ID = 7
#: The largest labelId of the official label set (33, "bicycle"); the files hold 0..33 only.
LAST_LABEL_ID = 33
#: The 19 training classes in trainId order (the 27-class names of their labelIds).
CITYSCAPES19_CLASSES = [CITYSCAPES27_CLASSES[label_id - FIRST_LABEL_ID] for label_id in TRAIN_IDS]
#: The choices of the ``classes`` option, the default first.
CLASS_COUNTS = (27, 19)
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
PREPARE_COMMAND = "python datasets/prepare_cityscapes.py --root {root}"


def cityscapes_layout_help(root: Path, split: str = "val") -> str:
    """The sentence telling a user what Cityscapes layout is expected and how to make it."""
    return (
        "expected the official Cityscapes layout:\n"
        f"  {root}/leftImg8bit/{split}/<city>/<city>_<seq>_<frame>{IMAGE_SUFFIX}\n"
        f"  {root}/gtFine/{split}/<city>/<city>_<seq>_<frame>{LABEL_SUFFIX}\n"
        "Cityscapes needs a login: download leftImg8bit_trainvaltest.zip and "
        "gtFine_trainvaltest.zip from https://www.cityscapes-dataset.com/downloads/, then run: "
        f"{PREPARE_COMMAND.format(root=root)} --from-archives <folder with the zips>  "
        "(see datasets/README.md)."
    )


@register(
    DatasetInfo(
        name="cityscapes",
        title="Cityscapes-27",
        aliases=("cityscapes27",),
        class_names=tuple(CITYSCAPES27_CLASSES),
        class_counts=CLASS_COUNTS,
        official_sizes={"val": 500, "train": 2975, "test": 1525},
        folder="cityscapes",
        layout=cityscapes_layout_help,
        prepare=PREPARE_COMMAND + " --from-archives <folder with the zips>",
        options=("classes",),
        protocol={"split": "val", "classes": 27},
    )
)
class Cityscapes27(LabelledDataset):
    """Cityscapes (docs/diffseg.md section 6): every ``*_leftImg8bit.png`` of the split with its
    ``*_gtFine_labelIds.png``, as 27 classes (the default) or the official 19.

    ``classes=27``: labelIds 7..33 map to 0..26 (:data:`CITYSCAPES27_CLASSES`), 0..6 (void
    classes) to -1 (ignored). ``classes=19``: the 19 labelIds of :data:`TRAIN_IDS` map to their
    trainIds 0..18 (:data:`CITYSCAPES19_CLASSES`), every other labelId of 0..33 to -1. This is
    what the official ``*_gtFine_labelTrainIds.png`` files hold (the Seg4Diff release reads
    those): cityscapesscripts draws them from the same polygons with each label's trainId in
    place of its id, so the mapped labelIds give the same labels and no other file is needed.
    Any other stored value (34..255, or wider) cannot come from the official files, so reading
    it is an error naming the file and the value, as for COCO-Stuff.

    Args:
        root: the dataset folder; None means ``default_data_root() / "cityscapes"``.
        split: "val" (500 images), "train" or "test" (test labels are all unlabelled).
        image_size: model input side (512). label_size: evaluation resolution (320 or 512).
        ids: optional subset of ids (``<city>_<seq>_<frame>``) in the wanted order;
            ``ids_file``: the same read from a text file, one id per line.
        classes: 27 or 19; anything else is a ValueError.

    Attributes:
        classes: the class list used (27 or 19); ``title`` says it ("Cityscapes-19").

    Ids are sorted by city, then file name. Raises FileNotFoundError for a missing root, an
    empty split or a missing label file (naming it).
    """

    name = "cityscapes"

    def __init__(
        self,
        root: str | Path | None = None,
        split: str = "val",
        image_size: int = 512,
        label_size: int = 512,
        ids: Sequence[str] | None = None,
        ids_file: str | Path | None = None,
        preprocessing: str = "diffseg",
        classes: int = 27,
    ) -> None:
        self.classes = check_classes(classes, CLASS_COUNTS, "Cityscapes")
        root = self.resolve_root(root)
        image_dir, label_dir = root / "leftImg8bit" / split, root / "gtFine" / split
        if not image_dir.is_dir() or not label_dir.is_dir():
            missing = image_dir if not image_dir.is_dir() else label_dir
            raise FileNotFoundError(
                f"Cityscapes not found at {root} ({missing} does not exist).\n"
                + cityscapes_layout_help(root, split)
            )
        found = _scan(image_dir, root, split)
        ids, own = choose_ids(ids, ids_file, lambda: list(found))
        unknown = [i for i in ids if i not in found]
        if unknown:
            raise FileNotFoundError(
                f"{len(unknown)} requested Cityscapes ids have no image in {image_dir}, first: "
                f"{unknown[0]}"
            )
        image_paths = [found[i] for i in ids]
        label_paths = [label_dir / found[i].parent.name / (i + LABEL_SUFFIX) for i in ids]
        require_files(
            label_paths,
            "Cityscapes label files",
            "extract gtFine_trainvaltest.zip.",
            cityscapes_layout_help(root, split),
        )
        lut, names, self._allowed_values = _label_map(self.classes)
        super().__init__(
            ids,
            image_paths,
            label_paths,
            lut=lut,
            class_names=names,
            image_size=image_size,
            label_size=label_size,
            root=root,
            split=split,
            preprocessing=preprocessing,
            own_ids=own,
        )

    @property
    def title(self) -> str:
        return f"Cityscapes-{self.classes}"

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "classes": self.classes}


def _label_map(classes: int) -> tuple[np.ndarray, list[str], str]:
    """(the lookup table from labelIds, the class names, the allowed-values sentence) of the
    27- or 19-class list. Values outside 0..33 are errors: a damaged label must not pass as
    unlabelled."""
    if classes == 27:
        mapping = {v: v - FIRST_LABEL_ID for v in range(FIRST_LABEL_ID, LAST_LABEL_ID + 1)}
        names, allowed = CITYSCAPES27_CLASSES, "labelIds 0..33 (7..33 are classes, 0..6 unlabelled)"
    else:
        mapping, names = dict(TRAIN_IDS), CITYSCAPES19_CLASSES
        allowed = "labelIds 0..33 (the 19 with a trainId are classes, the others unlabelled)"
    full = {v: mapping.get(v, IGNORE_INDEX) for v in range(LAST_LABEL_ID + 1)}
    return make_lut(full, default=_INVALID), list(names), allowed


def _scan(image_dir: Path, root: Path, split: str) -> dict[str, Path]:
    """id -> image of every ``<city>/*_leftImg8bit.png`` of the split, sorted by city then
    file name."""
    files = sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}"), key=lambda p: (p.parent.name, p.name))
    if not files:
        raise FileNotFoundError(
            f"no *{IMAGE_SUFFIX} images in {image_dir}/<city>/.\n"
            + cityscapes_layout_help(root, split)
        )
    return {p.name[: -len(IMAGE_SUFFIX)]: p for p in files}
