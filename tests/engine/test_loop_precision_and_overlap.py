"""The fast path: half-precision UNet against float32 (stated tolerances), and scoring overlapped
with the next batch's feature pass (same results, same durability)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from diffseg import DiffSeg, build_backbone
from diffseg.tasks.evaluate import evaluate
from diffseg.testing import fakedata

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_thread")

#: Largest difference allowed between a half-precision UNet's attention maps (probabilities
#: still computed in float32) and float32's, per entry and per row (L1); and the least share of
#: pixels whose DiffSeg segment must agree (up to renumbering). Measured on the tiny model:
#: bfloat16 6e-4 / 1.1e-2, float16 9e-5 / 1.2e-3, labels identical.
MAX_ABS, MAX_ROW_L1, MIN_AGREEMENT = 5e-3, 5e-2, 0.99


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of pixels of ``a``'s segments that fall in the segment of ``b`` they mostly map to."""
    hist = torch.zeros(int(a.max()) + 1, int(b.max()) + 1)
    hist.index_put_((a.flatten(), b.flatten()), torch.ones(a.numel()), accumulate=True)
    return float(hist.max(1).values.sum() / a.numel())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_unet_stays_within_the_stated_tolerance(dtype):
    images = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ref = build_backbone("tiny").attention_maps(images)
    half = build_backbone("tiny", dtype=dtype).attention_maps(images)
    for grid, maps in ref.items():
        assert half[grid].dtype == torch.float32  # the probabilities stay float32
        diff = (half[grid] - maps).abs()
        assert diff.max() < MAX_ABS and diff.sum(-1).max() < MAX_ROW_L1
    method = DiffSeg()
    a, b = method.segment(ref, 64)[0], method.segment(half, 64)[0]
    assert _agreement(a, b) >= MIN_AGREEMENT and _agreement(b, a) >= MIN_AGREEMENT


def _cfg(root: Path, *extra: str):
    overrides = ["backbone=tiny", "logger=none", "resolution=64", "num_workers=0",
                 f"dataset.root={root}", "dataset.curated=false", *extra]  # fmt: skip
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_overlapped_scoring_gives_the_same_results_and_resumes_exactly(tmp_path):
    root = tmp_path / "coco"
    fakedata.write_cocostuff(root, n=3, size=(40, 52), seed=4)
    backbone = build_backbone("tiny")
    evaluate(_cfg(root, "overlap=false"), tmp_path / "plain", backbone=backbone)
    plain = json.loads((tmp_path / "plain" / "results.json").read_text())

    def interrupt(done: int, ids) -> None:  # raised on the scoring thread after batch 1
        if done == 1:
            raise KeyboardInterrupt

    cfg = _cfg(root, "overlap=true")
    with pytest.raises(KeyboardInterrupt):
        evaluate(cfg, tmp_path / "over", backbone=backbone, on_batch=interrupt)
    rows = (tmp_path / "over" / "per_image.csv").read_text().splitlines()
    assert 2 <= len(rows) <= 3  # the header, batch 1, and at most the batch already in flight
    evaluate(cfg, tmp_path / "over", backbone=backbone)
    over = json.loads((tmp_path / "over" / "results.json").read_text())
    for key in ("tp", "fp", "fn", "acc", "miou", "num_images"):
        assert over[key] == plain[key]
    assert over["complete"] and over["images_resumed"] == len(rows) - 1
