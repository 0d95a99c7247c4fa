"""The inference loop: one feature pass per batch for every setting, timed per stage.

For each loader batch: the images go to the device, each distinct pass of the run's merged
feature requests runs once (:meth:`DiffusionBackbone.extract`), then every setting segments the
images it still lacks and hands the predictions to its evaluators. Stage times (data, features,
method, scoring) are summed over the batches after the first, which is the warm-up (kernel
selection, lazy allocation) and is timed on its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..features import FeatureRequest, merge_requests
from ..methods.base import Method
from .evaluators import Evaluator, Records, SegmentedBatch
from .settings import Setting

__all__ = ["SettingRun", "StageTimes", "predict", "run_loop"]

log = logging.getLogger(__name__)

STAGES = ("data", "features", "method", "scoring")


@dataclass
class StageTimes:
    """Seconds per stage over the timed batches, the warm-up batch apart."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    images: int = 0  # images of the timed batches
    warmup_s: float | None = None
    warmup_images: int = 0
    #: Unreadable images passed over (image folders with ``skip_unreadable``): id and reason.
    skipped: list[dict[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        total = sum(self.seconds.values())
        return {
            "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
            "images_timed": self.images,
            "images_per_s": round(self.images / total, 4) if self.images and total > 0 else None,
            "warmup_s": None if self.warmup_s is None else round(self.warmup_s, 4),
            "warmup_images": self.warmup_images,
        }


@dataclass
class SettingRun:
    """A setting with its evaluators: ``writers`` (predictions, overlays, ...) and ``records``,
    the durable per-image records, which know what is done (the resume ledger). ``records``
    runs last, so a recorded image has its files on disk."""

    setting: Setting
    writers: list[Evaluator]
    records: Records

    @property
    def evaluators(self) -> list[Evaluator]:
        """Every evaluator in processing order: the writers, then the records."""
        return [*self.writers, self.records]


def classes_per_image(labels: Sequence[torch.Tensor]) -> list[int]:
    """Labels, one (h, w) per image (or a (B, S, S) tensor) -> the number of distinct labelled
    classes per image (K-Means-S)."""
    return [int(torch.unique(lab[lab >= 0]).numel()) for lab in labels]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _split_items(batch: dict[str, Any]) -> list[dict[str, Any]]:
    n = len(batch["id"])
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def _drop_skipped(batch: dict[str, Any], times: StageTimes) -> dict[str, Any] | None:
    """The batch without the items a loader marked ``skipped`` (recorded in ``times``); None
    when nothing is left."""
    if "skipped" not in batch or not bool(batch["skipped"].any()):
        return batch
    keep = [k for k, s in enumerate(batch["skipped"].tolist()) if not s]
    for k, s in enumerate(batch["skipped"].tolist()):
        if s:
            times.skipped.append({"id": batch["id"][k], "error": batch["error"][k]})
            log.warning("skipped %s: %s", batch["id"][k], batch["error"][k])
    if not keep:
        return None
    return {
        key: [value[k] for k in keep] if isinstance(value, list) else value[keep]
        for key, value in batch.items()
    }


#: The per-image hints the engine can provide, by name: ``labels (one per image) -> one value per
#: image``.
HINTS: dict[str, Callable[[Sequence[torch.Tensor]], list[Any]]] = {"num_classes": classes_per_image}


def background_merger(labels, background: tuple[int, int] | None):
    """The background merge of a batch (:func:`eval.metrics.merge_background` per image, against
    its ``labels``) for a dataset with a background class (``background = (index,
    num_classes)``); None otherwise."""
    if background is None:
        return None
    from eval.metrics import merge_background

    index, num_classes = background

    def merge(preds: torch.Tensor) -> torch.Tensor:
        return torch.stack(
            [
                merge_background(p, lab, index, num_classes)
                for p, lab in zip(preds, labels, strict=True)
            ]
        )

    return merge


def hints_for(method: Method, labels) -> dict[str, Any] | None:
    """The hints ``method`` declares, computed from the batch's labels (None when it needs none)."""
    if not method.hints:
        return None
    unknown = [h for h in method.hints if h not in HINTS]
    if unknown:
        raise ValueError(
            f"{method.name} asks for hints {unknown}; the engine provides {list(HINTS)}"
        )
    if labels is None:
        raise ValueError(f"{method.name} needs labels for its hints {list(method.hints)}")
    return {h: HINTS[h](labels) for h in method.hints}


def predict(method: Method, features, size, hints, labels, background):
    """A method's labels ``(B, h, w)`` on the CPU (``size``: S or (h, w)), through its own
    :meth:`Method.predict` (which orders the background merge and any refinement)."""
    merge = background_merger(labels, background) if labels is not None else None
    return method.predict(features, size, hints, merge).cpu()


def eval_size(item: dict[str, Any], resolution: int) -> int | tuple[int, int]:
    """The size of an item's prediction: its own ``eval_size`` (h', w') when the preprocessing
    keeps each image's aspect (``seg4diff``), else the run's square ``resolution``."""
    size = item.get("eval_size")
    return resolution if size is None else (int(size[0]), int(size[1]))


def _predict_by_size(method, features, sizes, hints, labels, background):
    """:func:`predict` once per distinct size among the images (one call when they agree);
    returns a (B, h, w) tensor, or a list of B (h_b, w_b) tensors when sizes differ."""
    groups: dict[Any, list[int]] = {}
    for k, size in enumerate(sizes):
        groups.setdefault(size, []).append(k)
    if len(groups) == 1:
        return predict(method, features, sizes[0], hints, labels, background)
    preds: list[Any] = [None] * len(sizes)
    for size, members in groups.items():
        part_hints = None if hints is None else {h: [v[k] for k in members]
                                                 for h, v in hints.items()}  # fmt: skip
        part_labels = None if labels is None else [labels[k] for k in members]
        out = predict(method, features.select(members), size, part_hints, part_labels, background)
        for k, pred in zip(members, out, strict=True):
            preds[k] = pred
    return preds


def _segment(run: SettingRun, features, ids, items, resolution: int, timer: dict, background):
    """One setting's predictions for the images of the batch it still lacks, or None."""
    pending = [k for k, i in enumerate(ids) if i not in run.records.done]
    if not pending:
        return None
    method = run.setting.method
    t0 = time.perf_counter()
    labels = [items[k]["label"] for k in pending] if "label" in items[0] else None
    hints = hints_for(method, labels)
    sizes = [eval_size(items[k], resolution) for k in pending]
    preds = _predict_by_size(method, features.select(pending), sizes, hints, labels, background)
    timer["method"] += time.perf_counter() - t0
    return SegmentedBatch([ids[k] for k in pending], preds, [items[k] for k in pending])


class _Scorer:
    """Runs the evaluators (matching, PNGs, CSV rows) of each batch, in batch order: inline, or
    with ``overlap`` on one background thread, so that the device extracts the next batch while
    the CPU scores and writes this one. Either way a batch's rows are durable before its
    ``on_batch`` call; an error (or an interruption raised by ``on_batch``) in the thread is
    raised in the loop at the next batch, after the batches before it are complete."""

    def __init__(self, overlap: bool) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(1, thread_name_prefix="scoring") if overlap else None
        self.pending: list = []

    def submit(self, job: Callable[[], None]) -> None:
        if self.pool is None:
            job()
            return
        self.pending.append(self.pool.submit(job))
        self.check(wait=False)

    def check(self, wait: bool) -> None:
        """Re-raise the first failure among the finished jobs (all of them when ``wait``)."""
        while self.pending and (wait or self.pending[0].done()):
            self.pending.pop(0).result()

    def close(self) -> None:
        """Wait for every submitted job (also when the loop is being left by an exception)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def run_loop(
    loader,
    backbone,
    runs: Sequence[SettingRun],
    resolution: int,
    device: torch.device,
    on_batch: Callable[[int, list[str]], None] | None = None,
    background: tuple[int, int] | None = None,
    times: StageTimes | None = None,
    overlap: bool = False,
) -> StageTimes:
    """Segment every batch of ``loader`` with every setting of ``runs``.

    Args:
        loader: yields dict batches (``image`` (B, 3, H, H), ``id``, and ``label`` etc.).
        backbone: a :class:`diffseg.backbones.DiffusionBackbone`.
        runs: the settings and their evaluators (already reset and opened).
        resolution: the evaluation size ``S`` of the predictions.
        on_batch: called after each batch, once its records are durable, with the number of
            images finished in this session and the batch's ids (progress, logging, tests).
        background: ``(background class, number of classes)`` for datasets with a background
            class (see :func:`predict`); None otherwise.
        times: where to add the stage times (the caller keeps them when the loop is
            interrupted); None = a new :class:`StageTimes`.
        overlap: score and write each batch on a background thread while the next one is
            extracted (see :class:`_Scorer`).

    Returns:
        the :class:`StageTimes` of this session.
    """
    requests: list[FeatureRequest] = [r.setting.method.feature_request() for r in runs]
    passes = merge_requests(requests)
    times = times if times is not None else StageTimes()
    scorer, count = _Scorer(overlap), {"done": 0, "batches": 0}
    t_wait = time.perf_counter()
    try:
        for batch in loader:
            timer = dict.fromkeys(STAGES, 0.0)
            timer["data"] = time.perf_counter() - t_wait
            batch = _drop_skipped(batch, times)
            if batch is not None:
                ids = list(batch["id"])
                # float32 pixels: the VAE (float32 for SDXL models) and PAMR see them unrounded;
                # the backbone casts the latent to the UNet's precision.
                images = batch["image"].to(device=device, non_blocking=True)
                t0 = time.perf_counter()
                features = {p.pass_key: backbone.extract(images, p) for p in passes}
                _sync(device)
                timer["features"] = time.perf_counter() - t0
                items = _split_items({k: v for k, v in batch.items() if k != "id"} | {"id": ids})
                done = [
                    (run, _segment(run, features[req.pass_key], ids, items, resolution, timer,
                                   background))
                    for run, req in zip(runs, requests, strict=True)
                ]  # fmt: skip
                del features  # free the device memory before the next batch's pass
                first = count["batches"] == 0
                count["batches"] += 1
                scorer.submit(_scoring_job(done, ids, timer, times, count, first, on_batch))
                _after_first_batch(backbone, runs)
            t_wait = time.perf_counter()
        scorer.check(wait=True)
    finally:
        scorer.close()
    return times


def _scoring_job(done, ids, timer, times: StageTimes, count, first: bool, on_batch):
    """The work of one batch after its predictions: evaluators, timings, progress."""

    def job() -> None:
        t0 = time.perf_counter()
        for run, segmented in done:
            if segmented is not None:
                for evaluator in run.evaluators:
                    evaluator.process(segmented)
        timer["scoring"] += time.perf_counter() - t0
        _account(times, timer, len(ids), first)
        count["done"] += len(ids)
        if on_batch is not None:
            on_batch(count["done"], ids)

    return job


def _account(times: StageTimes, timer: dict[str, float], n: int, first: bool) -> None:
    if first:
        times.warmup_s, times.warmup_images = sum(timer.values()), n
        return
    for key, value in timer.items():
        times.seconds[key] += value
    times.images += n


def _after_first_batch(backbone, runs: Sequence[SettingRun]) -> None:
    """The inputs were checked once; later batches skip the checks that wait for the device."""
    backbone.check_inputs = False
    for run in runs:
        run.setting.method.check_inputs = False
