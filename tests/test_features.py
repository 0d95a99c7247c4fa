"""Feature requests served by one UNet pass: module outputs, early stop, noise, conditioning,
cross-attention, on the tiny SD v1 and SDXL-shaped backbones."""

from __future__ import annotations

import pytest
import torch

from diffseg.backbones import SDXLBackbone, StableDiffusionBackbone, build_backbone
from diffseg.features import ALL, LAST_ENCODER_SELF_ATTENTION, FeatureRequest, merge_requests

pytestmark = pytest.mark.usefixtures("one_thread")

SDXL_SIDE = 256  # tiny SDXL at 256 px: latent 32, grids 16 and 8 (1024 px gives 64 and 32)


@pytest.fixture(scope="module")
def sdxl() -> SDXLBackbone:
    return build_backbone("tiny_sdxl")


@pytest.fixture(scope="module")
def sd() -> StableDiffusionBackbone:
    return build_backbone("tiny")


def _images(batch: int, side: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, side, side, generator=g) * 2 - 1


def test_registry_builds_families_and_native_sizes(sd, sdxl):
    assert isinstance(sd, StableDiffusionBackbone) and sd.image_size == 512
    assert isinstance(sdxl, SDXLBackbone) and sdxl.image_size == 1024
    assert sdxl.vae_dtype == torch.float32 and sdxl.is_random and "RANDOM" in sdxl.name
    assert sdxl.grids == [64, 32]  # SDXL: attention on two grids at 1024 px
    assert sd.grids == [64, 32, 16, 8]
    with pytest.raises(ValueError, match="unknown backbone 'nope'"):
        build_backbone("nope")


def test_requested_module_equals_a_forward_hook_and_later_modules_never_run(sdxl):
    name = sdxl.resolve_module(LAST_ENCODER_SELF_ATTENTION)
    last = sdxl.unet.down_blocks[-1].attentions[-1].transformer_blocks[-1].attn1
    assert sdxl.unet.get_submodule(name) is last
    seen, later = {}, []
    handles = [last.register_forward_hook(lambda m, i, o: seen.setdefault("out", o.clone()))]
    for block in [*sdxl.unet.up_blocks, sdxl.unet.mid_block, sdxl.unet.conv_out]:
        handles.append(block.register_forward_hook(lambda m, i, o: later.append(type(m).__name__)))
    try:
        request = FeatureRequest(modules=(LAST_ENCODER_SELF_ATTENTION,), timestep=50, noise_seed=42)
        features = sdxl.extract(_images(2, SDXL_SIDE), request)
    finally:
        for h in handles:
            h.remove()
    out = features.modules[LAST_ENCODER_SELF_ATTENTION]
    torch.testing.assert_close(out, seen["out"].float(), rtol=0, atol=0)
    assert out.shape == (2, 8 * 8, sdxl.unet.config.block_out_channels[-1])
    assert later == []  # the mid block, the up blocks and conv_out stayed silent
    assert features.self_attention == {} and features.layers["modules"] == {
        LAST_ENCODER_SELF_ATTENTION: name
    }


def test_unet_input_is_scaled_mean_plus_seeded_noise_shared_by_the_batch(sdxl):
    images = _images(2, SDXL_SIDE, seed=3)
    seen = {}

    def grab(module, args, kwargs):
        seen["sample"], seen["t"] = args[0].clone(), args[1].clone()
        seen.update(kwargs)

    handle = sdxl.unet.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        sdxl.extract(images, FeatureRequest(modules=("down_blocks.1",), timestep=50, noise_seed=42))
    finally:
        handle.remove()
    with torch.no_grad():
        mean = sdxl.vae.encode(images).latent_dist.mean * 0.13025
    noise = torch.randn((1, *mean.shape[1:]), generator=torch.Generator().manual_seed(42))
    a = sdxl.scheduler.alphas_cumprod[50]
    expected = a.sqrt() * mean + (1 - a).sqrt() * noise
    torch.testing.assert_close(seen["sample"], expected, rtol=1e-5, atol=1e-5)
    assert seen["t"].tolist() == [50, 50]
    # conditioning as the SDXL pipeline builds it: both encoders' penultimate states, the pooled
    # embedding of the second, and (S, S, 0, 0, S, S) time ids for the native size S
    cond = seen["added_cond_kwargs"]
    assert cond["text_embeds"].shape == (2, sdxl.text_encoder_2.config.projection_dim)
    assert cond["time_ids"].tolist() == [[1024, 1024, 0, 0, 1024, 1024]] * 2
    ids = sdxl.tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        h1 = sdxl.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        out2 = sdxl.text_encoder_2(ids, output_hidden_states=True)
    torch.testing.assert_close(
        seen["encoder_hidden_states"][:1], torch.cat([h1, out2.hidden_states[-2]], dim=-1)
    )
    torch.testing.assert_close(cond["text_embeds"][:1], out2.text_embeds)


def test_self_attention_by_grid_and_diffseg_maps_on_sdxl(sdxl):
    images = _images(1, SDXL_SIDE)
    every = sdxl.extract(images, FeatureRequest(self_attention=ALL))
    assert list(every.self_attention) == [16, 8]
    coarse = sdxl.extract(images, FeatureRequest(self_attention=(8,)))
    assert list(coarse.self_attention) == [8]
    torch.testing.assert_close(coarse.self_attention[8], every.self_attention[8])
    rows = every.self_attention[16].sum(-1)
    torch.testing.assert_close(rows, torch.ones_like(rows))
    with pytest.raises(ValueError, match="no self-attention on grids \\[5\\]"):
        sdxl.extract(images, FeatureRequest(self_attention=(5,)))


def test_cross_attention_columns_match_an_explicit_softmax(sd):
    images = _images(1, 128)
    inputs = {}
    layers = [(n, m) for n, m in sd.unet.named_modules() if n.endswith("attn2")]

    def grab(name):
        def hook(module, args, kwargs):
            inputs.setdefault(name, (args[0], kwargs))  # returns None: inputs unchanged

        return hook

    handles = [m.register_forward_pre_hook(grab(n), with_kwargs=True) for n, m in layers]
    try:
        feats = sd.extract(images, FeatureRequest(cross_attention=(0, 2)))
    finally:
        for h in handles:
            h.remove()
    expected: dict[int, list[torch.Tensor]] = {}
    for name, module in layers:
        hidden, kwargs = inputs[name]
        ctx = kwargs["encoder_hidden_states"]
        q = module.to_q(hidden).unflatten(-1, (module.heads, -1)).transpose(1, 2)
        k = module.to_k(ctx).unflatten(-1, (module.heads, -1)).transpose(1, 2)
        probs = (q @ k.transpose(-1, -2) * module.scale).softmax(-1)[..., [0, 2]].mean(1)
        expected.setdefault(int(hidden.shape[1] ** 0.5), []).append(probs)
    assert list(feats.cross_attention) == [16, 8, 4, 2] and feats.tokens == (0, 2)
    for grid, maps in expected.items():
        torch.testing.assert_close(feats.cross_attention[grid], torch.stack(maps).mean(0))


def test_merge_requests_unions_by_pass_and_select_picks_images(sd):
    a = FeatureRequest(self_attention=(64,), timestep=300)
    b = FeatureRequest(self_attention=(32, 64), modules=("x",), timestep=300)
    c = FeatureRequest(modules=("y",), timestep=50, noise_seed=42)
    merged = merge_requests([a, b, c, FeatureRequest(self_attention=ALL, timestep=300)])
    assert [m.pass_key for m in merged] == [(300, None, ""), (50, 42, "")]
    assert merged[0].self_attention == ALL and merged[0].modules == ("x",)
    assert merge_requests([a, b])[0].self_attention == (64, 32)
    feats = sd.extract(_images(3, 128), FeatureRequest(self_attention=(16,)))
    picked = feats.select([2, 0])
    torch.testing.assert_close(picked.self_attention[16][0], feats.self_attention[16][2])
    assert picked.images.shape[0] == 2 and picked.batch_size == 2


def test_a_damaged_model_folder_is_one_weights_error(tmp_path):
    """A folder in the right layout whose files cannot be loaded: the family's message."""
    from diffseg.backbones import SDXLBackbone, WeightsNotFoundError

    for sub in ("vae", "unet", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        (tmp_path / sub).mkdir()
        if not sub.startswith("tokenizer"):
            (tmp_path / sub / "config.json").write_text("{not json")
    with pytest.raises(
        WeightsNotFoundError, match="Could not load the sdxl weights.*text_encoder_2"
    ):
        SDXLBackbone.from_pretrained(tmp_path)


def test_trajectory_request_averages_calls_of_the_conditional_rows(sd):
    """A trajectory request records over several UNet calls: the mean over calls of the
    conditional half (guidance) equals the mean of the calls on that half alone."""
    from diffseg.features import TrajectoryRequest

    unet = sd.unet
    cross = ("up_blocks.1.attentions.0.transformer_blocks.0.attn2",)
    selfs = ("up_blocks.2.attentions.0.transformer_blocks.0.attn1",)
    g = torch.Generator().manual_seed(3)
    calls = [
        (torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g), t)
        for t in (800, 200)
    ]
    guided = TrajectoryRequest(cross_attention=(1, 4), cross_layers=cross, self_layers=selfs)
    alone = TrajectoryRequest(
        cross_attention=(1, 4), cross_layers=cross, self_layers=selfs, guidance=False
    )
    with torch.no_grad(), guided.capture(unet) as both:
        for x, c, t in calls:
            unet(x, t, encoder_hidden_states=c)
    with torch.no_grad(), alone.capture(unet) as cond:
        for x, c, t in calls:
            unet(x[1:], t, encoder_hidden_states=c[1:])
    assert both.num_calls == cond.num_calls == 2
    assert both.cross_maps().shape == (1, 2, 2, 2)  # 2 tokens x 1 layer on a 2x2 grid
    torch.testing.assert_close(both.cross_maps(), cond.cross_maps())
    ((side, maps),) = both.self_maps().items()
    assert side == 4 and maps.shape == (1, 16, 16)
    torch.testing.assert_close(maps, cond.self_maps()[4])
    heads = unet.get_submodule(selfs[0]).heads
    torch.testing.assert_close(maps.sum(-1), torch.full((1, 16), float(heads)))
    with pytest.raises(ValueError, match="prompt position"):
        TrajectoryRequest(cross_layers=cross)
    with pytest.raises(ValueError, match="lacks the attention layers"):
        with TrajectoryRequest(self_layers=("no.such.attn1",)).capture(unet):
            pass
