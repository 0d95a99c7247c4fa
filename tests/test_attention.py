"""The self-attention capture processor (diffseg/attention.py) on tiny random diffusers models."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from diffseg.attention import (
    AttentionStore,
    SelfAttentionCaptureProcessor,
    capture_self_attention,
    self_attention_layers,
)
from diffseg.backbones import model_configs

# A tiny SD 2.x-like layout: linear projections in the transformers, a different head count per
# level (diffusers' `attention_head_dim` list is the number of heads), attention upcast.
SD2_LIKE = dict(
    model_configs("tiny")["unet"],
    attention_head_dim=(2, 4, 4, 4),
    use_linear_projection=True,
    upcast_attention=True,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _unet(config: dict, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).eval()


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    return _unet(model_configs("tiny")["unet"])


def _inputs(unet: UNet2DConditionModel, batch: int = 2, side: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(batch, unet.config.in_channels, side, side, generator=g)
    context = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    timestep = torch.full((batch,), 300, dtype=torch.long)
    return latent, timestep, context


def _reference_maps(unet, latent, timestep, context) -> dict[int, torch.Tensor]:
    """softmax(Q K^T / sqrt(d)) recomputed from each attn1's own input and projections (hooks),
    then per resolution: mean over layers, then over heads (docs/diffseg.md section 3)."""
    per_layer: dict[int, list[torch.Tensor]] = {}
    handles = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        assert kwargs.get("encoder_hidden_states") is None
        b, n, _ = hidden.shape
        q = module.to_q(hidden).double()
        k = module.to_k(hidden).double()
        d = q.shape[-1] // module.heads
        q = q.view(b, n, module.heads, d).transpose(1, 2)
        k = k.view(b, n, module.heads, d).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)  # (B, h, N, N)
        per_layer.setdefault(math.isqrt(n), []).append(probs)

    for module in self_attention_layers(unet).values():
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            unet(latent, timestep, encoder_hidden_states=context)
    finally:
        for h in handles:
            h.remove()
    return {r: torch.stack(v).mean(0).mean(1).float() for r, v in per_layer.items()}


def _captured(unet, latent, timestep, context, **kwargs):
    store = AttentionStore()
    with torch.no_grad(), capture_self_attention(unet, store, **kwargs):
        out = unet(latent, timestep, encoder_hidden_states=context).sample
    return out, store


@pytest.mark.parametrize("output", ["probs", "sdpa"])
def test_unet_output_unchanged_by_capture(unet, output):
    latent, timestep, context = _inputs(unet, batch=1)
    with torch.no_grad():
        plain = unet(latent, timestep, encoder_hidden_states=context).sample
    captured, store = _captured(unet, latent, timestep, context, output=output)
    assert store.maps(), "nothing was captured"
    torch.testing.assert_close(captured, plain, rtol=1e-4, atol=1e-5)


def test_maps_equal_independent_softmax_and_inventory(unet):
    latent, timestep, context = _inputs(unet)
    reference = _reference_maps(unet, latent, timestep, context)
    # A chunk budget that leaves ragged chunks exercises the query chunking.
    _, store = _captured(unet, latent, timestep, context, chunk_elements=20000)
    maps = store.maps()
    assert list(maps) == [16, 8, 4, 2]  # latent 16x16, SD v1 layout
    assert {r: len(v) for r, v in store.layer_inventory.items()} == {16: 5, 8: 5, 4: 5, 2: 1}
    expected_names = set(self_attention_layers(unet))
    assert {n for v in store.layer_inventory.values() for n in v} == expected_names
    assert all(".attn1.processor" in n for n in expected_names) and len(expected_names) == 16
    for r, m in maps.items():
        assert m.dtype == torch.float32 and m.shape == (2, r * r, r * r)
        torch.testing.assert_close(m, reference[r], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(m.sum(-1), torch.ones(2, r * r), rtol=0, atol=1e-5)


def test_processors_installed_only_on_self_attention_and_restored(unet):
    before = dict(unet.attn_processors)
    seen = {}
    store = AttentionStore()
    with capture_self_attention(unet, store):
        seen = dict(unet.attn_processors)
    for name, proc in seen.items():
        if name.endswith("attn1.processor"):
            assert isinstance(proc, SelfAttentionCaptureProcessor) and proc.store is store
        else:  # cross-attention (attn2) keeps the very same processor object
            assert "attn2" in name and proc is before[name]
    assert dict(unet.attn_processors) == before


def test_processors_restored_after_an_error(unet):
    before = dict(unet.attn_processors)
    with pytest.raises(RuntimeError, match="boom"):
        with capture_self_attention(unet, AttentionStore()):
            raise RuntimeError("boom")
    assert dict(unet.attn_processors) == before


def test_store_rejects_batch_change_between_layers():
    store = AttentionStore()
    store.accumulator(4, 2, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="reset"):
        store.accumulator(4, 3, torch.device("cpu"))


def test_sd2_like_layout_head_counts_and_upcast():
    unet = _unet(SD2_LIKE)
    latent, timestep, context = _inputs(unet, batch=1)
    with torch.no_grad():
        plain = unet(latent, timestep, encoder_hidden_states=context).sample
    captured, store = _captured(unet, latent, timestep, context)
    torch.testing.assert_close(captured, plain, rtol=1e-4, atol=1e-5)
    reference = _reference_maps(unet, latent, timestep, context)
    heads = {m.heads for m in self_attention_layers(unet).values()}
    assert heads == {2, 4}
    for r, m in store.maps().items():
        torch.testing.assert_close(m, reference[r], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_low_precision_model_gives_float32_maps(unet, dtype):
    low = _unet(model_configs("tiny")["unet"]).to(dtype)
    latent, timestep, context = _inputs(unet, batch=1)
    _, store32 = _captured(unet, latent, timestep, context)
    _, store_low = _captured(low, latent.to(dtype), timestep, context.to(dtype))
    for r, m in store_low.maps().items():
        assert m.dtype == torch.float32
        torch.testing.assert_close(m.sum(-1), torch.ones_like(m.sum(-1)), rtol=0, atol=1e-5)
        # Same weights (seed 0) in bf16: the maps agree with fp32 up to bf16 activations.
        assert (m - store32.maps()[r]).abs().max() < 0.05


def _standalone_attention(**kwargs) -> Attention:
    torch.manual_seed(0)
    return Attention(query_dim=16, heads=2, dim_head=8, **kwargs).eval()


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        ({}, (2, 25, 16)),
        # VAE-style: 4-D input, group norm, residual, rescale
        (
            {"norm_num_groups": 4, "residual_connection": True, "rescale_output_factor": 2.0},
            (2, 16, 5, 5),
        ),
    ],
)
@pytest.mark.parametrize("output", ["probs", "sdpa"])
def test_standalone_layer_matches_default_processors(kwargs, shape, output):
    attn = _standalone_attention(bias=True, **kwargs)
    x = torch.randn(*shape)
    with torch.no_grad():
        attn.set_processor(AttnProcessor())
        ref_classic = attn(x)
        attn.set_processor(AttnProcessor2_0())
        ref = attn(x)
        store = AttentionStore()
        attn.set_processor(SelfAttentionCaptureProcessor(store, "layer", output=output))
        got = attn(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, ref_classic, rtol=1e-4, atol=1e-5)
    assert store.layer_inventory == {5: ["layer"]}


def test_attention_mask_is_applied_like_the_default_processor():
    attn = _standalone_attention()
    x = torch.randn(2, 16, 16)
    mask = torch.zeros(2, 16)
    mask[:, 10:] = -10000.0  # keys 10.. masked out
    with torch.no_grad():
        attn.set_processor(AttnProcessor2_0())
        ref = attn(x, attention_mask=mask)
        store = AttentionStore()
        attn.set_processor(SelfAttentionCaptureProcessor(store, "layer"))
        got = attn(x, attention_mask=mask)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    maps = store.maps()[4]
    assert maps[:, :, 10:].max() < 1e-6
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 16), rtol=0, atol=1e-5)


def test_cross_attention_call_goes_to_fallback():
    attn = _standalone_attention(cross_attention_dim=12)
    x, ctx = torch.randn(1, 9, 16), torch.randn(1, 7, 12)
    with torch.no_grad():
        attn.set_processor(AttnProcessor2_0())
        ref = attn(x, encoder_hidden_states=ctx)
        store = AttentionStore()
        attn.set_processor(SelfAttentionCaptureProcessor(store, "x", fallback=AttnProcessor2_0()))
        got = attn(x, encoder_hidden_states=ctx)
    torch.testing.assert_close(got, ref)
    assert store.maps() == {}


def test_non_square_token_grid_is_rejected():
    attn = _standalone_attention()
    attn.set_processor(SelfAttentionCaptureProcessor(AttentionStore(), "layer"))
    with pytest.raises(RuntimeError, match="square"), torch.no_grad():
        attn(torch.randn(1, 12, 16))
