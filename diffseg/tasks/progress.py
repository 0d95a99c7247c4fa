"""Progress of a run: the bar, the running metrics and their logging."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["Progress"]


class Progress:
    """A tqdm bar over the images to do, with the first setting's running ACC / mIoU, metrics
    sent to the tracker every ``log_every`` images, and a user callback.

    Several processes (torchrun, or independent shard jobs): each process's running ACC / mIoU
    are those of its own images only, which differ from the run's merged result, so neither
    the bar nor the tracker shows them (only the images and their rate); the merged figures
    are in ``results.json`` at the end.

    Args:
        total: images this session will process; resumed: images done by earlier sessions.
        runs: the settings (their records evaluators give the running metrics).
        tracker: a :class:`diffseg.tracking.Tracker`.
        on_batch: an extra callback ``(images_done, ids)`` (tests interrupt a run with it).
    """

    def __init__(
        self,
        total: int,
        resumed: int,
        runs: Sequence[Any],
        tracker,
        on_batch: Callable[[int, list[str]], None] | None = None,
        dist=None,
        log_every: int = 25,
    ) -> None:
        self.total, self.resumed, self.runs = total, resumed, runs
        # Several processes: the main one shows the whole run's progress, estimated as its own
        # times the number of processes (no collective per batch: shards may differ by one).
        self.scale = dist.world_size if dist is not None and dist.group else 1
        self.show = dist is None or dist.is_main
        # Running figures only when this process sees every image of the run.
        self.figures = dist is None or dist.world_size == 1
        self.tracker, self.on_batch, self.log_every = tracker, on_batch, log_every
        self.done = 0
        self.bar = None
        self._t0 = time.perf_counter()

    def __enter__(self) -> Progress:
        from tqdm import tqdm

        self.bar = tqdm(
            total=self.total * self.scale,
            unit="img",
            desc="segmenting",
            dynamic_ncols=True,
            disable=not self.total or not self.show,
            file=sys.stderr,
        )
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()

    def update(self, done: int, ids: list[str]) -> None:
        step = done - self.done
        self.done = done
        self.bar.update(step * self.scale)
        if self.show:
            m = self.runs[0].records.running() if self.figures else None
            if m is not None:
                self.bar.set_postfix(acc=f"{m['acc']:.1f}", miou=f"{m['miou']:.1f}")
            if done % self.log_every < step or done == self.total:
                self._log(done)
        if self.on_batch is not None:
            self.on_batch(done, ids)

    def _log(self, done: int) -> None:
        elapsed = time.perf_counter() - self._t0
        metrics = {"images": self.resumed + done, "images_per_s": done / max(elapsed, 1e-9)}
        for run in self.runs if self.figures else ():
            m = run.records.running()
            if m is None:
                continue
            prefix = f"{run.setting.name}/" if run.setting.name else ""
            metrics[f"{prefix}acc"], metrics[f"{prefix}miou"] = m["acc"], m["miou"]
        self.tracker.log_metrics(metrics, step=self.resumed + done)
