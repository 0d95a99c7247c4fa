"""The capture processors of diffseg/attention.py mirror diffusers' stock ``AttnProcessor2_0``:
on every attention module of each backbone family (SD v1 tiny, SDXL tiny), with the same inputs,
they give the stock output. Run against the diffusers version pyproject.toml pins (upper bound
included), so a diffusers release that changes the stock processor fails here first."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import pytest
import tomllib
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from packaging.requirements import Requirement
from packaging.version import Version

from diffseg.attention import (
    AttentionStore,
    CrossAttentionCaptureProcessor,
    SelfAttentionCaptureProcessor,
    TrajectoryProcessor,
    TrajectoryStore,
    cross_attention_layers,
    self_attention_layers,
)
from diffseg.backbones import model_configs

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["tiny", "tiny_sdxl"])
def unet(request) -> UNet2DConditionModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return UNet2DConditionModel(**model_configs(request.param)["unet"]).eval()


def _self_inputs(attn, side: int = 8, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(side)
    return torch.randn(batch, side * side, attn.to_q.in_features, generator=g)


def _context(attn, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randn(batch, 77, attn.to_k.in_features, generator=g)


def _stock(attn, *args, **kwargs) -> torch.Tensor:
    attn.set_processor(AttnProcessor2_0())
    return attn(*args, **kwargs)


@torch.no_grad()
def test_self_attention_capture_equals_the_stock_processor(unet):
    layers = self_attention_layers(unet)
    assert layers, "no self-attention layer found"
    for name, attn in layers.items():
        x = _self_inputs(attn)
        want = _stock(attn, x)
        attn.set_processor(SelfAttentionCaptureProcessor(AttentionStore(), name, output="sdpa"))
        torch.testing.assert_close(attn(x), want, rtol=0, atol=0, msg=f"{name} (sdpa)")
        attn.set_processor(SelfAttentionCaptureProcessor(AttentionStore(), name, output="probs"))
        torch.testing.assert_close(attn(x), want, rtol=1e-5, atol=1e-6, msg=f"{name} (probs)")
        attn.set_processor(AttnProcessor2_0())


@torch.no_grad()
def test_cross_attention_and_trajectory_capture_equal_the_stock_processor(unet):
    layers = cross_attention_layers(unet)
    assert layers, "no cross-attention layer found"
    for name, attn in layers.items():
        x, ctx = _self_inputs(attn), _context(attn)
        want = _stock(attn, x, encoder_hidden_states=ctx)
        store = AttentionStore()
        attn.set_processor(CrossAttentionCaptureProcessor(store, name, (1, 3), AttnProcessor2_0()))
        assert torch.equal(attn(x, encoder_hidden_states=ctx), want), name
        trajectory = TrajectoryStore(tokens=(1, 3), guidance=True)
        attn.set_processor(TrajectoryProcessor(trajectory, name, AttnProcessor2_0()))
        assert torch.equal(attn(x, encoder_hidden_states=ctx), want), name
        # what both recorded: the same float32 probabilities of the conditional image
        cross = store.cross_maps()[8][1]  # (N, 2) head mean
        recorded = trajectory.mean(name)[0].T / attn.heads  # (N, 2) head sum / heads
        torch.testing.assert_close(recorded, cross, rtol=1e-5, atol=1e-7)
        attn.set_processor(AttnProcessor2_0())
    for name, attn in self_attention_layers(unet).items():
        x = _self_inputs(attn)
        want = _stock(attn, x)
        attn.set_processor(
            TrajectoryProcessor(TrajectoryStore(guidance=False), name, AttnProcessor2_0())
        )
        assert torch.equal(attn(x), want), name
        attn.set_processor(AttnProcessor2_0())


def test_the_installed_diffusers_is_inside_the_pinned_range():
    """The equality above was checked against this diffusers; the pin keeps users on it."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [Requirement(d) for d in deps if Requirement(d).name == "diffusers"]
    assert any(s.operator == "<" for s in spec.specifier), "diffusers needs an upper bound"
    assert Version(version("diffusers")) in spec.specifier
    conda = (REPO / "environment.yml").read_text()
    pinned = re.search(r"- diffusers([<>=,.\d]+)", conda)
    assert pinned and Requirement(f"diffusers{pinned.group(1)}").specifier == spec.specifier
