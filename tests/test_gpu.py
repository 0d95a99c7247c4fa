"""Checks for a machine with CUDA (skipped elsewhere): DiffCut's pass in float16 on the GPU
against float32 on the CPU, and a whole overlapped run on the GPU equal to the CPU's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from diffseg import DiffCut, build_backbone
from diffseg.tasks.evaluate import evaluate
from diffseg.testing import fakedata

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_diffcut_features_float16_on_cuda_match_float32():
    images = torch.rand(2, 3, 512, 512, generator=torch.Generator().manual_seed(0)) * 2 - 1
    method = DiffCut(refine=False, noise_seed=None)  # no noise: CPU and CUDA draw differently
    cpu = method.features(build_backbone("tiny_sdxl"), images)
    gpu = method.features(build_backbone("tiny_sdxl", device="cuda", dtype=torch.float16), images)
    assert gpu.dtype == torch.float32 and gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=2e-2, rtol=2e-2)
    a, b = method.segment_features(cpu, 64), method.segment_features(gpu, 64).cpu()
    assert (a == b).float().mean() > 0.95


def test_overlapped_cuda_run_equals_the_cpu_run(tmp_path):
    root = tmp_path / "coco"
    fakedata.write_cocostuff(root, n=3, size=(40, 52), seed=4)
    results = {}
    for device in ("cpu", "cuda"):
        overrides = ["backbone=tiny", "logger=none", "resolution=64", "num_workers=0",
                     f"dataset.root={root}", "dataset.curated=false", f"device={device}",
                     "batch_size=2"]  # fmt: skip
        with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        evaluate(cfg, tmp_path / device)
        results[device] = json.loads((tmp_path / device / "results.json").read_text())
    cpu, gpu = results["cpu"], results["cuda"]
    assert gpu["timing"]["sessions"][0]["device"].startswith("cuda")
    assert abs(gpu["miou"] - cpu["miou"]) < 1.0 and abs(gpu["acc"] - cpu["acc"]) < 1.0
