"""Speed of the per-image Hungarian metric (eval/metrics.py): images per second.

Inputs imitate a benchmark: 512x512 labels with 3 to 10 classes (Voronoi regions, about 5% of
pixels unlabelled) and predictions with 5 to 30 segments (other Voronoi regions) whose ids are
spread over 0..63, as DiffSeg's are. Reports the whole ``update`` (checks, confusion counts,
assignment, records) for several batch sizes and input kinds, and the assignment alone.

    .venv/bin/python benchmarks/metrics.py [--images 64] [--size 512] [--device cpu|cuda]
        [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from eval.metrics import HungarianMetrics, confusion_matrix


def voronoi(rng: np.random.Generator, n: int, size: int, regions: int) -> np.ndarray:
    """(n, size, size) int64 region index per pixel, ``regions`` random sites per image."""
    low = 64
    yy, xx = np.mgrid[0:low, 0:low]
    out = np.empty((n, low, low), dtype=np.int64)
    for i in range(n):
        sites = rng.uniform(0, low, size=(regions, 2))
        d = (yy[None] - sites[:, 0, None, None]) ** 2 + (xx[None] - sites[:, 1, None, None]) ** 2
        out[i] = d.argmin(axis=0)
    rep = size // low
    return out.repeat(rep, axis=1).repeat(rep, axis=2)


def make_data(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    preds, labels = [], []
    for _ in range(n):
        k = int(rng.integers(5, 31))
        seg = voronoi(rng, 1, size, k)[0]
        preds.append(rng.permutation(64)[:k][seg])  # arbitrary ids, not 0..k-1
        c = int(rng.integers(3, 11))
        classes = rng.choice(27, size=c, replace=False)
        lab = classes[voronoi(rng, 1, size, c)[0]]
        lab[rng.random((size, size)) < 0.05] = -1
        labels.append(lab)
    return np.stack(preds), np.stack(labels)


def bench(fn, repeats: int) -> float:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.images < 1 or args.size < 64 or args.size % 64 or args.repeats < 1:
        p.error("--images and --repeats must be >= 1, --size a multiple of 64")
    if args.threads:
        torch.set_num_threads(args.threads)

    preds, labels = make_data(args.images, args.size)
    n = len(preds)
    print(
        f"eval.metrics benchmark: {n} images {args.size}x{args.size}, "
        f"{preds.reshape(n, -1).max(1).mean() + 1:.0f} columns on average; "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores, load "
        f"{os.getloadavg()[0]:.1f}), device {args.device}"
    )

    def run(batch: int, kind: str):
        if kind == "numpy":
            p_all, l_all = preds, labels
        else:
            p_all = torch.from_numpy(preds).to(args.device)
            l_all = torch.from_numpy(labels).to(args.device)

        def go():
            m = HungarianMetrics()
            for s in range(0, n, batch):
                m.update(p_all[s : s + batch], l_all[s : s + batch])

        return go

    kinds = ["numpy", "torch"]
    print(f"{'input':<18}{'batch':>6}{'images/s':>12}{'ms/image':>10}")
    for kind in kinds:
        for batch in (1, 16):
            secs = bench(run(batch, kind), args.repeats)
            name = kind if kind == "numpy" else f"torch ({args.device})"
            print(f"{name:<18}{batch:>6}{n / secs:>12.1f}{1000 * secs / n:>10.2f}")

    hists = [confusion_matrix(preds[i], labels[i]) for i in range(n)]
    secs = bench(lambda: [linear_sum_assignment(h, maximize=True) for h in hists], args.repeats)
    print(f"{'assignment only':<18}{'-':>6}{n / secs:>12.1f}{1000 * secs / n:>10.2f}")


if __name__ == "__main__":
    main()
