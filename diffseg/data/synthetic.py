"""A SeeDiff dataset read back: generated images and their class masks (Pascal VOC layout).

The folder is what ``python generate.py`` writes (see diffseg/seediff/writer.py)::

    <root>/JPEGImages/<id>.jpg, <root>/SegmentationClass/<id>.png,
    <root>/ImageSets/Segmentation/train.txt, <root>/classes.json, <root>/index.jsonl

Label value 0 is the background and ``k + 1`` class ``k`` of the generation's class list, so
``class_names`` is ``["background", <class 0>, ...]`` and the stored values are the class indices
(255, VOC's "void", is ignored should an edited mask hold it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from diffseg.data.base import (
    IGNORE_INDEX,
    LabelledDataset,
    choose_ids,
    make_lut,
    read_id_list,
    require_files,
)
from diffseg.data.catalog import DatasetInfo, register

__all__ = ["SyntheticVOC"]

VOID_VALUE = 255


def _synthetic_layout(root: Path, split: str = "train") -> str:
    return (
        "expected what generate.py writes:\n"
        f"  {root}/JPEGImages/<id>.jpg, {root}/SegmentationClass/<id>.png,\n"
        f"  {root}/ImageSets/Segmentation/{split}.txt, {root}/classes.json"
    )


@register(
    DatasetInfo(
        name="synthetic_voc",
        title="SeeDiff generated",
        aliases=("seediff",),
        layout=_synthetic_layout,
        prepare="python generate.py output_dir={root}",
        protocol={"split": "train"},
    )
)
class SyntheticVOC(LabelledDataset):
    """The images and masks of a generated SeeDiff dataset.

    Args:
        root: the dataset folder (``output_dir`` of ``generate.py``).
        split: the ``ImageSets/Segmentation/<split>.txt`` list (``train``).
        image_size, label_size: model input and label sides (preprocessing: docs/diffseg.md
            section 1).
        ids / ids_file: use these ids (or those of a file, one per line) instead of the list.

    Items: ``image`` float32 (3, image_size, image_size) in [-1, 1], ``label`` int64
    (label_size, label_size) with 0 = background, k + 1 = class k, -1 = ignore; ``id``; ``orig_size``.
    ``records[id]`` holds the id's line of ``index.jsonl`` (class, prompt, seed, mask area, ...).
    """

    name = "seediff"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        image_size: int = 512,
        label_size: int = 512,
        ids: Sequence[str] | None = None,
        ids_file: str | Path | None = None,
    ) -> None:
        root = self.resolve_root(root)
        classes_file = root / "classes.json"
        list_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        for needed in (classes_file, list_file):
            if not needed.is_file():
                raise FileNotFoundError(
                    f"{needed} not found: {root} is not a generated SeeDiff dataset (or its "
                    "generation has not finished; run the same generate.py command again)"
                )
        class_names = json.loads(classes_file.read_text(encoding="utf-8"))
        ids, own = choose_ids(ids, ids_file, lambda: read_id_list(list_file))
        mapping = {v: v for v in range(len(class_names))}
        mapping[VOID_VALUE] = IGNORE_INDEX
        lut = make_lut(mapping, default=-2)  # any other value is an error naming the file
        super().__init__(
            ids,
            [root / "JPEGImages" / f"{i}.jpg" for i in ids],
            [root / "SegmentationClass" / f"{i}.png" for i in ids],
            lut,
            class_names,
            image_size=image_size,
            label_size=label_size,
            root=root,
            split=split,
            own_ids=own,
        )
        self._allowed_values = f"0..{len(class_names) - 1} and {VOID_VALUE} (void)"
        require_files(
            [*self.image_paths, *self.label_paths],
            f"listed files of {root}",
            "generate them again (run the same generate.py command).",
        )
        self.records = self._read_index(root / "index.jsonl")

    @staticmethod
    def _read_index(path: Path) -> dict[str, dict]:
        if not path.is_file():
            return {}
        lines = path.read_text(encoding="utf-8").splitlines()
        return {r["id"]: r for r in (json.loads(line) for line in lines if line.strip())}
