"""Pascal VOC 2012 segmentation (val: 1449 images): 20 object classes and the background.

As DiffCut evaluates it: object value v (1..20) is class v - 1, and both the background (0) and
the void borders (255) are the background class, 20 (the last, as in the release).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffseg.data.base import (
    IGNORE_INDEX,
    LabelledDataset,
    choose_ids,
    read_id_list,
    require_files,
)
from diffseg.data.catalog import DatasetInfo, register
from diffseg.data.class_tables import layout_listing, load_class_table

VOC_CLASSES_FILE = "pascal_voc21_classes.json"
VOC_PREPARE_COMMAND = "python datasets/prepare_voc.py --root {root}"
VOID_VALUE = 255


def find_voc_folder(root: Path, year: str) -> Path:
    """The ``VOC<year>`` folder, given itself, ``VOCdevkit`` or the folder holding ``VOCdevkit``.

    When none of them has ``JPEGImages/``, the folder where it is expected (for the message):
    ``root`` if it is named ``VOC<year>``, else ``root/VOCdevkit/VOC<year>`` if ``root`` holds
    ``VOCdevkit``, else ``root/VOC<year>``.
    """
    for folder in (root, root / f"VOC{year}", root / "VOCdevkit" / f"VOC{year}"):
        if (folder / "JPEGImages").is_dir():
            return folder
    if root.name == f"VOC{year}":
        return root
    return (
        root / "VOCdevkit" / f"VOC{year}" if (root / "VOCdevkit").is_dir() else root / f"VOC{year}"
    )


def check_voc_layout(
    folder: Path, required: Sequence[str], what: str, layout_help: str, hints: dict[str, str]
) -> None:
    """Raise one FileNotFoundError naming every missing entry of ``required`` (paths relative
    to ``folder``), what ``folder`` holds, a hint for each folder of ``hints`` that exists
    (a common wrong copy) and how to prepare the data."""
    missing = [name for name in required if not (folder / name).exists()]
    if not missing:
        return
    notes = [note for name, note in hints.items() if (folder / name).exists()]
    raise FileNotFoundError(
        f"{what} not found at {folder}: missing {', '.join(missing)} "
        f"({layout_listing(folder)}).\n" + "".join(f"Note: {n}\n" for n in notes) + layout_help
    )


def voc_layout_help(folder: Path, split: str = "val") -> str:
    """The sentence telling a user what Pascal VOC layout is expected and how to make it."""
    return (
        "expected the official VOCtrainval_11-May-2012.tar layout:\n"
        f"  {folder}/JPEGImages/<id>.jpg\n"
        f"  {folder}/SegmentationClass/<id>.png   (palette PNG: 0 background, 1..20 objects, "
        "255 void)\n"
        f"  {folder}/ImageSets/Segmentation/{split}.txt\n"
        f"Prepare it with: {VOC_PREPARE_COMMAND.format(root=folder.parent)}  (see "
        "datasets/README.md), or point root= or the DIFFSEG_DATA environment variable at an "
        "existing copy (root may be VOC2012/, VOCdevkit/ or the folder holding VOCdevkit/)."
    )


def _voc_names() -> list[str]:
    return load_class_table(VOC_CLASSES_FILE, num_classes=21)[0]["class_names"]


@register(
    DatasetInfo(
        name="voc",
        title="Pascal VOC",
        aliases=("pascal_voc",),
        class_names=_voc_names,
        background_index=20,
        official_sizes={"val": 1449, "train": 1464, "trainval": 2913},
        folder="VOCdevkit",
        layout=lambda root, split="val": voc_layout_help(find_voc_folder(root, "2012"), split),
        prepare=VOC_PREPARE_COMMAND,
        options=("void_as_background",),
        protocol={"split": "val"},
    )
)
class PascalVOC(LabelledDataset):
    """Pascal VOC 2012 segmentation with the background class last (21 classes).

    Layout under ``root`` (default ``<data root>/VOCdevkit``; ``VOC2012/`` itself or the folder
    holding ``VOCdevkit/`` work too): ``VOC2012/JPEGImages/<id>.jpg``,
    ``VOC2012/SegmentationClass/<id>.png`` (palette PNGs, read as their indices) and the ids of
    ``VOC2012/ImageSets/Segmentation/<split>.txt``.

    Stored values: 1..20 -> classes 0..19 (aeroplane .. tvmonitor), 0 -> 20 (background),
    255 (void) -> 20 as the DiffCut release counts it, or -1 (ignored) with
    ``void_as_background=False``; any other value is an error naming the file.

    Args:
        root: see above. split: "val" (1449 images, the benchmark), "train" or "trainval".
        image_size, label_size: model input and evaluation sides.
        ids / ids_file: a subset of ids (or a file of them, one per line) instead of the list.
        void_as_background: count the void borders as background (True, the release) or
            ignore them.
        **kwargs: passed to :class:`LabelledDataset` (preprocessing options).

    Attributes:
        background_index: 20, the class that many-to-one matching merges segments into.
    """

    name = "voc"
    background_index = 20
    _allowed_values = "0 (background), 1..20 (object classes) and 255 (void)"

    def __init__(
        self,
        root: str | Path | None = None,
        split: str = "val",
        image_size: int = 512,
        label_size: int = 512,
        ids: Sequence[str] | None = None,
        ids_file: str | Path | None = None,
        void_as_background: bool = True,
        **kwargs: Any,
    ) -> None:
        folder = find_voc_folder(self.resolve_root(root), "2012")
        layout_help = voc_layout_help(folder, split)
        list_file = Path("ImageSets", "Segmentation", f"{split}.txt")
        check_voc_layout(
            folder,
            ["JPEGImages", "SegmentationClass", str(list_file)],
            "Pascal VOC 2012",
            layout_help,
            {
                "SegmentationClassAug": "SegmentationClassAug holds the SBD-augmented labels, "
                "not the benchmark's: extract SegmentationClass from the official archive.",
            },
        )
        ids, own = choose_ids(ids, ids_file, lambda: read_id_list(folder / list_file))
        image_paths = [folder / "JPEGImages" / f"{i}.jpg" for i in ids]
        label_paths = [folder / "SegmentationClass" / f"{i}.png" for i in ids]
        require_files(
            [*image_paths, *label_paths],
            f"image and label files of Pascal VOC 2012 {split}",
            "complete the dataset.",
            layout_help,
        )

        meta, lut = load_class_table(VOC_CLASSES_FILE, num_classes=21)
        if not void_as_background:
            lut[VOID_VALUE] = IGNORE_INDEX
        super().__init__(
            ids,
            image_paths,
            label_paths,
            lut=lut,
            class_names=meta["class_names"],
            image_size=image_size,
            label_size=label_size,
            root=folder,
            split=split,
            own_ids=own,
            **kwargs,
        )
        self.void_as_background = bool(void_as_background)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "background_index": self.background_index,
            "void_as_background": self.void_as_background,
        }
