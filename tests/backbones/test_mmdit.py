"""MM-DiT backbones (SD3, SD3.5, FLUX): layouts, noise level, and the joint-attention capture
checked against an independent computation (all heads at once, softmax over all keys)."""

from __future__ import annotations

import math

import pytest
import torch

from diffseg.backbones import BACKBONES, WeightsNotFoundError, build_backbone
from diffseg.backbones.mmdit import MAX_SEQUENCE_LENGTH
from diffseg.features import FeatureRequest, merge_requests

SIZE = 256  # 16 x 16 image tokens: the capture is size-agnostic, and small is fast


@pytest.fixture(scope="module")
def backbones():
    return {name: build_backbone(name) for name in ("tiny_sd3", "tiny_sd35", "tiny_flux")}


def _images(b: int = 2, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


# ---- layouts ---------------------------------------------------------------------------------


def test_registry_and_layouts(backbones):
    sd3, sd35, flux = backbones["tiny_sd3"], backbones["tiny_sd35"], backbones["tiny_flux"]
    for name in ("sd3", "sd35", "flux", "flux_schnell", "sd3_random", "flux_random"):
        assert name in BACKBONES
    assert sd3.num_blocks >= 10 and sd35.num_blocks >= 10
    assert sd3.grid_of(1024) == 64 and flux.grid_of(1024) == 64
    assert sd3.text_encoder_3 is None and sd3.tokenizer_3 is None
    assert type(sd3.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    blocks = sd35.transformer.transformer_blocks
    assert blocks[0].attn.norm_q is not None and blocks[0].attn2 is not None
    assert sd3.transformer.transformer_blocks[0].attn.norm_q is None
    assert flux.num_double_blocks >= 1 and flux.num_blocks > flux.num_double_blocks
    for bb in (sd3, flux):
        assert {"transformer", "vae", "scheduler", "text_encoder", "text_encoder_2"} <= set(
            vars(bb)
        )


def test_config_overrides_truncate_the_stack_and_keep_the_shapes(backbones):
    from diffseg.backbones import FluxBackbone

    parts = {"transformer": {"num_layers": 1, "num_single_layers": 1}}
    cut = FluxBackbone.from_config("tiny_flux", config_overrides=parts)
    full = backbones["tiny_flux"]
    assert (cut.num_double_blocks, cut.num_blocks) == (1, 2)
    assert (full.num_double_blocks, full.num_blocks) == (2, 4)
    # same widths, heads and RoPE axes; the kept blocks are those of the full model (same seed)
    for key in ("attention_head_dim", "num_attention_heads", "axes_dims_rope"):
        assert cut.transformer.config[key] == full.transformer.config[key]
    torch.testing.assert_close(
        cut.transformer.transformer_blocks[0].attn.to_q.weight,
        full.transformer.transformer_blocks[0].attn.to_q.weight,
    )
    with pytest.raises(ValueError, match="'tiny_flux' has no part 'unet'; its parts: "):
        FluxBackbone.from_config("tiny_flux", config_overrides={"unet": {"num_layers": 1}})


def test_sd3_conditioning_is_77_clip_plus_77_zero_t5(backbones):
    sd3 = backbones["tiny_sd3"]
    embeds, pooled = sd3.prompt_conditioning("")
    joint = sd3.transformer.config.joint_attention_dim
    assert embeds.shape == (1, 2 * MAX_SEQUENCE_LENGTH, joint)
    assert torch.all(embeds[:, MAX_SEQUENCE_LENGTH:] == 0)  # the absent T5's slot
    clip = sd3.text_encoder.config.hidden_size + sd3.text_encoder_2.config.hidden_size
    assert torch.all(embeds[:, :MAX_SEQUENCE_LENGTH, clip:] == 0)  # zero-padded channels
    assert embeds[:, :MAX_SEQUENCE_LENGTH, :clip].abs().sum() > 0
    assert pooled.shape == (1, sd3.transformer.config.pooled_projection_dim)


def test_noise_levels_follow_the_schedulers(backbones):
    # SD3: shift 3 applied twice by diffusers, index 20 of 28 (spec section 2)
    sigma, t = backbones["tiny_sd3"].noise_level(28, 8)
    s_min = 3 * 0.001 / (1 + 2 * 0.001)
    u = 1 - 20 * (1 - s_min) / 27
    assert sigma == pytest.approx(3 * u / (1 + 2 * u), abs=1e-6)
    assert sigma == pytest.approx(0.5150721, abs=1e-6) and t == pytest.approx(515.0721, abs=1e-3)
    # FLUX: 50 sigmas linspace(1, 1/50), dynamic shift with mu from 4096 tokens (1.15)
    sigma, _ = backbones["tiny_flux"].noise_level(50, 8, image_size=1024)
    s = 1 - 42 * (1 - 1 / 50) / 49
    assert sigma == pytest.approx(math.exp(1.15) / (math.exp(1.15) + (1 / s - 1)), abs=1e-6)
    assert sigma == pytest.approx(0.375609, abs=1e-5)
    with pytest.raises(ValueError, match="noise_step"):
        backbones["tiny_sd3"].noise_level(28, 29)


def test_flow_noising_is_one_seeded_draw_shared_by_the_batch(backbones):
    sd3 = backbones["tiny_sd3"]
    z = torch.randn(2, 16, 8, 8)
    x = sd3.add_noise(z, 0.25, seed=3)
    e = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(x, 0.25 * e + 0.75 * z)
    torch.testing.assert_close(sd3.add_noise(z, 0.25, seed=3), x)


# ---- capture against an independent computation -----------------------------------------------


def _attn_inputs(backbone, block: int, images, request):
    """The keyword inputs of block ``block``'s attention during a plain pass."""
    seen = {}
    attn = backbone.blocks[block].attn

    def pre(_module, args, kwargs):
        seen.update(kwargs)
        if args:
            seen["hidden_states"] = args[0]

    handle = attn.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        backbone.extract(images, FeatureRequest(modules=(f"block.{block}",), **request))
    finally:
        handle.remove()
    return attn, seen


def _reference(backbone, block: int, images, request, tokens):
    """Joint probabilities of all heads at once: (text columns, image block), head-mean fp32."""
    from diffusers.models.embeddings import apply_rotary_emb

    attn, kw = _attn_inputs(backbone, block, images, request)
    x, c = kw["hidden_states"].float(), kw.get("encoder_hidden_states")
    heads = attn.heads
    b = x.shape[0]

    def heads_first(t):  # (B, S, H*d) -> (B, S, H, d)
        return t.reshape(b, t.shape[1], heads, -1)

    def norm(module, t):  # norms act on the last axis: same in (B,S,H,d) and (B,H,S,d)
        return t if module is None else module(t)

    q = norm(attn.norm_q, heads_first(attn.to_q(x)))
    k = norm(attn.norm_k, heads_first(attn.to_k(x)))
    if c is not None:
        cq = norm(attn.norm_added_q, heads_first(attn.add_q_proj(c)))
        ck = norm(attn.norm_added_k, heads_first(attn.add_k_proj(c)))
        order = (cq, q) if backbone.text_first else (q, cq)
        q = torch.cat(order, dim=1)
        k = torch.cat((ck, k) if backbone.text_first else (k, ck), dim=1)
    if kw.get("image_rotary_emb") is not None:
        q = apply_rotary_emb(q, kw["image_rotary_emb"], sequence_dim=1)
        k = apply_rotary_emb(k, kw["image_rotary_emb"], sequence_dim=1)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
    probs = scores.softmax(-1).mean(1)  # (B, S, S)
    s = probs.shape[-1]
    if backbone.text_first:
        img, txt = slice(MAX_SEQUENCE_LENGTH, s), 0
    else:
        n_img = x.shape[1]
        img, txt = slice(0, n_img), n_img
    rows = probs[:, img]
    return rows[..., [txt + t for t in tokens]], rows[..., img]


CASES = [
    ("tiny_sd3", 9),
    ("tiny_sd35", 2),  # a dual-attention block with qk RMS norms
    ("tiny_flux", 1),  # a double block (RoPE, text first)
    ("tiny_flux", 3),  # a single block (concatenated input)
]


@pytest.mark.parametrize(("name", "block"), CASES)
def test_capture_equals_independent_computation(backbones, name, block):
    bb = backbones[name]
    images = _images()
    tokens = (0, 1, 5, 76)
    request = {"noise_seed": 42}
    got = bb.extract(
        images,
        FeatureRequest(joint_blocks=(block,), joint_tokens=tokens, joint_image=True, **request),
    )
    text, image = _reference(bb, block, images, request, tokens)
    grid = bb.grid_of(SIZE)
    assert got.joint_text[block].shape == (2, grid * grid, len(tokens))
    assert got.joint_text[block].dtype == torch.float32
    torch.testing.assert_close(got.joint_text[block], text, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.joint_image[block], image, rtol=1e-5, atol=1e-7)
    total = got.joint_image[block].sum(-1)
    assert torch.all(total < 1) and torch.all(total > 0)


@pytest.mark.parametrize("name", ["tiny_sd3", "tiny_flux"])
def test_capture_leaves_the_model_output_unchanged(backbones, name):
    from diffseg.backbones.mmdit_capture import JointAttentionCapture

    bb = backbones[name]
    z = bb.encode(_images(1))
    kwargs = bb.transformer_inputs(z.to(bb.dtype), 500.0) | bb.conditioning(1)
    with torch.inference_mode():
        plain = bb.transformer(**kwargs, return_dict=False)[0]
        capture = JointAttentionCapture(
            bb.blocks, (0, bb.num_blocks - 1), (0,), True, text_first=bb.text_first,
            text_len=MAX_SEQUENCE_LENGTH, stop_early=False,
        )  # fmt: skip
        with capture.installed():
            captured = bb.transformer(**kwargs, return_dict=False)[0]
    assert torch.equal(plain, captured)
    assert set(capture.store.text) == {0, bb.num_blocks - 1}


def test_block_output_and_early_stop(backbones):
    bb = backbones["tiny_sd3"]
    ran = []
    handles = [blk.register_forward_hook(lambda *_a, i=i: ran.append(i))
               for i, blk in enumerate(bb.blocks)]  # fmt: skip
    try:
        feats = bb.extract(_images(1), FeatureRequest(modules=("block.3",), noise_seed=0))
    finally:
        for h in handles:
            h.remove()
    assert ran == [0, 1, 2, 3]  # stopped after the last block needed
    assert feats.modules["block.3"].shape == (1, bb.grid_of(SIZE) ** 2, 16)
    assert feats.sigma == pytest.approx(0.5150721, abs=1e-6)


@pytest.mark.parametrize(("name", "block"), [("tiny_sd3", 4), ("tiny_flux", 1), ("tiny_flux", 3)])
def test_a_pass_for_attention_only_stops_inside_the_last_block(backbones, name, block):
    """Only the probabilities of the last block are needed: its attention output and MLP never
    run, and what is recorded equals a pass that runs the block whole."""
    bb = backbones[name]
    ff = bb.blocks[block].ff if hasattr(bb.blocks[block], "ff") else bb.blocks[block].proj_out
    ran = []
    handle = ff.register_forward_hook(lambda *_a: ran.append(block))
    request = FeatureRequest(joint_blocks=(block,), joint_tokens=(0, 3), noise_seed=1)
    try:
        inside = bb.extract(_images(1), request)
    finally:
        handle.remove()
    assert ran == []
    whole = bb.extract(
        _images(1),
        FeatureRequest(
            joint_blocks=(block,), joint_tokens=(0, 3), modules=(f"block.{block}",), noise_seed=1
        ),
    )
    assert torch.equal(inside.joint_text[block], whole.joint_text[block])


def test_one_pass_per_noise_level_and_bad_requests(backbones):
    a = FeatureRequest(joint_blocks=(9,), joint_tokens=(0,), noise_seed=42, noise_step=8)
    b = FeatureRequest(modules=("block.2",), noise_seed=42, noise_step=8)
    c = FeatureRequest(modules=("block.2",), noise_seed=42, noise_step=5)
    assert len(merge_requests([a, b])) == 1 and len(merge_requests([a, c])) == 2
    bb = backbones["tiny_sd3"]
    with pytest.raises(ValueError, match="no block 10"):
        bb.check_request(FeatureRequest(joint_blocks=(10,)))
    with pytest.raises(ValueError, match="joint attention"):
        bb.check_request(FeatureRequest(self_attention="all"))


@pytest.mark.parametrize("name", ["sd3", "sd35", "flux", "flux_schnell"])
def test_hub_backbones_fail_offline_with_one_weights_error(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as info:
        build_backbone(name)
    message = str(info.value)
    assert BACKBONES[name].model_id in message and "\n" not in message
    assert "transformer/" in message  # the MM-DiT layout is named in the fix


def test_local_folder_missing_parts_is_one_weights_error(tmp_path):
    (tmp_path / "vae").mkdir()
    with pytest.raises(WeightsNotFoundError, match="transformer/"):
        build_backbone("sd3", path=str(tmp_path))


@pytest.mark.parametrize(("name", "registered"), [("tiny_sd3", "sd3"), ("tiny_flux", "flux")])
def test_local_folder_in_the_diffusers_layout_loads_the_same_model(
    backbones, tmp_path, name, registered
):
    bb = backbones[name]
    for part in ("transformer", "vae", "scheduler", "text_encoder", "text_encoder_2",
                 "tokenizer", "tokenizer_2"):  # fmt: skip
        getattr(bb, part).save_pretrained(tmp_path / part)
    loaded = build_backbone(registered, path=str(tmp_path))
    assert loaded.model_id == str(tmp_path) and not loaded.is_random
    request = FeatureRequest(joint_blocks=(1,), joint_tokens=(0, 3), noise_seed=1)
    images = _images(1)
    want, got = bb.extract(images, request), loaded.extract(images, request)
    torch.testing.assert_close(got.joint_text[1], want.joint_text[1], rtol=1e-5, atol=1e-7)


def test_flux_conditioning_is_t5_at_77_tokens_and_pooled_clip(backbones):
    flux = backbones["tiny_flux"]
    embeds, pooled, text_ids = flux.prompt_conditioning("")
    assert embeds.shape == (1, MAX_SEQUENCE_LENGTH, flux.text_encoder_2.config.d_model)
    assert pooled.shape == (1, flux.text_encoder.config.hidden_size)
    assert text_ids.shape == (MAX_SEQUENCE_LENGTH, 3) and torch.all(text_ids == 0)
    ids = flux.tokenizer_2("", padding="max_length", max_length=MAX_SEQUENCE_LENGTH).input_ids
    assert ids[:2] == [1, 0]  # </s>, then padding, as T5's tokenizer gives the empty prompt


def test_a_misspelled_argument_is_refused_not_ignored():
    """A typo must not silently build something else (e.g. the full 12B FLUX instead of a
    truncated stack)."""
    from diffseg.backbones.mmdit import SD3Backbone

    with pytest.raises(TypeError, match="config_overides"):
        SD3Backbone.from_config("tiny_sd3", config_overides={"transformer": {"num_layers": 2}})
