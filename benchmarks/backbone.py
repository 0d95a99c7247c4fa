"""Speed and peak memory of the Stable Diffusion backbone, with and without attention capture.

Builds SD v1.4's real architecture with RANDOM weights (``from_config("sd14")``, no download;
compute does not depend on the weights) and times, per batch size:

- ``vae_encode``: ``backbone.encode(images)`` (posterior mean x scaling factor);
- ``unet_plain``: one UNet pass with diffusers' default attention processors;
- ``unet_capture[<output>]``: the same pass with every self-attention map captured
  (``diffseg.attention.capture_self_attention``), for each ``--outputs`` mode;
- ``attention_maps``: the whole ``backbone.attention_maps(images)`` (encode + capture pass).

Plain and capture passes alternate (ABAB...) so that load from other jobs hits both alike. Peak
memory: ``torch.cuda.max_memory_allocated`` above the level before the call on a GPU; on a CPU the
peak resident set size above the level before the call (after ``malloc_trim`` returns freed heap to
the OS), sampled every 2 ms from /proc/self/statm (Linux, glibc). Prints one JSON line per
measurement and then the capture/plain ratio (target: at most 1.3).

    .venv/bin/python benchmarks/backbone.py                      # sd14, CPU, fp32, batch 1
    .venv/bin/python benchmarks/backbone.py --device cuda --dtype float16 --batch 1 4 8
    .venv/bin/python benchmarks/backbone.py --config tiny --repeats 5
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import threading
import time
from collections.abc import Callable

import torch

from diffseg.attention import AttentionStore, capture_self_attention
from diffseg.backbones import StableDiffusionBackbone

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the CPU peak is then a lower bound
        pass


class PeakMemory:
    """Peak memory above the starting level during a ``with`` block, in MiB."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mib = float("nan")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            _malloc_trim()  # hand freed heap back to the OS so RSS starts at the live set
            self._base = self._rss()
            self._max = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._max, self._rss())
        self.peak_mib = (peak - self._base) / 2**20


def measure(fn: Callable[[], object], device: torch.device) -> tuple[float, float, float]:
    """(wall seconds, process CPU seconds, peak MiB) of one call. CPU seconds (all threads) are
    less disturbed than wall time by other jobs on a shared machine."""
    with PeakMemory(device) as mem:
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return seconds, cpu, mem.peak_mib


def make_cases(
    backbone: StableDiffusionBackbone,
    images: torch.Tensor,
    outputs: list[str],
    chunk_elements: int | None,
) -> dict[str, Callable[[], object]]:
    """The UNet-pass cases for one batch: plain, and capture for each output mode."""
    batch, device = images.shape[0], backbone.device
    latent = backbone.encode(images)
    context = backbone.prompt_embedding().expand(batch, -1, -1)
    timestep = torch.full((batch,), backbone.timestep, dtype=torch.long, device=device)

    def plain():
        with torch.inference_mode():
            backbone.unet(latent, timestep, encoder_hidden_states=context, return_dict=False)

    def capture(output: str):
        def run():
            store = AttentionStore()
            with (
                torch.inference_mode(),
                capture_self_attention(
                    backbone.unet, store, chunk_elements=chunk_elements, output=output
                ),
            ):
                backbone.unet(latent, timestep, encoder_hidden_states=context, return_dict=False)
            return store.maps()

        return run

    cases = {"unet_plain": plain}
    cases.update({f"unet_capture[{o}]": capture(o) for o in outputs})
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="sd14", choices=["sd14", "tiny"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="default: 1 (CPU)")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per measurement")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first")
    parser.add_argument(
        "--outputs", nargs="+", default=["probs", "sdpa"], choices=["probs", "sdpa"]
    )
    parser.add_argument("--chunk-elements", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    batches = args.batch or ([1, 4] if device.type == "cuda" else [1])
    backbone = StableDiffusionBackbone.from_config(
        args.config, dtype=dtype, device=device, chunk_elements=args.chunk_elements
    )
    header = {
        "backbone": backbone.name,
        "weights": "RANDOM (compute only)",
        "device": str(device),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "image_size": args.image_size,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    print(json.dumps(header))

    results: dict[tuple[int, str], list[tuple[float, float, float]]] = {}
    for batch in batches:
        g = torch.Generator().manual_seed(0)
        images = (torch.rand(batch, 3, args.image_size, args.image_size, generator=g) * 2 - 1).to(
            device
        )
        cases = make_cases(backbone, images, args.outputs, args.chunk_elements)
        for _ in range(args.warmup):
            for fn in cases.values():
                fn()
        for _ in range(args.repeats):  # alternate plain / capture so load hits both alike
            for name, fn in cases.items():
                results.setdefault((batch, name), []).append(measure(fn, device))
        backbone.attention_output = args.outputs[0]
        extra = {
            "vae_encode": lambda: backbone.encode(images),  # noqa: B023 (called in this loop)
            "attention_maps": lambda: backbone.attention_maps(images),  # noqa: B023
        }
        for name, fn in extra.items():
            for _ in range(args.warmup):
                fn()
            for _ in range(args.repeats):
                results.setdefault((batch, name), []).append(measure(fn, device))

        for (b, name), runs in results.items():
            if b != batch:
                continue
            seconds = [s for s, _, _ in runs]
            print(
                json.dumps(
                    {
                        "batch": b,
                        "case": name,
                        "seconds_min": round(min(seconds), 3),
                        "seconds_median": round(statistics.median(seconds), 3),
                        "seconds_per_image": round(min(seconds) / b, 3),
                        "cpu_seconds_min": round(min(c for _, c, _ in runs), 3),
                        "peak_mib": round(max(m for _, _, m in runs), 1),
                        "runs": len(runs),
                    }
                )
            )
        plain = results[(batch, "unet_plain")]
        base, base_cpu = min(r[0] for r in plain), min(r[1] for r in plain)
        for output in args.outputs:
            runs = results[(batch, f"unet_capture[{output}]")]
            best, best_cpu = min(r[0] for r in runs), min(r[1] for r in runs)
            print(
                f"batch {batch}: capture[{output}] / plain UNet pass = {best / base:.2f}x wall "
                f"({best:.2f} s vs {base:.2f} s), {best_cpu / base_cpu:.2f}x CPU time "
                f"({best_cpu:.2f} s vs {base_cpu:.2f} s); target <= 1.3x"
            )
    print(f"RANDOM WEIGHTS ({backbone.name}): timings only, the maps themselves mean nothing.")


if __name__ == "__main__":
    main()
