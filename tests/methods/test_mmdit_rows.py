"""The rows no paper has: DiffSeg and DiffCut on MM-DiT backbones, end to end on fixtures."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from diffseg.backbones.mmdit import default_layer
from diffseg.features import Features
from diffseg.methods.mmdit_diffseg import MMDiTDiffSeg, image_attention
from diffseg.tasks.evaluate import evaluate
from diffseg.testing import fakedata

REPO = Path(__file__).resolve().parents[2]


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_image_block_is_renormalised_and_averaged_over_layers():
    g = torch.Generator().manual_seed(0)
    a, b = (torch.rand(2, 16, 16, generator=g) * 0.05 for _ in range(2))
    feats = Features(joint_image={3: a, 5: b})
    maps = image_attention(feats, (3, 5))
    assert list(maps) == [4]
    want = (a / a.sum(-1, keepdim=True) + b / b.sum(-1, keepdim=True)) / 2
    torch.testing.assert_close(maps[4], want)
    torch.testing.assert_close(maps[4].sum(-1), torch.ones(2, 16))
    assert (default_layer(24), default_layer(19), default_layer(10)) == (9, 7, 3)
    request = MMDiTDiffSeg(layers=[2, 4]).feature_request()
    assert request.joint_blocks == (2, 4) and request.joint_image and request.noise_seed is None


def _coco(tmp_path: Path) -> list[str]:
    root = tmp_path / "coco"
    fakedata.write_cocostuff(root, n=1, size=(40, 52), seed=1)
    return [f"dataset.root={root}", "dataset.curated=false", "logger=none", "num_workers=0"]


def test_experiment_mmdit_diffseg_on_tiny_sd3(tmp_path):
    cfg = _cfg("experiment=mmdit_diffseg", "backbone=tiny_sd3", "resolution=64", "image_size=512",
               *_coco(tmp_path))  # fmt: skip
    out = evaluate(cfg, tmp_path / "run")
    res = out["results"][""]
    assert out["random_weights"] and res["method"]["layers"] == [3]
    assert 0 <= res["miou"] <= 100


def test_experiment_mmdit_diffcut_on_tiny_flux(tmp_path):
    cfg = _cfg("experiment=mmdit_diffcut", "backbone=tiny_flux", "image_size=512",
               "method.refine=false", "method.partial_eigh=true", *_coco(tmp_path))  # fmt: skip
    out = evaluate(cfg, tmp_path / "run")
    res = out["results"][""]
    assert out["random_weights"] and res["method"]["layer"] == "block.0"
    assert 0 <= res["miou"] <= 100
