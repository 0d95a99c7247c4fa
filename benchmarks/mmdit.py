"""Speed and peak memory of an MM-DiT pass with and without the joint-attention capture.

Builds an MM-DiT with RANDOM weights (``sd3`` = SD3-medium's real shapes, ``flux`` = FLUX.1-dev's,
or a tiny config; no download: compute does not depend on the weights) and times, per case:

- ``encode``: ``backbone.encode(images)`` (VAE posterior mean, shift, scale);
- ``plain``: the transformer up to block ``--block`` (stock processors, stopped after it);
- ``capture_i2t``: the same pass recording the block's image -> text probabilities of the 77
  text tokens (Seg4Diff's request), one head at a time;
- ``capture_i2i``: the same with the image -> image block as well (DiffSeg on MM-DiT);
- ``extract``: the whole ``backbone.extract`` of Seg4Diff's request (encode + noise + capture).

Plain and capture passes alternate (ABAB...). Peak memory as in ``benchmarks/backbone.py`` (CUDA:
``max_memory_allocated`` above the start; CPU: sampled resident set size above the start).
Prints one JSON line per measurement, then the capture/plain ratios (target: I2T capture at most
1.3x the plain pass on a CPU; its extra peak memory at most 1 GB in float32 at 1024 px).

    .venv/bin/python benchmarks/mmdit.py --config tiny_sd3            # seconds, any machine
    .venv/bin/python benchmarks/mmdit.py --config sd3 --size 512      # real shapes, smaller input
    .venv/bin/python benchmarks/mmdit.py --config sd3 --device cuda --dtype float16
    .venv/bin/python benchmarks/mmdit.py --config flux --device cuda --dtype bfloat16 --block 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backbone import measure  # noqa: E402  (the shared timer / peak-memory sampler)

from diffseg.backbones import FluxBackbone, SD3Backbone  # noqa: E402
from diffseg.backbones.configs import config_family  # noqa: E402
from diffseg.backbones.mmdit import MAX_SEQUENCE_LENGTH  # noqa: E402
from diffseg.backbones.mmdit_capture import JointAttentionCapture  # noqa: E402
from diffseg.features import FeatureRequest  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build(config: str, device: str, dtype: torch.dtype):
    cls = SD3Backbone if config_family(config) == "sd3" else FluxBackbone
    return cls.from_config(config, device=device, dtype=dtype)


def make_cases(backbone, images: torch.Tensor, block: int) -> dict:
    """The transformer-pass cases for one batch."""
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

    request = FeatureRequest(joint_blocks=(block,), joint_tokens=tokens, noise_seed=42)
    return {
        "encode": lambda: backbone.encode(images),
        "plain": run(outputs={"stop": block}),
        "capture_i2t": run(attention_blocks=(block,), tokens=tokens),
        "capture_i2i": run(attention_blocks=(block,), tokens=tokens, image_attention=True),
        "extract": lambda: backbone.extract(images, request),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="sd3", help="sd3, flux, tiny_sd3, tiny_sd35, tiny_flux")
    parser.add_argument("--size", type=int, default=1024, help="input side in pixels")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--block", type=int, default=None, help="default: the backbone's")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    backbone = build(args.config, args.device, DTYPES[args.dtype])
    block = backbone.default_layer if args.block is None else args.block
    backbone.check_inputs = False
    images = torch.rand(args.batch, 3, args.size, args.size, device=device) * 2 - 1
    cases = make_cases(backbone, images, block)
    for fn in cases.values():  # warm-up (allocator, kernels, the cached conditioning)
        fn()
    results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            results[name].append(measure(fn, device))
    info = {
        "config": args.config,
        "size": args.size,
        "grid": backbone.grid_of(args.size),
        "batch": args.batch,
        "block": block,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(),
    }
    summary = {}
    for name, runs in results.items():
        wall = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        peak = max(r[2] for r in runs)
        summary[name] = (wall, cpu, peak)
        print(json.dumps({**info, "case": name, "wall_s": round(wall, 4), "cpu_s": round(cpu, 4),
                          "peak_mib": round(peak, 1), "images_per_s":
                          round(args.batch / wall, 3)}))  # fmt: skip
    for name in ("capture_i2t", "capture_i2i"):
        ratio_wall = summary[name][0] / summary["plain"][0]
        ratio_cpu = summary[name][1] / summary["plain"][1]
        extra = summary[name][2] - summary["plain"][2]
        print(f"{name}/plain: wall {ratio_wall:.2f}x, cpu {ratio_cpu:.2f}x, "
              f"extra peak {extra:.0f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
