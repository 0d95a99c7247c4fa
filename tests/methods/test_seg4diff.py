"""Seg4Diff's unsupervised mode: each step against the spec on synthetic inputs (both presets),
the public API on tiny MM-DiTs, and run.py end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from diffseg import Seg4Diff, build_backbone
from diffseg.methods.seg4diff import (
    candidate_maps,
    normalize_attention,
    seg4diff_image,
    seg4diff_label,
    seg4diff_size,
)

REPO = Path(__file__).resolve().parents[2]


# ---- synthetic attention ---------------------------------------------------------------------


def _synthetic(b: int = 1, side: int = 64, groups: int = 4, seed: int = 0) -> torch.Tensor:
    """I2T-like probabilities (B, side**2, 77): tokens in ``groups`` families, each family
    attending to one horizontal band of the image, plus noise; rows sum to well below 1."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.arange(side).repeat_interleave(side)
    band = (rows * groups) // side  # (N,) band id of each pixel
    family = torch.arange(77) % groups
    base = (band[:, None] == family[None, :]).float()
    noise = torch.rand(b, side * side, 77, generator=g)
    return (0.002 + 0.004 * base + 0.0015 * noise) / 1.0


def _blobs(side: int = 16, seed: int = 0) -> torch.Tensor:
    """(1, side**2, 77) probabilities: each token a Gaussian blob of random centre, width and
    strength over the grid, plus noise (token maps that overlap in graded ways)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    centres = torch.rand(77, 2, generator=g) * side
    width = 1 + torch.rand(77, generator=g) * side / 2
    strength = torch.rand(77, generator=g)
    d2 = (yy.reshape(-1, 1) - centres[:, 0]) ** 2 + (xx.reshape(-1, 1) - centres[:, 1]) ** 2
    base = strength * torch.exp(-d2 / (2 * width**2))
    return 0.002 + 0.004 * base + 0.0015 * torch.rand(1, side * side, 77, generator=g)


def _skl(x: torch.Tensor, y: torch.Tensor) -> float:
    """The spec's D(x, y), summed over all cells, in float64."""
    x, y = x.double(), y.double()
    return float(0.5 * (x * (x.log() - y.log())).sum() + 0.5 * (y * (y.log() - x.log())).sum())


def _merge_as_specified(p: torch.Tensor, tau: float) -> list[list[int]]:
    """Section 5.4: visit tokens in order, skip marked, group all k with D < tau (marked too)."""
    marked, groups = set(), []
    for i in range(p.shape[0]):
        if i in marked:
            continue
        group = sorted({i} | {k for k in range(p.shape[0]) if _skl(p[i], p[k]) < tau})
        marked |= set(group)
        groups.append(group)
    return groups


# ---- the steps -------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", ["pixel", "token"])
def test_normalisation_axis(normalize):
    a = _synthetic(side=8)
    got = normalize_attention(a, normalize)
    want = torch.empty_like(a)
    for n in range(a.shape[1]):
        for j in range(a.shape[2]):
            line = a[0, n, :] if normalize == "pixel" else a[0, :, j]
            shifted = line - line.min()
            value = a[0, n, j] - line.min()
            want[0, n, j] = value / (shifted.max() + 1e-6)
    torch.testing.assert_close(got, want)
    if normalize == "pixel":  # per pixel: every row spans [0, ~1]
        assert torch.allclose(got.amax(-1), torch.ones(1, 64), atol=1e-3)
    else:
        assert torch.allclose(got.amax(-2), torch.ones(1, 77), atol=1e-3)


def test_candidate_maps_are_spatial_softmaxes():
    a = torch.rand(2, 16, 77)
    maps = candidate_maps(a)
    assert maps.shape == (2, 77, 16)
    torch.testing.assert_close(maps[1, 5], torch.softmax(a[1, :, 5], 0))
    # values in [0, 1] give nearly flat maps: max / min <= e
    assert float((maps.amax(-1) / maps.amin(-1)).max()) <= math.e + 1e-4


@pytest.mark.parametrize("preset", ["released", "intended"])
@pytest.mark.parametrize("make", [_synthetic, _blobs])
def test_merge_follows_the_greedy_rule_in_token_order(preset, make):
    seg = Seg4Diff(preset=preset)
    a = make(side=16)
    maps = seg.merged_maps(a)
    assert len(maps) == 1 and maps[0].shape[1:] == (16, 16)
    p = candidate_maps(normalize_attention(a, seg.normalize))[0]
    groups = _merge_as_specified(p, seg.kl_threshold)
    assert maps[0].shape[0] == len(groups)
    for merged, group in zip(maps[0], groups, strict=True):
        torch.testing.assert_close(merged.reshape(-1), p[group].mean(0))
        assert float(merged.sum()) == pytest.approx(1.0, abs=1e-5)


def test_presets_differ_and_explicit_arguments_override():
    released, intended = Seg4Diff(), Seg4Diff(preset="intended")
    assert (released.normalize, released.kl_threshold) == ("pixel", 0.1)
    assert (intended.normalize, intended.kl_threshold) == ("token", 0.035)
    assert (released.noise_step, released.seed) == (8, 42)
    mixed = Seg4Diff(preset="intended", kl_threshold=0.2, normalize="pixel")
    assert (mixed.normalize, mixed.kl_threshold) == ("pixel", 0.2)
    for seed in range(2):
        a = _blobs(seed=seed)
        n_released = len(released.merged_maps(a)[0])
        n_intended = len(intended.merged_maps(a)[0])
        # per-pixel normalisation flattens the maps (all merge); per-token keeps them apart
        assert n_released <= 3 < 10 <= n_intended
    with pytest.raises(ValueError, match="preset"):
        Seg4Diff(preset="paper")
    with pytest.raises(ValueError, match="normalize"):
        Seg4Diff(normalize="row")


def test_segment_features_is_bilinear_then_argmax_at_any_size():
    seg = Seg4Diff(kl_threshold=1e-9)  # nothing merges: 77 maps
    a = _synthetic(b=2, side=8)
    maps = seg.merged_maps(a)
    assert [m.shape[0] for m in maps] == [77, 77]
    labels = seg.segment_features(a, output_size=(20, 30))
    assert labels.shape == (2, 20, 30) and labels.dtype == torch.int64
    up = F.interpolate(maps[1][None], size=(20, 30), mode="bilinear", align_corners=False)[0]
    assert torch.equal(labels[1], up.argmax(0))
    assert seg.segment_features(a, output_size=12).shape == (2, 12, 12)


# ---- inputs ----------------------------------------------------------------------------------


def test_resize_pad_and_stretch():
    assert seg4diff_size(480, 640) == (640, 853)
    assert seg4diff_size(1024, 2048) == (640, 1280)
    assert seg4diff_size(100, 5000) == (51, 2560)  # the long side caps the scale
    white = np.full((480, 640, 3), 255, np.uint8)
    x, size = seg4diff_image(white)
    assert size == (640, 853) and x.shape == (3, 1024, 1024)
    # 853 -> 864 columns: 11 black columns on the right, stretched with the rest
    assert float(x[:, :, 0].min()) == pytest.approx(1.0)
    assert float(x[:, :, -1].max()) == pytest.approx(-1.0)
    assert float(x[:, -1, 0].min()) == pytest.approx(1.0)  # 640 rows: no vertical padding
    label = np.arange(480 * 640).reshape(480, 640) % 7
    assert seg4diff_label(label).shape == (640, 853)


# ---- the API on tiny MM-DiTs ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sd3():
    return build_backbone("tiny_sd3")


def test_features_one_transformer_call_and_layer_for(tiny_sd3):
    seg = Seg4Diff()
    assert seg.layer_for(tiny_sd3) == 9
    calls = []
    handle = tiny_sd3.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        images = torch.rand(1, 3, 1024, 1024) * 2 - 1
        attn = seg.features(tiny_sd3, images)
    finally:
        handle.remove()
    assert calls == [1]
    assert attn.shape == (1, 4096, 77) and attn.dtype == torch.float32
    assert torch.all(attn.sum(-1) < 1)  # most mass goes to image keys and the zero-T5 keys
    maps = seg.merged_maps(attn)
    assert len(maps) == 1 and maps[0].shape[1:] == (64, 64)
    labels = seg.segment_features(attn, output_size=(40, 50))
    assert labels.shape == (1, 40, 50) and int(labels.max()) < max(m.shape[0] for m in maps)
    with pytest.raises(ValueError, match="layer 12 does not exist"):
        Seg4Diff(layer=12).layer_for(tiny_sd3)


def test_flux_needs_an_explicit_layer():
    flux = build_backbone("tiny_flux")
    with pytest.raises(ValueError, match="pins no layer"):
        Seg4Diff().layer_for(flux)
    assert Seg4Diff(layer=3).layer_for(flux) == 3
    request = Seg4Diff(layer=3).feature_request(flux)
    assert request.joint_blocks == (3,) and request.joint_tokens == tuple(range(77))


def test_run_py_method_seg4diff_on_a_folder(tmp_path):
    """The command users type, end to end in a subprocess."""
    import os
    import subprocess
    import sys

    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(folder / "a.png")
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "run.py", "method=seg4diff", "backbone=tiny_sd3", "dataset=folder",
           f"dataset.path={folder}", "logger=none", "num_workers=0", "image_size=512",
           "resolution=64", f"hydra.run.dir={tmp_path / 'r'}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert res["method"]["name"] == "seg4diff" and res["method"]["preset"] == "released"
    assert res["random_weights"] and "RANDOM WEIGHTS" in proc.stdout
    assert res["dataset"]["preprocessing"] == "seg4diff"  # the protocol's: the whole photo
    assert "shortest side 64" in proc.stdout


def test_method_config_composes_with_the_sd3_backbone():
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["method=seg4diff"])
    assert cfg.backbone.name == "sd3" and cfg.method._target_ == "diffseg.Seg4Diff"
    assert cfg.image_size == 1024


def test_readme_seg4diff_snippet_runs_on_tiny_sd3(monkeypatch):
    import re

    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    code = next(b for b in blocks if "Seg4Diff" in b)
    real = 'build_backbone("sd3", device=device, dtype=torch.float16)'
    assert real in code
    code = code.replace(real, 'build_backbone("tiny_sd3", device=device)')
    scope = {"torch": torch, "device": "cpu"}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["attn"].shape == (1, 4096, 77)
    assert scope["labels"].shape == (1, 640, 853) and scope["labels"].dtype == torch.int64


def test_crop_alignment_drops_the_padded_part_of_the_grid():
    a = _synthetic(b=1, side=8, seed=2)
    stretch = Seg4Diff(kl_threshold=1e-9).segment_features(a, (40, 50))
    crop = Seg4Diff(kl_threshold=1e-9, align="crop").segment_features(a, (40, 50))
    maps = Seg4Diff(kl_threshold=1e-9).merged_maps(a)[0]
    up = F.interpolate(maps[None], size=(64, 64), mode="bilinear", align_corners=False)[0]
    assert torch.equal(crop[0], up.argmax(0)[:40, :50])  # padded to 64 x 64, then cropped
    assert not torch.equal(stretch, crop)
    same = Seg4Diff(kl_threshold=1e-9, align="crop").segment_features(a, (64, 64))
    assert torch.equal(same, Seg4Diff(kl_threshold=1e-9).segment_features(a, 64))


def test_a_threshold_and_layer_sweep_on_coco_takes_one_pass_per_image(tiny_sd3, tmp_path):
    from diffseg.tasks.evaluate import evaluate
    from diffseg.testing import fakedata

    root = tmp_path / "coco"
    fakedata.write_cocostuff(root, n=2, size=(40, 52), seed=1)
    calls = []

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def extract(self, images, request):
            calls.append(images.shape[0])
            return self.inner.extract(images, request)

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "method=seg4diff", "backbone=tiny_sd3", f"dataset.root={root}",
            "dataset.curated=false", "logger=none", "num_workers=0", "resolution=64",
            "+sweep.kl_threshold=[0.035,0.1]", "+sweep.layer=[8,9]"])  # fmt: skip
    out = evaluate(cfg, tmp_path / "run", backbone=Counting(tiny_sd3))
    assert calls == [1, 1]  # one transformer pass per image serves every setting
    assert len(out["results"]) == 4
    name = next(k for k in out["results"] if "kl_threshold=0.1" in k and "layer=9" in k)
    res = json.loads((tmp_path / "run" / name / "results.json").read_text())
    assert res["method"]["kl_threshold"] == 0.1 and res["method"]["layer"] == 9
    assert res["resolution"] == 64
    assert 0 <= res["miou"] <= 100 and res["complete"]


@pytest.mark.parametrize(
    ("backbone", "message"),
    [
        ("tiny", "needs an MM-DiT backbone"),  # a UNet has no joint attention
        ("tiny_flux", "method seg4diff: Seg4Diff pins no layer"),  # no block pinned on FLUX
    ],
)
def test_a_run_that_cannot_read_a_block_stops_before_any_image(tmp_path, backbone, message):
    from PIL import Image

    from diffseg.errors import ConfigError
    from diffseg.tasks.evaluate import evaluate

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "a.png")
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "method=seg4diff", f"backbone={backbone}", "dataset=folder",
            f"dataset.path={folder}", "logger=none", "image_size=512"])  # fmt: skip
    with pytest.raises(ConfigError, match=message):
        evaluate(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "results.json").exists()


def test_sd35_needs_an_explicit_layer_as_flux_does():
    """The release pins no block for SD3.5 (nor FLUX): only SD3-medium reads block 9 unasked."""
    sd35 = build_backbone("tiny_sd35")
    with pytest.raises(ValueError, match="pins no layer"):
        Seg4Diff().check_backbone(sd35)
    Seg4Diff(layer=9).check_backbone(sd35)
    Seg4Diff().check_backbone(build_backbone("tiny_sd3"))  # SD3-medium: block 9
