"""Pascal Context (val: 5105 VOC2010 images): 59 classes and the background.

The labels are 60-label PNGs written once by ``datasets/prepare_context.py`` from the official
459-category annotation: 0 = background (unlabelled and every category outside the 59),
k = 1..59 the k-th class. The loader maps k to class k - 1 and 0 to the background class, 59
(the last, as the DiffCut release orders them), or, with ``classes=59`` (the 59-class
benchmark, "PC-59"), ignores the background.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffseg.data.base import (
    IGNORE_INDEX,
    LabelledDataset,
    check_classes,
    choose_ids,
    read_id_list,
    require_files,
)
from diffseg.data.catalog import DatasetInfo, register
from diffseg.data.class_tables import load_class_table
from diffseg.data.voc import check_voc_layout, find_voc_folder

CONTEXT_CLASSES_FILE = "pascal_context59_classes.json"
CONTEXT_PREPARE_COMMAND = "python datasets/prepare_context.py --root {root}"
LABEL_DIR = "SegmentationClassContext"
LIST_DIR = Path("ImageSets", "SegmentationContext")
#: The choices of the ``classes`` option, the default first.
CLASS_COUNTS = (60, 59)


def context_layout_help(folder: Path, split: str = "val") -> str:
    """The sentence telling a user what Pascal Context layout is expected and how to make it."""
    return (
        "expected the VOC2010 images with the converted Pascal Context labels:\n"
        f"  {folder}/JPEGImages/<id>.jpg\n"
        f"  {folder}/{LABEL_DIR}/<id>.png   (0 background, 1..59 the classes)\n"
        f"  {folder}/{LIST_DIR.as_posix()}/{split}.txt\n"
        "The labels are converted once from the official annotation (trainval.tar.gz) by: "
        f"{CONTEXT_PREPARE_COMMAND.format(root=folder.parent)}  (see datasets/README.md). "
        "A copy prepared by mmsegmentation's pascal_context converter has this layout too."
    )


def _context_names() -> list[str]:
    return load_class_table(CONTEXT_CLASSES_FILE, num_classes=60)[0]["class_names"]


@register(
    DatasetInfo(
        name="context",
        title="Pascal Context",
        aliases=("pascal_context",),
        class_names=_context_names,
        background_index=59,
        class_counts=CLASS_COUNTS,
        official_sizes={"val": 5105, "train": 4998},
        folder="VOCdevkit",
        layout=lambda root, split="val": context_layout_help(find_voc_folder(root, "2010"), split),
        prepare=CONTEXT_PREPARE_COMMAND,
        options=("classes",),
        protocol={"split": "val", "classes": 60},
    )
)
class PascalContext(LabelledDataset):
    """Pascal Context, 59 classes + background (60 classes, background last), or the 59 classes
    alone (``classes=59``).

    Layout under ``root`` (default ``<data root>/VOCdevkit``; ``VOC2010/`` itself or the folder
    holding ``VOCdevkit/`` work too): ``VOC2010/JPEGImages/<id>.jpg``,
    ``VOC2010/SegmentationClassContext/<id>.png`` and the ids of
    ``VOC2010/ImageSets/SegmentationContext/<split>.txt``.

    Stored values: 1..59 -> classes 0..58 (aeroplane .. wood), 0 -> 59 (background); with
    ``classes=59``, 0 -> -1 (ignored) and the class names are the first 59. Any other value is
    an error naming the file.

    Args:
        root: see above. split: "val" (5105 images, the benchmark) or "train" (4998).
        image_size, label_size: model input and evaluation sides.
        ids / ids_file: a subset of ids (or a file of them) instead of the split list.
        classes: 60 (the default, DiffCut's benchmark) or 59; anything else is a ValueError.
        **kwargs: passed to :class:`LabelledDataset` (preprocessing options).

    Attributes:
        background_index: 59, the class that many-to-one matching merges segments into; None
            with ``classes=59`` (no background class: plain one-to-one matching).
        classes: the class list used (60 or 59).
    """

    name = "context"
    background_index = 59
    _allowed_values = "0 (background) and 1..59 (the classes)"

    def __init__(
        self,
        root: str | Path | None = None,
        split: str = "val",
        image_size: int = 512,
        label_size: int = 512,
        ids: Sequence[str] | None = None,
        ids_file: str | Path | None = None,
        classes: int = 60,
        **kwargs: Any,
    ) -> None:
        self.classes = check_classes(classes, CLASS_COUNTS, "Pascal Context")
        folder = find_voc_folder(self.resolve_root(root), "2010")
        layout_help = context_layout_help(folder, split)
        list_file = LIST_DIR / f"{split}.txt"
        check_voc_layout(
            folder,
            ["JPEGImages", LABEL_DIR, str(list_file)],
            "Pascal Context",
            layout_help,
            {
                "trainval": "trainval/ holds the 459-category .mat annotation: convert it with "
                "the command below.",
                "SegmentationClass": "SegmentationClass/ holds VOC's own 20-class labels, not "
                "Pascal Context's.",
            },
        )
        ids, own = choose_ids(ids, ids_file, lambda: read_id_list(folder / list_file))
        image_paths = [folder / "JPEGImages" / f"{i}.jpg" for i in ids]
        label_paths = [folder / LABEL_DIR / f"{i}.png" for i in ids]
        require_files(
            [*image_paths, *label_paths],
            f"image and label files of Pascal Context {split}",
            "complete the dataset.",
            layout_help,
        )

        meta, lut = load_class_table(CONTEXT_CLASSES_FILE, num_classes=60)
        names = meta["class_names"][: self.classes]
        if self.classes == 59:  # the background (stored 0) is not a class: ignored
            lut[0] = IGNORE_INDEX
            self.background_index = None
        super().__init__(
            ids,
            image_paths,
            label_paths,
            lut=lut,
            class_names=names,
            image_size=image_size,
            label_size=label_size,
            root=folder,
            split=split,
            own_ids=own,
            **kwargs,
        )

    @property
    def title(self) -> str:
        return super().title if self.classes == 60 else "Pascal Context-59"

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "background_index": self.background_index,
            "classes": self.classes,
        }
