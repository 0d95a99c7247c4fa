"""StableDiffusionBackbone (diffseg/backbone.py) on the tiny random configuration; no downloads."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from diffseg.backbones import (
    StableDiffusionBackbone,
    WeightsNotFoundError,
    model_configs,
    tiny_clip_tokenizer,
)
from diffseg.backbones.configs import CLIP_BOS_ID, CLIP_EOS_ID

SMALL = 128  # image side for most tests: token grids 16/8/4/2


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backbone() -> StableDiffusionBackbone:
    return StableDiffusionBackbone.from_config("tiny")


def _images(batch: int, side: int = SMALL, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, side, side, generator=g) * 2 - 1


def test_tiny_at_512_gives_sd_v1_grids_and_16_layers(backbone):
    maps = backbone.attention_maps(_images(1, 512))
    assert list(maps) == [64, 32, 16, 8] == backbone.resolutions
    for r, m in maps.items():
        assert m.shape == (1, r * r, r * r) and m.dtype == torch.float32
        torch.testing.assert_close(m.sum(-1), torch.ones(1, r * r), rtol=0, atol=1e-5)
        assert (m >= 0).all()
    counts = {r: len(names) for r, names in backbone.layer_inventory.items()}
    assert counts == {64: 5, 32: 5, 16: 5, 8: 1}
    assert backbone.layer_inventory == backbone.expected_layers(512)
    assert backbone.layer_inventory[64][:2] == [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor",
        "down_blocks.0.attentions.1.transformer_blocks.0.attn1.processor",
    ]
    assert backbone.layer_inventory[8] == [
        "mid_block.attentions.0.transformer_blocks.0.attn1.processor"
    ]


def test_random_weights_are_flagged_loudly(caplog):
    with caplog.at_level(logging.WARNING, logger="diffseg.backbone"):
        bb = StableDiffusionBackbone.from_config("tiny", seed=3)
    assert bb.is_random and "RANDOM WEIGHTS" in bb.name
    assert bb.describe()["is_random"] is True
    assert any("RANDOM WEIGHTS" in r.getMessage() for r in caplog.records)


def test_from_config_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = StableDiffusionBackbone.from_config("tiny", seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = StableDiffusionBackbone.from_config("tiny", seed=1)
    c = StableDiffusionBackbone.from_config("tiny", seed=2)
    wa, wb, wc = (next(x.unet.parameters()) for x in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    with pytest.raises(ValueError, match="unknown backbone config 'huge'"):
        StableDiffusionBackbone.from_config("huge")


def test_sd14_config_is_the_real_architecture():
    """Built on the meta device (no memory): the parameter counts of SD v1.4's modules."""
    cfg = model_configs("sd14")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg["unet"])
        vae = AutoencoderKL(**cfg["vae"])
        text = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(unet), count(vae), count(text)) == (859_520_964, 83_653_863, 123_060_480)
    assert vae.config.scaling_factor == 0.18215


def test_encode_is_posterior_mean_times_scaling_factor(backbone):
    images = _images(2)
    latent = backbone.encode(images)
    with torch.no_grad():
        mean = backbone.vae.encode(images).latent_dist.mean
    assert latent.shape == (2, 4, SMALL // 8, SMALL // 8)
    torch.testing.assert_close(latent, mean * 0.18215)
    assert torch.equal(backbone.encode(images), latent)  # no sampling


def test_empty_prompt_tokens_are_bos_then_eos_padding():
    tokens = tiny_clip_tokenizer()("", padding="max_length", max_length=77, truncation=True)
    assert tokens.input_ids == [CLIP_BOS_ID] + [CLIP_EOS_ID] * 76 == [49406] + [49407] * 76


def test_unet_gets_timestep_300_empty_prompt_and_noise_free_latent(backbone):
    images = _images(2)
    seen = {}

    def spy(module, args, kwargs):
        seen["sample"] = (args[0] if args else kwargs["sample"]).clone()
        seen["timestep"] = args[1] if len(args) > 1 else kwargs["timestep"]
        seen["context"] = kwargs["encoder_hidden_states"].clone()

    handle = backbone.unet.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        backbone.attention_maps(images)
    finally:
        handle.remove()
    assert torch.as_tensor(seen["timestep"]).tolist() == [300, 300]
    # The latent reaches the UNet as encoded: no noise added (and no scheduler scaling).
    torch.testing.assert_close(seen["sample"], backbone.encode(images), rtol=0, atol=0)
    ids = torch.tensor([[CLIP_BOS_ID] + [CLIP_EOS_ID] * 76])
    with torch.no_grad():
        empty = backbone.text_encoder(ids).last_hidden_state
    assert seen["context"].shape == (2, 77, backbone.unet.config.cross_attention_dim)
    torch.testing.assert_close(seen["context"], empty.expand(2, -1, -1))
    assert backbone.prompt_embedding() is backbone.prompt_embedding()  # cached


def test_other_timestep_reaches_the_unet():
    bb = StableDiffusionBackbone.from_config("tiny", timestep=50)
    seen = []
    handle = bb.unet.register_forward_pre_hook(
        lambda m, a, k: seen.append(torch.as_tensor(a[1] if len(a) > 1 else k["timestep"])),
        with_kwargs=True,
    )
    try:
        bb.attention_maps(_images(1, 64))
    finally:
        handle.remove()
    assert seen[0].tolist() == [50]


def test_batch_of_two_equals_two_batches_of_one(backbone):
    images = _images(2, seed=5)
    both = backbone.attention_maps(images)
    first = backbone.attention_maps(images[:1])
    second = backbone.attention_maps(images[1:])
    for r in both:
        torch.testing.assert_close(both[r][:1], first[r], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(both[r][1:], second[r], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(first[16], second[16])  # different images, different maps


@pytest.mark.parametrize(
    "images, match",
    [
        (torch.zeros(3, 128, 128), r"shape \(3, 128, 128\)"),
        (torch.zeros(1, 1, 128, 128), r"shape \(1, 1, 128, 128\)"),
        (torch.zeros(1, 3, 100, 100), r"shape \(1, 3, 100, 100\).*multiple of 64"),
        (torch.zeros(1, 3, 128, 192), r"shape \(1, 3, 128, 192\)"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "dtype torch.uint8"),
        (torch.full((1, 3, 64, 64), 255.0), r"values in \[255, 255\].*127\.5"),
        (torch.full((1, 3, 64, 64), float("nan")), "non-finite"),
        (torch.zeros(0, 3, 64, 64), "empty batch"),
    ],
)
def test_bad_images_raise_one_clear_error(backbone, images, match):
    with pytest.raises(ValueError, match=match):
        backbone.attention_maps(images)


def test_missing_local_folder_names_the_path_and_fix(tmp_path):
    missing = tmp_path / "no-such-sd"
    with pytest.raises(FileNotFoundError, match="no-such-sd") as info:
        StableDiffusionBackbone.from_pretrained(str(missing))
    assert isinstance(info.value, WeightsNotFoundError)
    assert "backbone.path=" in str(info.value)


def test_incomplete_local_folder_lists_what_is_missing(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    with pytest.raises(WeightsNotFoundError, match="lacks vae/, text_encoder/, tokenizer/"):
        StableDiffusionBackbone.from_pretrained(tmp_path)


def test_offline_hub_id_without_cache_names_the_id_and_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as info:
        StableDiffusionBackbone.from_pretrained("diffseg-tests/no-such-model")
    message = str(info.value)
    assert "'diffseg-tests/no-such-model'" in message and "HF_HUB_OFFLINE" in message
    assert "huggingface-cli login" in message and "backbone.path=/local/folder" in message
    assert "https://huggingface.co/diffseg-tests/no-such-model" in message


def test_from_pretrained_loads_a_local_diffusers_folder(backbone, tmp_path):
    backbone.vae.save_pretrained(tmp_path / "vae")
    backbone.unet.save_pretrained(tmp_path / "unet")
    backbone.text_encoder.save_pretrained(tmp_path / "text_encoder")
    backbone.tokenizer.save_pretrained(tmp_path / "tokenizer")
    loaded = StableDiffusionBackbone.from_pretrained(tmp_path)
    assert not loaded.is_random and loaded.model_id == str(tmp_path)
    images = _images(1, 64, seed=7)
    ours, theirs = backbone.attention_maps(images), loaded.attention_maps(images)
    assert list(ours) == list(theirs)
    for r in ours:
        torch.testing.assert_close(theirs[r], ours[r], rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_maps_match_cpu(dtype):
    """The same tiny weights on the GPU (fp32 and fp16) give the CPU's float32 maps."""
    cpu = StableDiffusionBackbone.from_config("tiny", seed=0)
    gpu = StableDiffusionBackbone.from_config("tiny", seed=0, device="cuda", dtype=dtype)
    images = _images(2)
    expected = cpu.attention_maps(images)
    got = gpu.attention_maps(images.to("cuda", dtype))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for r, m in expected.items():
        assert got[r].device.type == "cuda" and got[r].dtype == torch.float32
        torch.testing.assert_close(
            got[r].sum(-1).cpu(), torch.ones_like(m[..., 0]), atol=1e-3, rtol=0
        )
        torch.testing.assert_close(got[r].cpu(), m, atol=tol * m.max().item(), rtol=0)
