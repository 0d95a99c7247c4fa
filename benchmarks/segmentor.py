"""Speed and memory of DiffSeg's `segment` (and the K-Means baselines) at the release's defaults.

Input: random structured attention (diffseg/testing/synthetic_attention.py: Voronoi regions with random
affinities and noise) of SD v1's shapes {64: (1,4096,4096), 32: ..., 16: ..., 8: ...}, one image
per call -- random input, not a real model: the figures are about compute, not segmentation
quality. Reports seconds per image, the peak memory above the input (CPU: resident-set size
sampled every millisecond while `segment` runs; CUDA: torch.cuda.max_memory_allocated), the
number of segments, a per-step breakdown, and the fast matrix-product KL against the direct
broadcasting formula on a few anchors.

Wall-clock figures depend on what else runs on the machine. With `--threads 1`, the process CPU
time it also prints is close to the wall-clock time on an idle core, even on a loaded machine.

    .venv/bin/python benchmarks/segmentor.py [--images 3] [--device cpu|cuda|all] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from diffseg.methods.diffseg import DiffSeg  # noqa: E402
from diffseg.methods.kmeans import kmeans_c  # noqa: E402
from diffseg.methods.merging import (
    first_merge,
    greedy_merge,
    proposals_to_labels,
    symmetric_kl,
    symmetric_kl_reference,
)  # noqa: E402
from diffseg.ops.aggregation import aggregate_attention  # noqa: E402
from diffseg.testing import synthetic_attention as sa


class PeakRSS:
    """Peak resident-set size above the level at entry, sampled from /proc/self/statm."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: str, cpu_time: bool = False):
    _sync(device)
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    _sync(device)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    return (out, wall, cpu) if cpu_time else (out, wall)


def measure(method, maps: dict, device: str, output_size: int) -> dict:
    """Time one `segment` call; peak memory above the input."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        labels, secs, cpu = _timed(
            lambda: method.segment(maps, output_size=output_size), device, True
        )
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        with PeakRSS() as mem:
            labels, secs, cpu = _timed(
                lambda: method.segment(maps, output_size=output_size), device, True
            )
        peak = mem.delta_mb
    return {
        "seconds": secs,
        "cpu_seconds": cpu,
        "peak_mb": peak,
        "segments": int(labels.unique().numel()),
    }


def steps(maps: dict, device: str, output_size: int) -> dict:
    """Seconds of each DiffSeg step on one image (the defaults)."""
    ds = DiffSeg()
    agg, t_agg = _timed(lambda: aggregate_attention(maps), device)
    flat = agg[0].reshape(4096, 4096)
    props, t_first = _timed(
        lambda: first_merge(flat, ds.anchors.to(flat.device), ds.thresholds[0]), device
    )
    t_greedy = 0.0
    for tau in ds.thresholds[1:]:
        props, t = _timed(lambda p=props, tau=tau: greedy_merge(p, tau), device)
        t_greedy += t
    _, t_nms = _timed(lambda: proposals_to_labels(props.reshape(-1, 64, 64), output_size), device)
    return {"aggregate": t_agg, "first_merge": t_first, "greedy_passes": t_greedy, "nms": t_nms}


def kl_speedup(maps: dict, device: str, anchors: int) -> dict:
    """Fast KL for all 256 anchors x 4096 maps vs the direct formula on `anchors` anchors."""
    flat = aggregate_attention(maps)[0].reshape(4096, 4096)
    idx = DiffSeg().anchors.to(flat.device)
    fast, t_fast = _timed(lambda: symmetric_kl(flat[idx], flat), device)
    sub = idx[:anchors]
    naive, t_naive = _timed(lambda: symmetric_kl_reference(flat[sub], flat, chunk=1), device)
    err = float((fast[:anchors] - naive).abs().max())
    naive_all = t_naive * len(idx) / anchors
    return {
        "fast_all_anchors_s": t_fast,
        "naive_per_anchor_s": t_naive / anchors,
        "naive_all_anchors_s_extrapolated": naive_all,
        "speedup": naive_all / t_fast,
        "max_abs_diff": err,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--images", type=int, default=3, help="timed images per device (after one warm-up)"
    )
    ap.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    ap.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    ap.add_argument("--output-size", type=int, default=512)
    ap.add_argument(
        "--naive-anchors", type=int, default=4, help="anchors for the direct-KL timing (0: skip)"
    )
    ap.add_argument("--baselines", action="store_true", help="also time K-Means-C")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":
            sys.exit("--device cuda: CUDA is not available")
        devices.remove("cuda")

    print("RANDOM INPUT: synthetic structured attention, not a real model (compute figures only)")
    print(
        f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, os.cpu_count {os.cpu_count()}"
    )
    if os.path.exists("/proc/loadavg"):
        print(f"load average at start: {open('/proc/loadavg').read().split()[:3]}")
    results: dict = {}
    methods = {"diffseg": DiffSeg()}
    if args.baselines:
        methods["kmeans_c"] = kmeans_c()
    for device in devices:
        name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        inputs = [
            {
                r: m.to(device)
                for r, m in sa.random_structured_maps(1, num_regions=8, seed=s)[0].items()
            }
            for s in range(args.images + 1)
        ]
        input_mb = sum(m.numel() * m.element_size() for m in inputs[0].values()) / 2**20
        for mname, method in methods.items():
            measure(method, inputs[0], device, args.output_size)  # warm-up
            runs = [measure(method, x, device, args.output_size) for x in inputs[1:]]
            row = {
                "device": name,
                "seconds_per_image_median": statistics.median(r["seconds"] for r in runs),
                "seconds_per_image_min": min(r["seconds"] for r in runs),
                "cpu_seconds_per_image_median": statistics.median(r["cpu_seconds"] for r in runs),
                "peak_mb_above_input_max": max(r["peak_mb"] for r in runs),
                "input_mb": input_mb,
                "segments": [r["segments"] for r in runs],
            }
            if mname == "diffseg":
                per_step = [steps(x, device, args.output_size) for x in inputs[1:]]
                row["steps_s_median"] = {
                    k: statistics.median(p[k] for p in per_step) for k in per_step[0]
                }
                if args.naive_anchors > 0:
                    row["kl"] = kl_speedup(inputs[1], device, args.naive_anchors)
            results[f"{mname}/{device}"] = row
            print(f"\n== {mname} on {name} ({args.images} images, output {args.output_size}) ==")
            print(
                f"seconds/image: median {row['seconds_per_image_median']:.3f}, "
                f"min {row['seconds_per_image_min']:.3f} (process CPU time: median "
                f"{row['cpu_seconds_per_image_median']:.3f} s, all threads)"
            )
            print(
                f"peak memory above the input: {row['peak_mb_above_input_max']:.0f} MB (input {input_mb:.0f} MB)"
            )
            print(f"segments found: {row['segments']}")
            if "steps_s_median" in row:
                print(
                    "steps (s, median): "
                    + ", ".join(f"{k} {v:.3f}" for k, v in row["steps_s_median"].items())
                )
            if "kl" in row:
                kl = row["kl"]
                print(
                    f"KL, 256 anchors x 4096 maps: matrix products {kl['fast_all_anchors_s']:.3f} s; "
                    f"direct formula {kl['naive_per_anchor_s']:.3f} s/anchor -> "
                    f"{kl['naive_all_anchors_s_extrapolated']:.1f} s (x{kl['speedup']:.0f}); "
                    f"max |difference| {kl['max_abs_diff']:.1e}"
                )
    if os.path.exists("/proc/loadavg"):
        print(f"\nload average at end: {open('/proc/loadavg').read().split()[:3]}")
    if args.json:
        args.json.write_text(json.dumps({"random_input": True, "results": results}, indent=2))


if __name__ == "__main__":
    main()
