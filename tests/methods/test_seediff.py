"""SeeDiff: class-token positions, the mask algorithm on structured attention, its trajectory
request served by the shared attention capture."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from diffseg.methods.base import GenerationMethod, ParameterError
from diffseg.methods.seediff import SeeDiff, class_token_positions
from diffseg.methods.seediff.algorithm import (
    bicubic,
    combine_cross_attention,
    expand,
    minmax,
    otsu_pass,
    refine_mask,
    soft_mask,
)
from diffseg.methods.seediff.generator import CROSS_LAYERS, SELF_LAYERS, trajectory_request

# ---------------------------------------------------------------------------- tokenizers


def clip_tokenizer(tmp_path, words):
    """A real-format CLIP tokenizer whose BPE merges make each of ``words`` one token."""
    from transformers import CLIPTokenizer

    vocab, merges = {}, []
    for word in words:
        parts = [*word[:-1], word[-1] + "</w>"]
        for p in parts:
            vocab.setdefault(p, len(vocab))
        current = parts[0]
        for p in parts[1:]:
            merge = f"{current} {p}"
            if merge not in merges:
                merges.append(merge)
            current += p
            vocab.setdefault(current, len(vocab))
    vocab["<|startoftext|>"] = 49406
    vocab["<|endoftext|>"] = 49407
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 77, "pad_token": "<|endoftext|>"})
    )
    return CLIPTokenizer.from_pretrained(str(tmp_path))


def test_single_token_class_is_at_position_5(tmp_path):
    tok = clip_tokenizer(tmp_path, ["a", "photo", "of", "dog", "long", "shot"])
    assert tok("A photo of a dog").input_ids[:7] == [
        49406,
        *tok("a photo of a dog", add_special_tokens=False).input_ids,
        49407,
    ]
    for rule in ("all", "first", "last"):
        assert class_token_positions(tok, "A photo of a {class}", "dog", rule) == [5]
    assert class_token_positions(tok, "A long shot of a {class}", "dog") == [6]


def test_multi_token_rules(tmp_path):
    tok = clip_tokenizer(tmp_path, ["a", "photo", "of", "dog", "hot"])
    assert class_token_positions(tok, "A photo of a {class}", "hot dog", "all") == [5, 6]
    assert class_token_positions(tok, "A photo of a {class}", "hot dog", "first") == [5]
    assert class_token_positions(tok, "A photo of a {class}", "hot dog", "last") == [6]


def test_multi_letter_names_with_the_tiny_tokenizer():
    from diffseg.backbones import tiny_clip_tokenizer

    tok = tiny_clip_tokenizer()
    ids = tok("a cab", add_special_tokens=False).input_ids
    # "a" is one token; "cab" splits into c, a, b</w>: positions 2, 3, 4 after BOS and "a"
    assert len(ids) == 4
    assert class_token_positions(tok, "a {class}", "cab") == [2, 3, 4]
    assert class_token_positions(tok, "a {class}", "cab", "first") == [2]
    with pytest.raises(ValueError, match="tokenise the same"):
        class_token_positions(tok, "a {class}s", "cab")
    with pytest.raises(ValueError, match="placeholder"):
        class_token_positions(tok, "a photo", "cab")


# ---------------------------------------------------------------------------- algorithm pieces


def test_variance_rule_downweights_flat_layers():
    gen = torch.Generator().manual_seed(0)
    strong = torch.rand(2, 16, 16, generator=gen)  # variance ~ 1/12
    flat = 0.5 + 1e-3 * torch.rand(1, 16, 16, generator=gen)  # variance ~ 1e-7 <= 1e-4
    cross = torch.cat([strong, flat])
    assert flat.var() <= 1e-4 < strong[0].var()
    expected = minmax(minmax(strong[0]) + minmax(strong[1]) + 0.01 * minmax(flat[0]))
    torch.testing.assert_close(combine_cross_attention(cross), expected)
    # without the rule the flat layer's noise would weigh as much as a real map
    unweighted = minmax(minmax(strong[0]) + minmax(strong[1]) + minmax(flat[0]))
    assert (combine_cross_attention(cross) - unweighted).abs().max() > 0.05


def test_otsu_runs_on_uint16_values_above_255():
    # values past 1 (bicubic overshoot): 1.0-1.1 -> 255..308, 1.4 -> 499; saturating them at
    # 255 (uint8) would merge both groups
    v = torch.tensor([[1.0, 1.05, 1.1, 1.02] * 6 + [1.4] * 8]).reshape(4, 8)
    passed = otsu_pass(v)
    assert passed.dtype == torch.bool
    assert passed[v == 1.4].all() and not passed[(v > 0.9) & (v < 1.2)].any()
    ints = (v.numpy() ** 2 * 255).astype(np.uint16)
    assert ints.max() > 255
    t, _ = cv2.threshold(ints, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    assert torch.equal(passed, torch.from_numpy(ints > t))
    clipped = np.minimum(ints, 255).astype(np.uint8)
    t8, _ = cv2.threshold(clipped, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    assert not np.array_equal(clipped > t8, ints > t)


def test_bicubic_priors_keep_overshoot():
    step = torch.zeros(16, 16)
    step[4:12, 4:12] = 1.0
    up = bicubic(step, 32)
    assert up.max() > 1.0 and up.min() < 0.0  # INTER_CUBIC rings at the edges, not clipped
    ref = cv2.resize(step.numpy(), (32, 32), interpolation=cv2.INTER_CUBIC)
    assert np.array_equal(up.numpy(), ref)


def test_expansion_is_summed_cosine_of_rows():
    gen = torch.Generator().manual_seed(1)
    s = torch.rand(64, 64, generator=gen)
    seeds = torch.zeros(64, dtype=torch.bool)
    seeds[[3, 10, 40]] = True
    cos = torch.nn.CosineSimilarity(dim=1)
    expected = sum(cos(s, s[i][None]) for i in (3, 10, 40))
    torch.testing.assert_close(expand(seeds, s), expected)
    assert torch.equal(expand(torch.zeros(64, dtype=torch.bool), s), torch.zeros(64))


# ---------------------------------------------------------------------------- structured attention


def disc(side: int, centre=(0.45, 0.55), radius=0.28) -> torch.Tensor:
    """bool (side, side): a disc sampled at cell centres (fractions of the image side)."""
    c = (torch.arange(side) + 0.5) / side
    return (c[:, None] - centre[0]) ** 2 + (c[None, :] - centre[1]) ** 2 < radius**2


def structured_attention(seed: int = 0):
    """Cross maps that peak on a disc and self-attention in which each token attends to its own
    region (object or background), with noise; head-summed over 8 heads like SD's."""
    gen = torch.Generator().manual_seed(seed)
    selfs = {}
    for r in (16, 32, 64):
        region = disc(r).reshape(-1).float()
        same = region[:, None] * region[None, :] + (1 - region[:, None]) * (1 - region[None, :])
        logits = 4.0 * same + 0.5 * torch.randn(r * r, r * r, generator=gen)
        selfs[r] = 8 * logits.softmax(dim=-1)
    obj = disc(16).float()
    cross = torch.stack(
        [obj * (0.6 + 0.1 * k) + 0.15 * torch.rand(16, 16, generator=gen) for k in range(4)]
        + [0.02 + 1e-3 * torch.rand(16, 16, generator=gen)]  # a flat layer
    )
    return cross, selfs


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_mask_finds_the_object_in_structured_attention():
    cross, selfs = structured_attention()
    seediff = SeeDiff(refine=False)
    soft, steps = soft_mask(cross, selfs, size=512, return_steps=True)
    assert soft.shape == (512, 512) and soft.min() == 0 and soft.max() == 1
    torch.testing.assert_close(seediff.soft_mask(cross, selfs, 512), soft)
    truth = disc(512)
    assert iou(soft > 0.3, truth) > 0.9
    assert iou(seediff.mask(soft, None), truth) > 0.9
    # foreground seeds at 16 lie on the object; background seeds at 32 and 64 off it
    assert steps["seeds16"].any() and not (steps["seeds16"] & ~disc(16)).any()
    for r in (32, 64):
        seeds = steps[f"seeds{r}"]
        assert seeds.shape == (r, r)
        on_object = float((seeds & disc(r)).sum() / seeds.sum())
        background_covered = float((seeds & ~disc(r)).sum() / (~disc(r)).sum())
        assert on_object < 0.05 and background_covered > 0.8, (r, on_object, background_covered)
        prior = bicubic(steps[f"m{r // 2}"], r)
        assert torch.equal(seeds, ~otsu_pass(prior))


def test_refinement_removes_leaks_across_image_edges():
    truth = disc(64)
    image = torch.full((64, 64, 3), 40.0)
    image[truth] = torch.tensor([200.0, 180.0, 60.0])
    leaky = disc(64, radius=0.36)  # the object plus a ring of background
    refined = refine_mask(leaky, image, num_iter=200, sigma_scale=0.2, threshold=0.8)
    # inside the flat object the mask stays high; the ring spreads into the wide background
    assert iou(refined, truth) > 0.9 > iou(leaky, truth)
    empty = torch.zeros(64, 64, dtype=torch.bool)
    assert torch.equal(refine_mask(empty, image, num_iter=5), empty)


def test_seediff_validates_settings():
    with pytest.raises(ValueError, match="multi_token"):
        SeeDiff(multi_token="middle")
    with pytest.raises(ValueError, match="placeholder"):
        SeeDiff(prompt_template="A photo")
    with pytest.raises(
        ParameterError, match=r"threshold=1\.2 is invalid: it must be a number >= 0"
    ):
        SeeDiff(threshold=1.2)
    with pytest.raises(ParameterError, match="num_inference_steps=0 is invalid"):
        SeeDiff(num_inference_steps=0)
    with pytest.raises(ParameterError, match="refine='yes' is invalid"):
        SeeDiff(refine="yes")
    assert SeeDiff().settings()["threshold"] == 0.3


def test_seediff_is_a_generation_method():
    """The declared stages: the parameters a config may set are the settings' keys, in order;
    from_config drops nulls (defaults) and names unknown keys."""
    assert isinstance(SeeDiff(), GenerationMethod) and SeeDiff.backbone_families == ("sd",)
    assert SeeDiff.parameters() == tuple(SeeDiff().settings())
    method = SeeDiff.from_config({"threshold": 0.4, "refine": None})
    assert method.threshold == 0.4 and method.refine is True
    assert method.describe() == {"name": "seediff", **method.settings()}
    with pytest.raises(ParameterError, match=r"unknown keys \['tau'\]"):
        SeeDiff.from_config({"tau": 1})


# ---------------------------------------------------------------------------- trajectory capture


@pytest.fixture(scope="module")
def tiny_unet():
    from diffusers import UNet2DConditionModel

    from diffseg.backbones import model_configs

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**model_configs("tiny")["unet"])
    return unet.eval().requires_grad_(False)


def explicit_probs(unet, name, calls, positions=None):
    """softmax(QK^T * scale) of layer ``name`` on the conditional half, from its captured inputs,
    head-summed and averaged over calls, with diffusers' own ``get_attention_scores``."""
    attn = unet.get_submodule(name)
    out = 0
    for hidden, context in calls:
        h = hidden[1:]
        q = attn.head_to_batch_dim(attn.to_q(h))
        kv = h if context is None else context[1:]
        k = attn.head_to_batch_dim(attn.to_k(kv))
        probs = attn.get_attention_scores(q, k)  # (heads, Nq, Nk)
        probs = probs.sum(0)
        out = out + (probs if positions is None else probs[:, positions].T)
    return out / len(calls)


def test_trajectory_capture_matches_explicit_maps_and_leaves_output_unchanged(
    tiny_unet, one_thread
):
    unet = tiny_unet
    gen = torch.Generator().manual_seed(0)
    # 256 px -> grids 32/16/8/4: the recorded layers sit at 8 (cross, self) 16 and 32 (self)
    inputs = [
        (torch.randn(2, 4, 32, 32, generator=gen), torch.randn(2, 77, 32, generator=gen), t)
        for t in (900, 400)
    ]
    request = trajectory_request([5, 7], guidance=True, chunk_elements=4096)
    captured: dict[str, list] = {}
    names = list(request.layers)

    def hook(name):
        def pre(module, args, kwargs):
            ctx = kwargs.get("encoder_hidden_states")
            captured.setdefault(name, []).append((args[0].clone(), ctx))

        return pre

    handles = [
        unet.get_submodule(n).register_forward_pre_hook(hook(n), with_kwargs=True) for n in names
    ]
    try:
        plain = [unet(x, t, encoder_hidden_states=c).sample for x, c, t in inputs]
        with torch.no_grad(), request.capture(unet) as recorder:
            recorded = [unet(x, t, encoder_hidden_states=c).sample for x, c, t in inputs]
    finally:
        for h in handles:
            h.remove()
    for a, b in zip(plain, recorded, strict=True):
        assert torch.equal(a, b)  # recording never changes the UNet's output
    from diffseg.attention import TrajectoryProcessor

    assert not any(isinstance(p, TrajectoryProcessor) for p in unet.attn_processors.values())
    assert recorder.num_calls == 2
    first_run = {n: calls[:2] for n, calls in captured.items()}
    cross = recorder.cross_maps()
    assert cross.shape == (1, 2 * 5, 8, 8)
    for i, name in enumerate(CROSS_LAYERS):
        want = explicit_probs(unet, name, first_run[name], positions=[5, 7])  # (2, 64)
        torch.testing.assert_close(cross[0, i].reshape(-1), want[0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(cross[0, 5 + i].reshape(-1), want[1], rtol=1e-4, atol=1e-6)
    selfs = recorder.self_maps()
    assert list(selfs) == [8, 16, 32]
    for (_, name), side in zip(sorted(SELF_LAYERS.items()), (8, 16, 32), strict=True):
        want = explicit_probs(unet, name, first_run[name])
        torch.testing.assert_close(selfs[side][0], want, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(selfs[side][0].sum(-1), torch.full((side * side,), 2.0))


def test_trajectory_capture_refuses_a_unet_without_the_layers():
    from diffusers import UNet2DConditionModel

    small = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(8, 8),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=8,
        norm_num_groups=4,
        attention_head_dim=2,
    )
    with pytest.raises(ValueError, match="Stable Diffusion v1-shaped"):
        with trajectory_request([1], True).capture(small, "Stable Diffusion v1-shaped"):
            pass
