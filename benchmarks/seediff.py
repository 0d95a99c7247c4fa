"""Speed and memory of SeeDiff generation (diffusers' pipeline + attention recording + mask).

Models with RANDOM weights (the figures are about compute, not mask quality): ``tiny`` (the
tests' model) on the CPU, and SD v1.4's real architecture (``sd14``) when CUDA is present.
Reports, per 512x512 image: the plain pipeline (no recording), SeeDiff's generation without
refinement (recording + soft mask + threshold) and its images per second, the overhead of
recording, the bytes of the recorded attention sums, the PAMR refinement alone (5000 iterations
by default), and on CUDA the peak memory of both runs.

    .venv/bin/python benchmarks/seediff.py [--steps 50] [--configs tiny,sd14] [--threads 2]
    .venv/bin/python benchmarks/seediff.py --configs tiny --steps 2 --image-size 64 \
        --pamr-iterations 2                            # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from diffseg import StableDiffusionBackbone
from diffseg.methods.seediff import SeeDiff, as_pipeline
from diffseg.methods.seediff.algorithm import refine_mask


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[float, int | None]:
    """(seconds, peak CUDA bytes or None) of one call."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return time.perf_counter() - start, peak


def bench(
    config: str,
    device: torch.device,
    dtype: torch.dtype,
    steps: int,
    pamr_iter: int,
    size: int = 512,
):
    backbone = StableDiffusionBackbone.from_config(config, device=device, dtype=dtype)
    seediff = SeeDiff(num_inference_steps=steps, refine=False, image_size=size)
    pipe = as_pipeline(backbone)

    def plain():
        with torch.inference_mode():
            pipe(
                "A photo of a dog",
                num_inference_steps=steps,
                guidance_scale=7.0,
                height=size,
                width=size,
                latents=seediff.initial_latent(pipe, 0),
                output_type="np",
            )

    info = {}

    def seeded():
        info.update(seediff.generate(backbone, "dog", 200000)[2])

    seeded()  # warm-up (allocations, kernels)
    t_plain, peak_plain = timed(plain, device)
    t_seed, peak_seed = timed(seeded, device)
    mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = True
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (size, size, 3))).to(device)
    t_pamr, _ = timed(lambda: refine_mask(mask, image, num_iter=pamr_iter), device)
    return {
        "config": config,
        "image_size": size,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "steps": steps,
        "unet_calls": info["unet_calls"],
        "plain_s": round(t_plain, 3),
        "seediff_s": round(t_seed, 3),
        "images_per_s": round(1 / t_seed, 4),
        "overhead": round(t_seed / t_plain, 3),
        "recorded_MiB": round(info["recorded_bytes"] / 2**20, 2),
        "peak_plain_MiB": None if peak_plain is None else round(peak_plain / 2**20),
        "peak_seediff_MiB": None if peak_seed is None else round(peak_seed / 2**20),
        f"pamr_{pamr_iter}_s": round(t_pamr, 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--configs", default="tiny,sd14", help="sd14 runs on CUDA only")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--pamr-iterations", type=int, default=5000)
    parser.add_argument("--image-size", type=int, default=512, help="a multiple of 64")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.image_size < 64 or args.image_size % 64:
        parser.error("--steps must be >= 1 and --image-size a multiple of 64")
    if args.threads:
        torch.set_num_threads(args.threads)
    for config in args.configs.split(","):
        runs = [(torch.device("cpu"), torch.float32)] if config == "tiny" else []
        if torch.cuda.is_available():
            runs += [(torch.device("cuda"), torch.float32), (torch.device("cuda"), torch.float16)]
        for device, dtype in runs:
            figures = bench(
                config, device, dtype, args.steps, args.pamr_iterations, args.image_size
            )
            print(json.dumps(figures))


if __name__ == "__main__":
    main()
