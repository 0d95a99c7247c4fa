"""Evaluators: objects that see every segmented batch of one setting, in the style of
detectron2's ``DatasetEvaluator`` (``reset`` / ``process`` / ``evaluate``).

A setting's evaluators run in list order for each batch; the records evaluator comes last, so a
row in ``per_image.csv`` means that the image's prediction PNG and overlay are on disk too. Its
``done`` set is what a resume skips.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import ResumeError
from .records import (
    CSV_COLUMNS,
    CSV_COLUMNS_UNLABELLED,
    RowWriter,
    merge_record_files,
    read_all_records,
)

__all__ = [
    "Evaluator",
    "EvaluatorContext",
    "Records",
    "overlay_writer",
    "prediction_writer",
    "MetricEvaluator",
    "OverlayWriter",
    "PredictionWriter",
    "SegmentedBatch",
    "SegmentCounter",
]


@dataclass
class SegmentedBatch:
    """The predictions of one setting for some images of a loader batch.

    Attributes:
        ids: the images' ids.
        preds: int64 ``(B, S, S)`` segment ids on the CPU, ``S`` the evaluation size; with a
            per-image evaluation size (``preprocessing=seg4diff``) ``(B, h, w)``, or a list of
            B ``(h_b, w_b)`` tensors when the sizes differ.
        items: per image, the loader's fields (``image`` (3, H, H) in [-1, 1], ``label``
            (S, S) or (h_b, w_b), ``orig_size``, ``crop``, ``eval_size``...), on the CPU.
    """

    ids: list[str]
    preds: Tensor | list[Tensor]
    items: list[dict[str, Any]] = field(default_factory=list)


class Evaluator:
    """The interface; subclasses override what they need."""

    def reset(self) -> None:
        """Prepare for the images to come (read what an earlier session left)."""

    def process(self, batch: SegmentedBatch) -> None:
        """See one segmented batch."""

    def evaluate(self) -> dict[str, Any]:
        """What goes into the setting's ``results.json``."""
        return {}

    def close(self) -> None:
        """Release files (called on success and on failure)."""


class Records(Evaluator):
    """Shared by the record-keeping evaluators: ``per_image.csv`` in ``out_dir``."""

    columns: list[str] = []

    def __init__(
        self, out_dir: Path, wanted: Sequence[str], random_weights: bool, suffix: str = ""
    ) -> None:
        self.folder = Path(out_dir)
        self.path = self.folder / f"per_image{suffix}.csv"  # this process's own file
        self.wanted = set(wanted)
        self.random_weights = bool(random_weights)
        self.done: set[str] = set()
        self.resumed = 0
        self.writer: RowWriter | None = None

    def running(self) -> dict[str, Any] | None:
        """The running metrics so far (``acc``, ``miou``), None when there are none."""
        return None

    def _load(self) -> list[dict[str, Any]]:
        """The records of every process's file that this run wants; sets ``done``."""
        records = read_all_records(self.folder, self.columns, own=self.path)
        keep = [rec for image_id, rec in records.items() if image_id in self.wanted]
        self.done = {rec["id"] for rec in keep}
        return keep

    def gather(self, order: Sequence[str]) -> None:
        """Main process, after every process finished: fold all records into ``per_image.csv``
        and take them all as this evaluator's state (what :meth:`evaluate` reports)."""
        merge_record_files(self.folder, self.columns, order)
        self._restore(self._load())

    def _restore(self, records: list[dict[str, Any]]) -> None:
        """Take ``records`` (already in ``done``) as the state; subclasses add their sums."""

    def open(self) -> None:
        """Start appending rows (after the run dir was claimed)."""
        self.writer = RowWriter(self.path, self.columns)

    def _write(self, rows: list[dict[str, Any]]) -> None:
        assert self.writer is not None, "open() the evaluator before processing"
        for row in rows:
            self.writer.write({**row, "random_weights": self.random_weights})
            self.done.add(row["id"])
        self.writer.sync()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class MetricEvaluator(Records):
    """Per-image Hungarian matching (:class:`eval.metrics.HungarianMetrics`), summed exactly over
    the images, with one durable row per image (its integer TP/FP/FN) in ``per_image.csv``.
    ``matching="row"`` matches every pixel row on its own (Seg4Diff's released evaluator; a
    compatibility mode) and sums the rows' counts per image."""

    columns = CSV_COLUMNS

    def __init__(
        self,
        out_dir: Path,
        wanted: Sequence[str],
        class_names: Sequence[str],
        random_weights: bool,
        suffix: str = "",
        matching: str = "image",
    ) -> None:
        super().__init__(out_dir, wanted, random_weights, suffix)
        self.class_names = list(class_names)
        self.matching = matching
        self.metrics = None

    def reset(self) -> None:
        records = self._load()
        self.resumed = len(records)
        self._restore(records)

    def _restore(self, records: list[dict[str, Any]]) -> None:
        from eval.metrics import HungarianMetrics

        self.metrics = HungarianMetrics(len(self.class_names), matching=self.matching)
        try:
            self.metrics.add_records(records)
        except ValueError as err:
            raise ResumeError(f"{self.folder / 'per_image.csv'}: {err}") from None

    def process(self, batch: SegmentedBatch) -> None:
        labels = [item["label"] for item in batch.items]
        if isinstance(batch.preds, Tensor):
            records = self.metrics.update(batch.preds, torch.stack(labels))
        else:  # one size per image: matched one by one (the same records)
            records = [
                rec
                for pred, label in zip(batch.preds, labels, strict=True)
                for rec in self.metrics.update(pred, label)
            ]
        self._write([{"id": i, **rec} for i, rec in zip(batch.ids, records, strict=True)])

    def running(self) -> dict[str, Any]:
        return self.metrics.compute()

    def evaluate(self) -> dict[str, Any]:
        m = self.metrics.compute()
        return {
            "acc": m["acc"],
            "miou": m["miou"],
            "matching": self.matching,
            "num_images": m["num_images"],
            "classes_counted": m["classes_counted"],
            "pixels": m["pixels"],
            "iou_per_class": dict(zip(self.class_names, m["iou_per_class"], strict=True)),
            "tp": m["tp"],
            "fp": m["fp"],
            "fn": m["fn"],
        }


class SegmentCounter(Records):
    """Images without labels: one row per image with its number of segments."""

    columns = CSV_COLUMNS_UNLABELLED

    def reset(self) -> None:
        self.resumed = len(self._load())

    def process(self, batch: SegmentedBatch) -> None:
        counts = [int(torch.unique(p).numel()) for p in batch.preds]
        self._write([{"id": i, "num_segments": n} for i, n in zip(batch.ids, counts, strict=True)])

    def evaluate(self) -> dict[str, Any]:
        return {"num_images": len(self.done), "acc": None, "miou": None}


class PredictionWriter(Evaluator):
    """Every prediction as ``predictions/<id>.png`` (segment ids; scorable by ``eval.score``),
    and ``predictions/manifest.json``: the run's metadata (``random_weights``, ``backbone``,
    ``method``, ``setting``) and ``output_dir``, so the random-weights flag travels with the
    folder (``eval.score`` warns when it scores predictions of random weights).

    ``original_size=True`` (image folders) writes each at its photo's own size
    (:func:`diffseg.data.transforms.to_original_size`; pixels outside a centre crop are -1).
    """

    def __init__(self, out_dir: Path, metadata: dict[str, Any], original_size: bool) -> None:
        self.folder = Path(out_dir) / "predictions"
        self.metadata = metadata
        self.original_size = original_size
        self._manifest_written = False

    def write_manifest(self) -> None:
        """``manifest.json`` (the same content at every session and from every process)."""
        import json

        from eval.score import PREDICTION_MANIFEST

        from ..io_utils import atomic_write_text

        manifest = {
            "format": "diffseg predictions: <id>.png segment ids",
            **self.metadata,
            "random_weights": bool(self.metadata.get("random_weights")),
            "output_dir": str(self.folder.parent.resolve()),
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.folder / PREDICTION_MANIFEST, json.dumps(manifest, indent=2) + "\n")
        self._manifest_written = True

    def process(self, batch: SegmentedBatch) -> None:
        from ..data.transforms import to_original_size
        from ..overlay import save_segments_png

        if not self._manifest_written:  # before the first PNG: no folder without its manifest
            self.write_manifest()
        for image_id, pred, item in zip(batch.ids, batch.preds, batch.items, strict=True):
            if self.original_size:
                pred = to_original_size(pred, item["orig_size"], item.get("crop", "center"))
            save_segments_png(self.folder / f"{image_id}.png", pred, metadata=self.metadata)

    def evaluate(self) -> dict[str, Any]:
        return {"predictions": str(self.folder)}


class OverlayWriter(Evaluator):
    """Overlays (image | segments | edges, and the label when there is one) for chosen images,
    captioned when the weights were random. ``load_photo(id)`` draws on the stored photo
    instead of the model input: at the photo's own size (image folders, ``on_photo``), or
    resized to the prediction (``preprocessing=seg4diff``, whose model input is a stretched,
    padded canvas)."""

    def __init__(
        self,
        out_dir: Path,
        ids: Sequence[str],
        metadata: dict[str, Any],
        load_photo=None,
        on_photo: bool = True,
    ) -> None:
        self.folder = Path(out_dir) / "overlays"
        self.ids = set(ids)
        self.metadata = metadata
        self.load_photo = load_photo
        self.on_photo = on_photo

    def process(self, batch: SegmentedBatch) -> None:
        from ..data.transforms import to_original_size
        from ..overlay import save_overlay

        random = bool(self.metadata.get("random_weights"))
        for image_id, pred, item in zip(batch.ids, batch.preds, batch.items, strict=True):
            if image_id not in self.ids:
                continue
            image, label = item["image"], item.get("label")
            if self.load_photo is not None:
                image = self.load_photo(image_id)
                if self.on_photo:
                    pred = to_original_size(pred, item["orig_size"], item.get("crop", "center"))
                else:
                    image = resize_photo(image, tuple(pred.shape))
            save_overlay(
                self.folder / f"{image_id}.png",
                image,
                pred,
                label,
                random_weights=random,
                metadata=self.metadata,
            )

    def evaluate(self) -> dict[str, Any]:
        return {"overlays": [str(p) for p in sorted(self.folder.glob("**/*.png"))]}


@dataclass(frozen=True)
class EvaluatorContext:
    """What an evaluator factory (the ``evaluators:`` list of configs/config.yaml) may use.

    Attributes:
        out_dir: the setting's output folder.
        ids: the ids this run evaluates.
        dataset: the dataset (``has_labels``, ``name``, ``load_rgb``, ...).
        metadata: method, setting, backbone and random-weights flag (written into PNGs).
        save_predictions, num_overlays: the run's options.
    """

    out_dir: Path
    ids: list[str]
    dataset: Any
    metadata: dict[str, Any]
    save_predictions: bool
    num_overlays: int

    @property
    def is_folder(self) -> bool:
        return self.dataset.name == "folder"


def prediction_writer(ctx: EvaluatorContext) -> Evaluator | None:
    """A :class:`PredictionWriter` when predictions are asked for, or the images have no labels."""
    if not (ctx.save_predictions or not ctx.dataset.has_labels):
        return None
    return PredictionWriter(ctx.out_dir, ctx.metadata, original_size=ctx.is_folder)


def overlay_writer(ctx: EvaluatorContext) -> Evaluator | None:
    """An :class:`OverlayWriter` for the first ``num_overlays`` images (image folders: all)."""
    shown = ctx.ids if ctx.is_folder else ctx.ids[: ctx.num_overlays]
    if not shown:
        return None
    photo = None
    if ctx.is_folder or getattr(ctx.dataset, "per_image_size", False):
        index_of = {image_id: k for k, image_id in enumerate(ctx.dataset.ids)}
        photo = lambda image_id: ctx.dataset.load_rgb(index_of[image_id])  # noqa: E731
    return OverlayWriter(ctx.out_dir, shown, ctx.metadata, load_photo=photo,
                         on_photo=ctx.is_folder)  # fmt: skip


def resize_photo(rgb, size: tuple[int, int]):
    """A uint8 photo (H, W, 3) resized to ``size`` (h, w) with PIL's bilinear filter (as
    Seg4Diff's input chain resizes it), for drawing under a prediction of that size."""
    import numpy as np
    from PIL import Image

    if rgb.shape[:2] == size:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.BILINEAR))
