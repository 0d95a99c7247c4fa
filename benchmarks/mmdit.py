"""Speed and peak memory of an MM-DiT pass with and without the joint-attention capture.

Builds an MM-DiT with RANDOM weights (``sd3`` = SD3-medium's real shapes, ``flux`` = FLUX.1-dev's,
or a tiny config; the registry names ``sd3_random`` / ``flux_random`` are accepted too; no
download: compute does not depend on the weights) and times, per case:

- ``encode``: ``backbone.encode(images)`` (VAE posterior mean, shift, scale);
- ``plain``: the transformer up to block ``--block`` (stock processors, stopped after it);
- ``capture_i2t``: the same pass recording the block's image -> text probabilities of the 77
  text tokens (Seg4Diff's request), one head at a time;
- ``capture_i2i``: the same with the image -> image block as well (DiffSeg on MM-DiT);
- ``extract``: the whole ``backbone.extract`` of Seg4Diff's request (encode + noise + capture).

``--blocks N`` (SD3: joint blocks; FLUX: double blocks, alias ``--double-blocks``) and
``--single-blocks M`` (FLUX) build a TRUNCATED stack: the real width, heads, head dim, RoPE, text
length and token grid, only fewer blocks (FLUX.1's 12B parameters do not fit a 24 GB machine;
two double blocks do). A truncated FLUX also gets a one-layer T5 (the prompt's conditioning is
computed once, before any timed case, so T5's depth changes no figure). Every output line says
how many blocks were kept of the full count. The passes stop after the block they read, so the
blocks after it cost memory only.

Plain and capture passes alternate (ABAB...). Peak memory as in ``benchmarks/backbone.py`` (CUDA:
``max_memory_allocated`` above the start; CPU: sampled resident set size above the start).
Prints one JSON line per measurement, then the capture/plain ratios (target: I2T capture at most
1.3x the plain pass on a CPU; its extra peak memory at most 1 GB in float32 at 1024 px).

    .venv/bin/python benchmarks/mmdit.py --config tiny_sd3            # seconds, any machine
    .venv/bin/python benchmarks/mmdit.py --config sd3 --size 512      # real shapes, smaller input
    .venv/bin/python benchmarks/mmdit.py --config flux --double-blocks 2 --single-blocks 1
    .venv/bin/python benchmarks/mmdit.py --config sd3 --device cuda --dtype float16
    .venv/bin/python benchmarks/mmdit.py --config flux --device cuda --dtype bfloat16 --block 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backbone import measure  # noqa: E402  (the shared timer / peak-memory sampler)

from diffseg.backbones import BACKBONES, FluxBackbone, SD3Backbone  # noqa: E402
from diffseg.backbones.configs import config_family, model_configs  # noqa: E402
from diffseg.backbones.mmdit import MAX_SEQUENCE_LENGTH  # noqa: E402
from diffseg.backbones.mmdit_capture import JointAttentionCapture  # noqa: E402
from diffseg.features import FeatureRequest  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: T5 layers of a truncated FLUX (its output is computed once, outside every timed case).
TRUNCATED_T5_LAYERS = 1


def resolve_config(name: str) -> str:
    """A config of ``diffseg.backbones.configs``; registry names of random models (``sd3_random``,
    ``flux_random``) give the config they build."""
    spec = BACKBONES.get(name)
    return spec.random_config if spec is not None and spec.random_config else name


def truncation(config: str, blocks: int | None, single_blocks: int | None) -> dict | None:
    """``config_overrides`` of a truncated stack (None: the full one). Raises ``ValueError`` for
    a count outside 1 .. the full count (single blocks: 0 .. the full count)."""
    if blocks is None and single_blocks is None:
        return None
    full = model_configs(config)["transformer"]
    flux = config_family(config) == "flux"
    if single_blocks is not None and not flux:
        raise ValueError(f"--single-blocks is for FLUX configs; {config!r} has joint blocks only")
    overrides: dict[str, Any] = {}
    if blocks is not None:
        if not 1 <= blocks <= full["num_layers"]:
            raise ValueError(f"--blocks must be in 1 .. {full['num_layers']} for {config!r}")
        overrides["num_layers"] = blocks
    if single_blocks is not None:
        if not 0 <= single_blocks <= full["num_single_layers"]:
            raise ValueError(
                f"--single-blocks must be in 0 .. {full['num_single_layers']} for {config!r}"
            )
        overrides["num_single_layers"] = single_blocks
    out = {"transformer": overrides}
    if flux:
        out["text_encoder_2"] = {"num_layers": TRUNCATED_T5_LAYERS}
    return out


def stack_note(backbone, config: str, truncated: bool) -> str:
    """``"2 of 19 double + 1 of 38 single blocks (TRUNCATED ...)"`` or the full stack's count."""
    full = model_configs(config)["transformer"]
    if isinstance(backbone, FluxBackbone):
        singles = backbone.num_blocks - backbone.num_double_blocks
        note = (f"{backbone.num_double_blocks} of {full['num_layers']} double + {singles} of "
                f"{full['num_single_layers']} single blocks")  # fmt: skip
    else:
        note = f"{backbone.num_blocks} of {full['num_layers']} joint blocks"
    if not truncated:
        return f"{note} (full stack)"
    t5 = model_configs(config).get("text_encoder_2", {}).get("num_layers")
    extra = (
        f"; T5 {TRUNCATED_T5_LAYERS} of {t5} layers" if isinstance(backbone, FluxBackbone) else ""
    )
    return f"{note} (TRUNCATED: real widths, heads, RoPE, text length; fewer blocks{extra})"


def default_blocks(backbone, truncated: bool) -> tuple[int, ...]:
    """The blocks read by default: the backbone's default block on a full stack; on a truncated
    one the last double block (FLUX; and the last single block when some are kept) or the last
    but one joint block (SD3 builds its last block as the model's final one, without a text
    output)."""
    if not truncated:
        return (backbone.default_layer,)
    if isinstance(backbone, FluxBackbone):
        last_double = backbone.num_double_blocks - 1
        singles = backbone.num_blocks > backbone.num_double_blocks
        return (last_double, backbone.num_blocks - 1) if singles else (last_double,)
    return (max(backbone.num_blocks - 2, 0),)


def build(config: str, device: str, dtype: torch.dtype, overrides: dict | None):
    cls = SD3Backbone if config_family(config) == "sd3" else FluxBackbone
    return cls.from_config(config, device=device, dtype=dtype, config_overrides=overrides)


def make_cases(backbone, images: torch.Tensor, blocks: tuple[int, ...]) -> dict:
    """The cases for one batch, keyed ``(case, block)`` (``block`` None for the encode)."""
    latent = backbone.encode(images)
    sigma, t = backbone.noise_level()
    x_t = backbone.add_noise(latent, sigma, 0).to(backbone.dtype)
    kwargs = backbone.transformer_inputs(x_t, t) | backbone.conditioning(images.shape[0])
    tokens = tuple(range(MAX_SEQUENCE_LENGTH))

    def run(**capture_args):
        def go():
            capture = JointAttentionCapture(
                backbone.blocks, text_first=backbone.text_first, text_len=MAX_SEQUENCE_LENGTH,
                **capture_args,
            )  # fmt: skip
            with torch.inference_mode(), capture.installed():
                capture.run(backbone.transformer, **kwargs, return_dict=False)
            return capture.store

        return go

    cases = {("encode", None): lambda: backbone.encode(images)}
    for b in blocks:
        cases[("plain", b)] = run(outputs={"stop": b})
        cases[("capture_i2t", b)] = run(attention_blocks=(b,), tokens=tokens)
        cases[("capture_i2i", b)] = run(attention_blocks=(b,), tokens=tokens, image_attention=True)
    request = FeatureRequest(joint_blocks=(blocks[0],), joint_tokens=tokens, noise_seed=42)
    cases[("extract", blocks[0])] = lambda: backbone.extract(images, request)
    return cases


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="sd3",
                        help="sd3, flux, tiny_sd3, tiny_sd35, tiny_flux (or sd3_random, "
                             "flux_random)")  # fmt: skip
    parser.add_argument("--size", type=int, default=1024, help="input side in pixels")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--block", type=int, nargs="+", default=None,
                        help="blocks to read (one pass each); default: the backbone's, or the "
                             "last kept ones of a truncated stack")  # fmt: skip
    parser.add_argument(
        "--blocks",
        "--double-blocks",
        type=int,
        default=None,
        help="keep only the first N joint (SD3) / double (FLUX) blocks",
    )
    parser.add_argument(
        "--single-blocks", type=int, default=None, help="FLUX: keep only the first M single blocks"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    args.config = resolve_config(args.config)
    try:
        args.overrides = truncation(args.config, args.blocks, args.single_blocks)
    except ValueError as err:
        parser.error(str(err))
    return args


def report(results: dict, info: dict, batch: int) -> None:
    """One JSON line per case (medians; peak: the largest), then the ratios per block."""
    summary = {}
    for (name, block), runs in results.items():
        wall = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        peak = max(r[2] for r in runs)
        summary[name, block] = (wall, cpu, peak)
        print(json.dumps({**info, "block": block, "case": name, "wall_s": round(wall, 4),
                          "cpu_s": round(cpu, 4), "peak_mib": round(peak, 1),
                          "images_per_s": round(batch / wall, 3)}))  # fmt: skip
    for name, block in summary:
        if not name.startswith("capture"):
            continue
        (wall, cpu, peak), plain = summary[name, block], summary["plain", block]
        print(f"block {block} {name}/plain: wall {wall / plain[0]:.2f}x, cpu "
              f"{cpu / plain[1]:.2f}x, extra peak {peak - plain[2]:.0f} MiB")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    backbone = build(args.config, args.device, DTYPES[args.dtype], args.overrides)
    truncated = args.overrides is not None
    stack = stack_note(backbone, args.config, truncated)
    print(f"{args.config}: {stack}")
    blocks = tuple(args.block) if args.block else default_blocks(backbone, truncated)
    if not all(0 <= b < backbone.num_blocks for b in blocks):
        raise ValueError(f"--block {list(blocks)}: the stack has blocks 0 .. "
                         f"{backbone.num_blocks - 1} ({stack})")  # fmt: skip
    backbone.check_inputs = False
    images = torch.rand(args.batch, 3, args.size, args.size, device=device) * 2 - 1
    cases = make_cases(backbone, images, blocks)
    for fn in cases.values():  # warm-up (allocator, kernels, the cached conditioning)
        fn()
    results: dict[tuple, list[tuple[float, float, float]]] = {k: [] for k in cases}
    for _ in range(args.repeats):
        for key, fn in cases.items():
            results[key].append(measure(fn, device))
    info = {
        "config": args.config,
        "stack": stack,
        "truncated": truncated,
        "size": args.size,
        "grid": backbone.grid_of(args.size),
        "batch": args.batch,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(),
    }
    report(results, info, args.batch)


if __name__ == "__main__":
    main()
