"""COCO-Stuff-27: COCO val2017 with the official stuffthingmaps, 182 fine -> 27 coarse classes."""

from __future__ import annotations

import json
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
    read_id_list,
    require_files,
)
from diffseg.data.catalog import DatasetInfo, register
from diffseg.data.paths import metadata_file

log = logging.getLogger(__name__)

CURATED_VAL_FILE = "coco_stuff27_val_curated.txt"
FINE_TO_COARSE_FILE = "coco_stuff27_fine_to_coarse.json"
PREPARE_COMMAND = "python datasets/prepare_cocostuff.py --root {root}"
# How to evaluate a partial copy, with the options as typed for each entry point (the curated
# list is checked before any limit=, so limit= alone does not help).
SUBSET_HELP = (
    ", or evaluate the images you have: with run.py add dataset.curated=false (every labelled "
    "image present) or dataset.ids_file=<file with one id per line>; with python -m eval.score "
    "add --no-curated or --ids-file <file>; from Python pass curated=False or ids_file=. "
    "Such a subset is not the 2175-image benchmark."
)
_SPLITS = {"val": "val2017", "val2017": "val2017", "train": "train2017", "train2017": "train2017"}


def load_coco_stuff27_metadata(path: str | Path | None = None) -> dict[str, Any]:
    """The 182 -> 27 class mapping JSON (keys fine_names, coarse_names, fine_to_coarse,
    unlabelled_value), validated. ``path`` defaults to the file shipped in ``datasets/``."""
    path = Path(path) if path is not None else metadata_file(FINE_TO_COARSE_FILE)
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    f2c, coarse = meta.get("fine_to_coarse"), meta.get("coarse_names")
    if (
        not isinstance(f2c, list)
        or not isinstance(coarse, list)
        or len(f2c) != 182
        or not all(isinstance(c, int) and 0 <= c < len(coarse) for c in f2c)
    ):
        raise ValueError(
            f"{path} is not a COCO-Stuff-27 mapping: expected 'fine_to_coarse' with 182 class "
            f"indices into 'coarse_names'"
        )
    return meta


def coco_layout_help(root: Path, folder: str = "val2017") -> str:
    """The sentence telling a user what COCO-Stuff layout is expected and how to make it."""
    return (
        "expected the COCO-Stuff layout of STEGO/PiCIE:\n"
        f"  {root}/images/{folder}/<id>.jpg\n"
        f"  {root}/annotations/{folder}/<id>.png   (official stuffthingmaps: category id - 1, "
        "255 = unlabelled)\n"
        f"Prepare it with: {PREPARE_COMMAND.format(root=root)}"
        + ("" if folder == "val2017" else f" --split {folder[:-4]} --all")
        + "  (see datasets/README.md), or point at an existing copy with dataset.root=DIR "
        "(run.py), --root DIR (python -m eval.score) or the DIFFSEG_DATA environment variable."
    )


def _layout_hint(root: Path, folder: str) -> str:
    """What is at ``root`` when the layout is wrong, with a guess at the fix."""
    if not root.is_dir():
        return f"{root} does not exist"
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    hint = f"{root} holds: {', '.join(entries[:12]) or 'nothing'}" + (
        " ..." if len(entries) > 12 else ""
    )
    if (root / folder).is_dir():
        hint += f"; {root / folder} should be {root / 'images' / folder}"
    for name in (f"annotation_{folder}", "stuffthingmaps_trainval2017"):
        if (root / name).is_dir():
            hint += f"; label PNGs belong in {root / 'annotations' / folder}"
    return hint


def _coarse_names() -> list[str]:
    return load_coco_stuff27_metadata()["coarse_names"]


@register(
    DatasetInfo(
        name="coco_stuff27",
        title="COCO-Stuff-27",
        aliases=("cocostuff27", "coco_stuff"),
        class_names=_coarse_names,
        official_sizes={"val": 2175},
        folder="cocostuff",
        layout=lambda root, split="val": coco_layout_help(root, _SPLITS.get(split, split)),
        prepare=PREPARE_COMMAND,
        options=("curated",),
        protocol={"split": "val", "curated": True},
    )
)
class CocoStuff27(LabelledDataset):
    """COCO-Stuff-27 (docs/diffseg.md section 6): 27 coarse classes, label values through the
    182 -> 27 map.

    Layout under ``root`` (default ``<data root>/cocostuff``): ``images/val2017/<id>.jpg`` and
    ``annotations/val2017/<id>.png`` (the official stuffthingmaps PNGs: values 0..181 =
    COCO category id - 1, 255 unlabelled -> -1; any other value is an error).

    Args:
        root: the dataset folder; None means ``default_data_root() / "cocostuff"``.
        split: "val" (or "train"; "val2017"/"train2017" accepted).
        curated: True takes the 2175 curated val ids shipped in
            ``datasets/coco_stuff27_val_curated.txt`` (the benchmark); False takes every image
            of the split that has a label.
        image_size: model input side (512).
        label_size: evaluation resolution (320 or 512).
        ids: explicit list of ids to use instead (overrides ``curated``); ``ids_file``: the same
            read from a text file, one id per line.
        mapping_file: another 182 -> 27 mapping JSON (default: the shipped one).

    Raises:
        FileNotFoundError: missing root or wrong layout (names the expected layout and the
            preparation command), or a listed id whose image or label is missing.
    """

    name = "coco_stuff27"
    _allowed_values = "0..181 (COCO category id - 1) and 255 (unlabelled)"

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
        preprocessing: str = "diffseg",
    ) -> None:
        root = self.resolve_root(root)
        if split not in _SPLITS:
            raise ValueError(f"unknown COCO-Stuff split {split!r}; use 'val' or 'train'")
        folder = _SPLITS[split]
        uses_curated_list = curated and ids is None and ids_file is None
        if uses_curated_list and folder != "val2017":
            raise ValueError(
                f"the curated COCO-Stuff-27 list covers val2017 only; for split {split!r} use "
                "dataset.curated=false or dataset.ids_file=FILE (run.py), --no-curated or "
                "--ids-file FILE (python -m eval.score), curated=False or ids_file= (Python)"
            )

        image_dir, label_dir = root / "images" / folder, root / "annotations" / folder
        if not (image_dir.is_dir() and label_dir.is_dir()):
            raise FileNotFoundError(
                f"COCO-Stuff not found at {root} ({_layout_hint(root, folder)}).\n"
                + coco_layout_help(root, folder)
            )

        def default() -> list[str]:
            if uses_curated_list:
                return read_id_list(metadata_file(CURATED_VAL_FILE))
            return self._scan(image_dir, label_dir)

        ids, own = choose_ids(ids, ids_file, default)
        image_paths = [image_dir / f"{i}.jpg" for i in ids]
        label_paths = [label_dir / f"{i}.png" for i in ids]
        require_files(
            [p for pair in zip(image_paths, label_paths, strict=True) for p in pair],
            f"image and label files of COCO-Stuff {folder} ({len(ids)} ids)",
            "complete the dataset" + (SUBSET_HELP if uses_curated_list else "."),
            coco_layout_help(root, folder),
        )

        #: True when the ids are the shipped curated benchmark list.
        self.curated = uses_curated_list
        meta = load_coco_stuff27_metadata(mapping_file)
        lut = make_lut(dict(enumerate(meta["fine_to_coarse"])), default=_INVALID)
        lut[int(meta.get("unlabelled_value", 255))] = IGNORE_INDEX
        super().__init__(
            ids,
            image_paths,
            label_paths,
            lut=lut,
            class_names=meta["coarse_names"],
            image_size=image_size,
            label_size=label_size,
            root=root,
            split=folder.removesuffix("2017"),
            preprocessing=preprocessing,
            own_ids=own,
        )

    def is_benchmark_list(self) -> bool:
        """Only the curated list is the benchmark (``curated=False`` scans a subset)."""
        return self.curated

    @staticmethod
    def _scan(image_dir: Path, label_dir: Path) -> list[str]:
        """Every ``<id>.jpg`` of the split that has ``<id>.png``, sorted."""
        images = {p.stem for p in image_dir.glob("*.jpg")}
        labels = {p.stem for p in label_dir.glob("*.png")}
        ids = sorted(images & labels)
        if not ids:
            raise FileNotFoundError(
                f"no image in {image_dir} has a label in {label_dir} ({len(images)} images, "
                f"{len(labels)} labels).\n" + coco_layout_help(image_dir.parents[1], image_dir.name)
            )
        if len(images) > len(ids):
            log.warning(
                "COCO-Stuff %s: %d images have no label PNG in %s and are not used",
                image_dir.name,
                len(images) - len(ids),
                label_dir,
            )
        return ids

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "curated": self.curated}
