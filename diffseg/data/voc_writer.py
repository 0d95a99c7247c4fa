"""The generated dataset on disk, in the Pascal VOC layout a segmentation trainer reads as is::

    <root>/JPEGImages/<id>.jpg                 the generated image (RGB, JPEG quality 95)
    <root>/SegmentationClass/<id>.png          palette PNG (VOC colours): 0 background,
                                               k + 1 for class k of classes.json's list
    <root>/ImageSets/Segmentation/train.txt    the ids, one a line
    <root>/index.jsonl                         one JSON object a line: id, class, label, prompt,
                                               seed, mask_area, settings, ...
    <root>/classes.json                        ["background", <class 0>, <class 1>, ...]
    <root>/overlays/<id>.jpg                   image | image with the mask tinted (a visual check;
                                               captioned RANDOM WEIGHTS when made on them)
    <root>/records/<id>.json                   the id's index line; written last = id complete
    <root>/RANDOM_WEIGHTS                      present when a model with random weights made it

Every file is written to a temporary name and renamed into place, so a kill never leaves a torn
file under its final name. An id is complete when its record exists (written after its image,
mask and overlay): a re-run skips complete ids and rewrites the others, and ``finalize`` rebuilds
``index.jsonl`` and ``train.txt`` from the records, so an interrupted and resumed run ends with
the same files as an uninterrupted one. Several processes (shards) may write into one root.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from diffseg.io_utils import atomic_write_text, atomic_write_with
from diffseg.overlay import RANDOM_WEIGHTS_CAPTION, add_caption

__all__ = ["RANDOM_MARKER", "VOCWriter", "image_id", "voc_palette"]

RANDOM_MARKER = "RANDOM_WEIGHTS"
JPEG_QUALITY = 95


def voc_palette(n: int = 256) -> list[int]:
    """Pascal VOC's colour map as a flat ``[r0, g0, b0, r1, ...]`` list of ``3 n`` ints
    (the bit-interleaved palette of the VOC devkit: 0 black, 1 (128, 0, 0), 2 (0, 128, 0) ...)."""
    palette = []
    for label in range(n):
        r = g = b = 0
        c = label
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette


def image_id(class_name: str, seed: int) -> str:
    """``<class slug>_<seed>``: lower case, runs of other characters than ``a-z0-9`` as ``_``
    (``"potted plant", 200000`` -> ``potted_plant_200000``)."""
    slug = re.sub(r"[^a-z0-9]+", "_", class_name.lower()).strip("_") or "class"
    return f"{slug}_{int(seed)}"


class VOCWriter:
    """Writes and reads back the bookkeeping of one output dataset.

    Args:
        root: the dataset folder (created).
        class_names: the class list; class ``k`` is stored as label ``k + 1``.
    """

    def __init__(self, root: str | Path, class_names: Sequence[str]) -> None:
        self.root = Path(root)
        self.class_names = list(class_names)
        if len(self.class_names) > 254:
            raise ValueError(f"{len(self.class_names)} classes do not fit an 8-bit label map")
        self.palette = voc_palette()

    # ------------------------------------------------------------------ paths

    def image_path(self, id_: str) -> Path:
        return self.root / "JPEGImages" / f"{id_}.jpg"

    def label_path(self, id_: str) -> Path:
        return self.root / "SegmentationClass" / f"{id_}.png"

    def overlay_path(self, id_: str) -> Path:
        return self.root / "overlays" / f"{id_}.jpg"

    def record_path(self, id_: str) -> Path:
        return self.root / "records" / f"{id_}.json"

    # ------------------------------------------------------------------ writing

    def prepare(self, random_weights: bool = False, note: str = "") -> None:
        """Write ``classes.json`` (and the ``RANDOM_WEIGHTS`` marker with ``note``)."""
        names = json.dumps(["background", *self.class_names], indent=1) + "\n"
        atomic_write_text(self.root / "classes.json", names)
        if random_weights:
            atomic_write_text(self.root / RANDOM_MARKER, note.rstrip() + "\n")

    def is_complete(self, id_: str) -> bool:
        """Whether ``id_`` has its record, image and label on disk."""
        return all(
            p.is_file() for p in (self.record_path(id_), self.image_path(id_), self.label_path(id_))
        )

    def label_value(self, class_name: str) -> int:
        """The label stored for ``class_name``: its index in the class list + 1."""
        return self.class_names.index(class_name) + 1

    def write(
        self, id_: str, image: np.ndarray, mask: Any, class_name: str, record: dict[str, Any]
    ) -> dict[str, Any]:
        """Write one example: image, label map, overlay, then its record (last).

        Args:
            image: uint8 (H, W, 3) RGB.
            mask: bool (H, W) (numpy or tensor).
            record: JSON-able fields for the index (``id``, ``class`` and ``label`` are added);
                ``random_weights: True`` puts the random-weights caption on the overlay.
        Returns:
            the record written.
        """
        mask = np.asarray(mask, dtype=bool)
        value = self.label_value(class_name)
        label = Image.fromarray(mask.astype(np.uint8) * np.uint8(value), mode="L").convert("P")
        label.putpalette(self.palette)
        rgb = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
        jpeg = {"format": "JPEG", "quality": JPEG_QUALITY}
        atomic_write_with(self.image_path(id_), lambda f: rgb.save(f, **jpeg))
        atomic_write_with(self.label_path(id_), lambda f: label.save(f, format="PNG"))
        picture = self.overlay(image, mask, value)
        if record.get("random_weights"):
            picture = add_caption(picture, RANDOM_WEIGHTS_CAPTION)
        overlay = Image.fromarray(picture)
        atomic_write_with(self.overlay_path(id_), lambda f: overlay.save(f, **jpeg))
        full = {"id": id_, "class": class_name, "label": value, **record}
        atomic_write_text(self.record_path(id_), json.dumps(full, sort_keys=True) + "\n")
        return full

    def overlay(self, image: np.ndarray, mask: np.ndarray, value: int) -> np.ndarray:
        """``image | image with the mask tinted in the class's VOC colour``: uint8 (H, 2W, 3)."""
        colour = np.array(self.palette[3 * value : 3 * value + 3], dtype=np.float32)
        tinted = image.astype(np.float32)
        tinted[mask] = 0.45 * tinted[mask] + 0.55 * colour
        return np.concatenate([image, tinted.round().astype(np.uint8)], axis=1)

    # ------------------------------------------------------------------ index

    def records(self, ids: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """The records of ``ids`` that are complete (all complete ones, sorted, when None)."""
        if ids is None:
            ids = sorted(p.stem for p in (self.root / "records").glob("*.json"))
        return [
            json.loads(self.record_path(i).read_text(encoding="utf-8"))
            for i in ids
            if self.is_complete(i)
        ]

    def finalize(self, order: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Rebuild ``index.jsonl`` and ``ImageSets/Segmentation/train.txt`` from the records.

        Args:
            order: the ids in dataset order (the generation plan); complete ids that are not in
                it (another run's) follow, sorted. None: all complete ids, sorted.
        Returns:
            the records, in file order.
        """
        known = list(order or [])
        extra = sorted(set(p.stem for p in (self.root / "records").glob("*.json")) - set(known))
        records = self.records([*known, *extra])
        atomic_write_text(
            self.root / "index.jsonl",
            "".join(json.dumps(r, sort_keys=True) + "\n" for r in records),
        )
        atomic_write_text(
            self.root / "ImageSets" / "Segmentation" / "train.txt",
            "".join(r["id"] + "\n" for r in records),
        )
        return records
