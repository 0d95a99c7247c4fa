"""Speed of DiffCut's algorithm at the release's defaults: the cut, the assignment and PAMR.

Input: random clustered token features of SSD-1B's shape at 1024 px, (1280, 32, 32): six
Voronoi regions with correlated centres, a smooth drift, Gaussian noise and an outlier token
(real features have one: it keeps min-max from crushing the regions' cross affinities to
zero). Random input, not a real model: the figures are about compute. Defaults: tau 0.5,
alpha 10, 100 split candidates, output 128, PAMR 10 iterations at dilations 1, 2, 4, 8.

Reports seconds per image for

- the recursive cut (``diffseg.ncut.ncut_labels``) and the literal per-candidate reference
  (``ncut_reference``: masked matrices, dense diagonal products, one candidate at a time),
  with the same leaves asserted;
- the split search alone on the 1024-token top node: all 100 candidates in one matrix product
  (``best_threshold_cut``) against one candidate at a time (``threshold_cut_loop``);
- concept assignment at 128 (``assign_concepts``) and PAMR + median (``refine_labels``).

    .venv/bin/python benchmarks/diffcut.py [--images 3] [--device cpu|cuda] [--threads N] [--json out.json]

The feature extraction (one UNet pass) is timed elsewhere; ``main`` runs a list of sections,
so an extraction section is one more entry there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffseg.ncut import (
    affinity_matrix,
    assign_concepts,
    best_threshold_cut,
    fiedler_vector,
    ncut_labels,
    ncut_reference,
    threshold_cut_loop,
)
from diffseg.pamr import refine_labels


def clustered_features(seed: int, c: int = 1280, h: int = 32, k: int = 6) -> torch.Tensor:
    """float (C, h, h): k regions, correlated centres, drift, noise, one outlier token."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(c, generator=g)
    centres = base + 1.0 * torch.randn(k, c, generator=g)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(h), indexing="ij")
    seeds = torch.randint(0, h, (k, 2), generator=g)
    dist = (yy[None] - seeds[:, 0, None, None]) ** 2 + (xx[None] - seeds[:, 1, None, None]) ** 2
    drift = torch.randn(c, generator=g)[:, None, None] * (yy / h)[None]
    f = centres[dist.argmin(0)].permute(2, 0, 1) + 0.3 * drift
    f += 0.3 * torch.randn(c, h, h, generator=g)
    f[:, int(torch.randint(0, h, (1,), generator=g)), 0] = -base
    return f


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(device: str, fn, *args):
    """(result, seconds) of fn(*args), synchronising the device around it."""
    _sync(device)
    t0 = time.perf_counter()
    out = fn(*args)
    _sync(device)
    return out, time.perf_counter() - t0


def cut_section(feats: list[torch.Tensor], device: str) -> dict:
    """The recursive cut, vectorised and literal, on every image; the leaves must agree."""
    fast, slow, segments = [], [], []
    for f in feats:
        labels, t_fast = timed(device, ncut_labels, f)
        reference, t_slow = timed(device, ncut_reference, f)
        assert torch.equal(labels, reference), "vectorised cut and reference disagree"
        fast.append(t_fast)
        slow.append(t_slow)
        segments.append(int(labels.max()) + 1)
    return {
        "cut_s": statistics.median(fast),
        "cut_reference_s": statistics.median(slow),
        "cut_ratio": statistics.median(slow) / statistics.median(fast),
        "segments": segments,
    }


def search_section(feats: list[torch.Tensor], device: str, repeats: int = 3) -> dict:
    """The split search alone on each image's top node (all 1024 tokens)."""
    fast, slow = [], []
    for f in feats:
        a = affinity_matrix(f.reshape(f.shape[0], -1), 10)
        d = a.sum(dim=1)
        y = fiedler_vector(a, d)
        for _ in range(repeats):
            (side, _), t_fast = timed(device, best_threshold_cut, y, a, d)
            (side_loop, _), t_slow = timed(device, threshold_cut_loop, y, a, d)
            assert torch.equal(side, side_loop), "vectorised search and loop disagree"
            fast.append(t_fast)
            slow.append(t_slow)
    return {
        "search_s": min(fast),
        "search_loop_s": min(slow),
        "search_ratio": min(slow) / min(fast),
    }


def assign_refine_section(feats: list[torch.Tensor], device: str, size: int) -> dict:
    """Assignment at ``size`` and PAMR + median on a random image of that size."""
    assign, refine = [], []
    g = torch.Generator().manual_seed(0)
    for f in feats:
        labels = ncut_labels(f)
        out, t_assign = timed(device, assign_concepts, f, labels, size)
        image = torch.rand(1, 3, size, size, generator=g).to(device)
        _, t_refine = timed(device, refine_labels, image, out[None])
        assign.append(t_assign)
        refine.append(t_refine)
    return {"assign_s": statistics.median(assign), "pamr_s": statistics.median(refine)}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--output-size", type=int, default=128)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    feats = [F.normalize(clustered_features(i), dim=0).to(args.device) for i in range(args.images)]
    # Warm-up: first calls pay for allocations and kernel selection.
    ncut_labels(feats[0])
    figures = {"device": args.device, "threads": torch.get_num_threads(), "images": args.images}
    # Sections in order; the feature extraction (a UNet pass) is the one section to add here.
    sections = [
        ("cut", lambda: cut_section(feats, args.device)),
        ("search", lambda: search_section(feats, args.device)),
        ("assign+pamr", lambda: assign_refine_section(feats, args.device, args.output_size)),
    ]
    for name, section in sections:
        result = section()
        figures.update(result)
        print(f"{name}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in result.items()), flush=True)
    total = figures["cut_s"] + figures["assign_s"] + figures["pamr_s"]
    print(f"algorithm per image (cut + assignment + PAMR): {total:.3f} s")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    main()
