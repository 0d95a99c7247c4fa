"""COCO-Object: the 2175 curated COCO-Stuff val2017 images, 80 thing classes and the background.

The same files as COCO-Stuff-27 (``images/val2017``, ``annotations/val2017`` stuffthingmaps),
another class map: each thing's stored value (COCO category id - 1) is one of 80 classes, every
stuff value (91..181) and the unlabelled value 255 are the background class, 80 (the last, as
the DiffCut release orders them). The map is ``datasets/coco_object_fine_to_class.json``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffseg.data.base import _INVALID, LabelledDataset, make_lut
from diffseg.data.catalog import DatasetInfo, register
from diffseg.data.cocostuff import PREPARE_COMMAND, CocoStuff27, coco_layout_help
from diffseg.data.paths import metadata_file

COCO_OBJECT_FILE = "coco_object_fine_to_class.json"
NUM_CLASSES = 81
FIRST_STUFF_VALUE, LAST_STUFF_VALUE, UNLABELLED = 91, 181, 255


def load_coco_object_table(path: str | Path | None = None) -> tuple[list[str], np.ndarray]:
    """The 81 class names and the lookup table (stored value -> class) of COCO-Object.

    Thing values absent from ``fine_to_class`` (the 11 COCO ids without annotations) stay
    invalid: no stuffthingmaps file holds them.
    """
    path = Path(path) if path is not None else metadata_file(COCO_OBJECT_FILE)
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    names, table, bg = (
        meta.get("class_names"),
        meta.get("fine_to_class"),
        meta.get("background_class"),
    )
    try:
        mapping = {int(k): int(v) for k, v in table.items()}
    except (AttributeError, TypeError, ValueError):
        mapping = {}
    if (
        not isinstance(names, list)
        or len(names) != NUM_CLASSES
        or bg != NUM_CLASSES - 1
        or len(mapping) != NUM_CLASSES - 1
        or sorted(mapping.values()) != list(range(NUM_CLASSES - 1))
        or not all(0 <= k < FIRST_STUFF_VALUE for k in mapping)
    ):
        raise ValueError(
            f"{path} is not a COCO-Object map: expected 81 'class_names', 'fine_to_class' "
            "(80 thing values 0..90 -> classes 0..79) and 'background_class' 80"
        )
    background = dict.fromkeys([*range(FIRST_STUFF_VALUE, LAST_STUFF_VALUE + 1), UNLABELLED], bg)
    return names, make_lut({**mapping, **background}, default=_INVALID)


@register(
    DatasetInfo(
        name="coco_object",
        title="COCO-Object",
        class_names=lambda: load_coco_object_table()[0],
        background_index=NUM_CLASSES - 1,
        official_sizes={"val": 2175},
        folder="cocostuff",
        layout=lambda root, split="val": coco_layout_help(root, f"{split}2017"),
        prepare=PREPARE_COMMAND,
        options=("curated",),
        protocol={"split": "val", "curated": True},
    )
)
class CocoObject(LabelledDataset):
    """COCO-Object (81 classes, background last) on the COCO-Stuff layout and image lists.

    Args:
        root: the COCO-Stuff folder (default ``<data root>/cocostuff``), prepared by
            ``datasets/prepare_cocostuff.py``.
        split, curated, ids, ids_file: as :class:`CocoStuff27` (default: the 2175 curated val
            ids, the benchmark).
        image_size, label_size: model input and evaluation sides.
        mapping_file: another COCO-Object map JSON (default: the shipped one).
        **kwargs: passed to :class:`LabelledDataset` (preprocessing options).

    Attributes:
        background_index: 80, the class that many-to-one matching merges segments into.

    Raises:
        FileNotFoundError: as :class:`CocoStuff27` (missing layout or files, with the fix).
    """

    name = "coco_object"
    background_index = NUM_CLASSES - 1
    _allowed_values = (
        "the 80 thing values of COCO-Object (category id - 1), 91..181 (stuff) and 255 (unlabelled)"
    )

    def __init__(
        self,
        root: str | Path | None = None,
        split: str = "val",
        curated: bool = True,
        image_size: int = 512,
        label_size: int = 512,
        ids: Sequence[str] | None = None,
        ids_file: str | Path | None = None,
        mapping_file: str | Path | None = None,
        **kwargs: Any,
    ) -> None:
        # The COCO-Stuff loader finds and checks the files; only its class map differs.
        files = CocoStuff27(root, split=split, curated=curated, ids=ids, ids_file=ids_file)
        names, lut = load_coco_object_table(mapping_file)
        #: True when the ids are the shipped curated benchmark list.
        self.curated = files.curated
        super().__init__(
            files.ids,
            files.image_paths,
            files.label_paths,
            lut=lut,
            class_names=names,
            image_size=image_size,
            label_size=label_size,
            root=files.root,
            split=files.split,
            own_ids=files.own_ids,
            **kwargs,
        )

    def is_benchmark_list(self) -> bool:
        """Only the curated list is the benchmark, as for COCO-Stuff-27."""
        return self.curated

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "curated": self.curated,
            "background_index": self.background_index,
        }
