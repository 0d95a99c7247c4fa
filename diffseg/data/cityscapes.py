"""Cityscapes-27: labelIds 7..33 -> classes 0..26, 0..6 unlabelled, any other value an error."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from diffseg.data.base import (
    _INVALID,
    IGNORE_INDEX,
    LabelledDataset,
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
FIRST_LABEL_ID = 7
#: The largest labelId of the official label set (33, "bicycle"); the files hold 0..33 only.
LAST_LABEL_ID = 33
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
        official_sizes={"val": 500, "train": 2975, "test": 1525},
        folder="cityscapes",
        layout=cityscapes_layout_help,
        prepare=PREPARE_COMMAND + " --from-archives <folder with the zips>",
        protocol={"split": "val"},
    )
)
class Cityscapes27(LabelledDataset):
    """Cityscapes-27 (docs/diffseg.md section 6): every ``*_leftImg8bit.png`` of the split with its
    ``*_gtFine_labelIds.png``; labelIds 7..33 map to 0..26, 0..6 (void classes) to -1
    (ignored). Any other stored value (34..255, or wider) cannot come from the official files,
    so reading it is an error naming the file and the value, as for COCO-Stuff.

    Args:
        root: the dataset folder; None means ``default_data_root() / "cityscapes"``.
        split: "val" (500 images), "train" or "test" (test labels are all unlabelled).
        image_size: model input side (512). label_size: evaluation resolution (320 or 512).
        ids: optional subset of ids (``<city>_<seq>_<frame>``) in the wanted order;
            ``ids_file``: the same read from a text file, one id per line.

    Ids are sorted by city, then file name. Raises FileNotFoundError for a missing root, an
    empty split or a missing label file (naming it).
    """

    name = "cityscapes"
    _allowed_values = "labelIds 0..33 (7..33 are classes, 0..6 unlabelled)"

    def __init__(
        self,
        root: str | Path | None = None,
        split: str = "val",
        image_size: int = 512,
        label_size: int = 512,
        ids: Sequence[str] | None = None,
        ids_file: str | Path | None = None,
        preprocessing: str = "diffseg",
    ) -> None:
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
        mapping = {v: IGNORE_INDEX for v in range(FIRST_LABEL_ID)}
        mapping.update({v: v - FIRST_LABEL_ID for v in range(FIRST_LABEL_ID, LAST_LABEL_ID + 1)})
        super().__init__(
            ids,
            image_paths,
            label_paths,
            # A damaged label must not pass as unlabelled: values outside 0..33 are errors.
            lut=make_lut(mapping, default=_INVALID),
            class_names=CITYSCAPES27_CLASSES,
            image_size=image_size,
            label_size=label_size,
            root=root,
            split=split,
            preprocessing=preprocessing,
            own_ids=own,
        )


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
