"""The progress bar and tracker logs: running ACC / mIoU only where they are the run's own."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from diffseg.engine.distributed import Dist
from diffseg.tasks.progress import Progress
from eval.metrics import HungarianMetrics


class _Records:
    """A records evaluator's running figures, from real metrics over the images seen."""

    def __init__(self) -> None:
        self.metrics = HungarianMetrics(num_classes=3)

    def see(self, pred: np.ndarray, label: np.ndarray) -> None:
        self.metrics.update(pred[None], label[None])

    def running(self) -> dict:
        return self.metrics.compute()


class _Tracker:
    def __init__(self) -> None:
        self.logged: list[dict] = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.logged.append(metrics)


def _run_two_images(dist):
    records, tracker = _Records(), _Tracker()
    runs = [SimpleNamespace(records=records, setting=SimpleNamespace(name=None))]
    label = np.array([[0, 0], [1, 2]])
    with Progress(2, 0, runs, tracker, dist=dist, log_every=1) as progress:
        records.see(np.array([[5, 5], [6, 7]]), label)  # all right
        progress.update(1, ["a"])
        records.see(np.array([[5, 6], [6, 6]]), label)  # half right
        progress.update(2, ["b"])
        postfix = progress.bar.postfix or ""
    return postfix, tracker.logged, records.running()


@pytest.mark.parametrize("dist", [None, Dist(0, 1, 0, group=False)])
def test_one_process_shows_and_logs_the_running_figures(dist):
    postfix, logged, final = _run_two_images(dist)
    assert f"acc={final['acc']:.1f}" in postfix and f"miou={final['miou']:.1f}" in postfix
    assert logged[-1]["acc"] == final["acc"] and logged[-1]["miou"] == final["miou"]
    assert [m["images"] for m in logged] == [1, 2]


@pytest.mark.parametrize("dist", [Dist(0, 2, 0, group=True), Dist(0, 3, 0, group=False)])
def test_several_processes_show_no_partial_figures(dist):
    """A process's own images are not the run's: no ACC / mIoU in the bar or the tracker."""
    postfix, logged, _ = _run_two_images(dist)
    assert "acc" not in postfix and "miou" not in postfix
    assert logged and all(set(m) == {"images", "images_per_s"} for m in logged)
