"""DiffCut in the engine: its feature pass on the tiny SDXL-shaped backbone, the method contract,
runs with its protocol (background merge on VOC), a tau sweep sharing one pass, the README's
snippet."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from diffseg import DiffCut, build_backbone
from diffseg.methods.diffcut import token_grid
from diffseg.tasks.evaluate import evaluate
from diffseg.testing import fakedata, fakedata_diffcut

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sdxl():
    return build_backbone("tiny_sdxl")


class Counting:
    """A backbone wrapper that counts feature passes."""

    def __init__(self, backbone) -> None:
        self._bb, self.calls = backbone, 0

    def __getattr__(self, name):
        return getattr(self._bb, name)

    def extract(self, images, request):
        self.calls += 1
        return self._bb.extract(images, request)


def _images(batch: int, side: int) -> torch.Tensor:
    return torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_features_are_the_hooked_attn1_output_and_segment_matches_segment_features(sdxl):
    method = DiffCut(refine=True)
    request = method.feature_request()
    assert request.timestep == 50 and request.noise_seed == 42 and request.prompt == ""
    images = _images(2, 256)
    module = sdxl.unet.down_blocks[-1].attentions[-1].transformer_blocks[-1].attn1
    seen = {}
    handle = module.register_forward_hook(lambda m, i, o: seen.setdefault("out", o.clone()))
    try:
        grid = method.features(sdxl, images)
    finally:
        handle.remove()
    b, n, c = seen["out"].shape
    assert grid.shape == (2, c, 8, 8) and n == 64  # 256 px: a 8 x 8 grid (1024 px: 32 x 32)
    torch.testing.assert_close(grid, seen["out"].float().transpose(1, 2).reshape(2, c, 8, 8))
    feats = sdxl.extract(images, request)
    labels = method.segment(feats, 32)
    assert labels.shape == (2, 32, 32) and labels.dtype == torch.int64
    torch.testing.assert_close(labels, method.segment_features(grid, 32, images=images))
    raw = method.segment_unrefined(feats, 32)
    torch.testing.assert_close(labels, method.refine_labels(raw, feats))
    with pytest.raises(ValueError, match="takes no hint"):
        method.segment(feats, 32, hints={"num_classes": [1, 1]})
    assert token_grid(torch.zeros(1, 16, 5)).shape == (1, 5, 4, 4)


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_diffcut_on_voc_with_background_merge_and_a_tau_sweep_from_one_pass(sdxl, tmp_path):
    ids = fakedata_diffcut.write_voc(tmp_path / "VOCdevkit")
    cfg = _cfg(
        "method=diffcut",
        "backbone=tiny_sdxl",
        "dataset=voc",
        f"dataset.root={tmp_path / 'VOCdevkit'}",
        "logger=none",
        "num_workers=0",
        "num_overlays=1",
        "save_predictions=true",
        "+sweep.tau=[0.3,0.6]",
    )
    counting = Counting(sdxl)
    out = evaluate(cfg, tmp_path / "run", backbone=counting)
    assert counting.calls == len(ids)  # one pass per image serves both thresholds
    assert set(out["results"]) == {"tau=0.3", "tau=0.6"}
    res = json.loads((tmp_path / "run" / "tau=0.3" / "results.json").read_text())
    assert res["random_weights"] is True and "RANDOM WEIGHTS" in res["WARNING"]
    assert res["method"]["name"] == "diffcut" and res["method"]["tau"] == 0.3
    assert res["resolution"] == 128 and res["dataset"]["preprocessing"] == "diffcut"
    assert res["dataset"]["image_size"] == 1024 and res["num_images"] == len(ids)
    assert len(res["iou_per_class"]) == 21 and res["complete"]
    # the saved predictions (background already merged, then refined) score the same with the
    # scoring CLI under DiffCut's label preprocessing (through 1024 px to 128)
    from eval.score import main as score_main

    scored = tmp_path / "scored.json"
    argv = ["--dataset", "voc", "--root", str(tmp_path / "VOCdevkit"), "--resolution", "128",
            "--preprocessing", "diffcut", "--no-background-merge", "--workers", "1",
            "--predictions", str(tmp_path / "run" / "tau=0.3" / "predictions"),
            "--output", str(scored)]  # fmt: skip
    assert score_main(argv) == 0
    again = json.loads(scored.read_text())
    assert (again["tp"], again["fp"], again["fn"]) == (res["tp"], res["fp"], res["fn"])


def test_diffcut_run_on_coco_is_flagged_random(tmp_path):
    root = tmp_path / "coco"
    fakedata.write_cocostuff(root, n=1, size=(40, 52), seed=2)
    cfg = _cfg(
        "method=diffcut",
        "backbone=tiny_sdxl",
        f"dataset.root={root}",
        "dataset.curated=false",
        "logger=none",
        "num_workers=0",
    )
    out = evaluate(cfg, tmp_path / "run")  # the backbone built from the config
    res = out["results"][""]
    assert out["random_weights"] and res["backbone_name"] == "tiny_sdxl"
    assert res["method"]["refine"] is True and 0 <= res["acc"] <= 100


def test_readme_diffcut_snippet_runs_on_the_tiny_sdxl_backbone(monkeypatch):
    text = (REPO / "README.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "DiffCut" in b)
    real = 'build_backbone("ssd1b", device=device, dtype=torch.float16)'
    assert real in code
    code = code.replace(real, 'build_backbone("tiny_sdxl", device=device)')
    code = code.replace("1024, 1024", "256, 256")  # a smaller image: an 8 x 8 token grid
    scope = {"torch": torch, "device": "cpu"}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["features"].shape[0] == 1 and scope["features"].shape[-2:] == (8, 8)
    assert scope["labels"].shape == (1, 128, 128) and scope["labels"].dtype == torch.int64


def test_bad_method_values_are_config_errors_before_the_run_dir_is_claimed(sdxl, tmp_path):
    from diffseg.errors import ConfigError

    root = tmp_path / "coco"
    fakedata.write_cocostuff(root, n=1, size=(40, 52), seed=2)
    base = ["method=diffcut", "backbone=tiny_sdxl", f"dataset.root={root}",
            "dataset.curated=false", "logger=none", "num_workers=0"]  # fmt: skip
    with pytest.raises(ConfigError, match="no module 'nope'"):
        evaluate(_cfg(*base, "method.layer=nope"), tmp_path / "a", backbone=sdxl)
    assert not (tmp_path / "a" / "run.json").exists()
    with pytest.raises(ConfigError, match="alpha"):
        evaluate(_cfg(*base, "method.alpha=abc"), tmp_path / "b", backbone=sdxl)
    with pytest.raises(ConfigError, match="pamr_dilations"):
        evaluate(_cfg(*base, "method.pamr_dilations=[0]"), tmp_path / "c", backbone=sdxl)
    with pytest.raises(ConfigError, match="shard_index=5"):
        evaluate(_cfg(*base, "num_shards=2", "shard_index=5"), tmp_path / "d", backbone=sdxl)


def test_a_run_dir_refuses_another_precision_or_weights_folder(sdxl, tmp_path):
    from diffseg.errors import ResumeError

    root = tmp_path / "coco"
    fakedata.write_cocostuff(root, n=1, size=(40, 52), seed=2)
    base = ["method=diffcut", "backbone=tiny_sdxl", f"dataset.root={root}",
            "dataset.curated=false", "logger=none", "num_workers=0"]  # fmt: skip
    evaluate(_cfg(*base), tmp_path / "run", backbone=sdxl)
    with pytest.raises(ResumeError, match="precision.attention"):
        evaluate(_cfg(*base, "precision.attention=bfloat16"), tmp_path / "run", backbone=sdxl)
    with pytest.raises(ResumeError, match="backbone.path"):
        evaluate(_cfg(*base, "backbone.path=/elsewhere"), tmp_path / "run", backbone=sdxl)


def test_run_py_method_diffcut_on_cityscapes(tmp_path):
    """The command users type, end to end in a subprocess, on the Cityscapes fixture."""
    import os
    import subprocess
    import sys

    root = tmp_path / "cs"
    fakedata.write_cityscapes(root, n=1, size=(32, 64))
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "run.py", "method=diffcut", "backbone=tiny_sdxl", "dataset=cityscapes",
           f"dataset.root={root}", "logger=none", "num_workers=0", f"hydra.run.dir={tmp_path / 'r'}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert res["method"]["name"] == "diffcut" and res["resolution"] == 128
    assert res["random_weights"] and res["dataset"]["name"] == "cityscapes" and res["complete"]
    assert "RANDOM WEIGHTS" in proc.stdout
