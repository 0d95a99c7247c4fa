"""Speed of DiffCut's algorithm at the release's defaults: the cut, the assignment and PAMR.

Input: random clustered token features of SSD-1B's shape at 1024 px, (1280, 32, 32): six
Voronoi regions with correlated centres, a smooth drift, Gaussian noise and an outlier token
(real features have one: it keeps min-max from crushing the regions' cross affinities to
zero). Random input, not a real model: the figures are about compute. Defaults: tau 0.5,
alpha 10, 100 split candidates, output 128, PAMR 10 iterations at dilations 1, 2, 4, 8.

Reports seconds per image for

- the recursive cut (``diffseg.methods.ncut.ncut_labels``) and the literal per-candidate reference
  (``ncut_reference``: masked matrices, dense diagonal products, one candidate at a time),
  with the same leaves asserted;
- the split search alone on the 1024-token top node: all 100 candidates in one matrix product
  (``best_threshold_cut``) against one candidate at a time (``threshold_cut_loop``);
- concept assignment at 128 (``assign_concepts``) and PAMR + median (``refine_labels``).

    .venv/bin/python benchmarks/diffcut.py [--images 3] [--device cpu|cuda] [--threads N] [--json out.json]
    .venv/bin/python benchmarks/diffcut.py --images 1 --tokens 8 --channels 64 --output-size 32 \
        --extraction --image-size 256                  # smoke run (seconds)

- the cut with ``partial_eigh`` (the CPU's two-eigenpair solver; not the default, see
  ``diffseg.methods.ncut.second_eigenvector``) and the share of its tokens labelled as the default's;
- the feature extraction, one UNet pass up to the layer DiffCut reads (``--extraction``): random
  SDXL-base-shaped weights at 1024 px on CUDA, the tiny SDXL-shaped model on the CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffseg.methods.ncut import (
    affinity_matrix,
    assign_concepts,
    best_threshold_cut,
    fiedler_vector,
    ncut_labels,
    ncut_reference,
    threshold_cut_loop,
)
from diffseg.ops.pamr import refine_labels


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


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of tokens of ``a``'s segments inside the segment of ``b`` they mostly fall in."""
    hist = torch.zeros(int(a.max()) + 1, int(b.max()) + 1)
    hist.index_put_((a.flatten().cpu(), b.flatten().cpu()), torch.ones(a.numel()), accumulate=True)
    return float(hist.max(1).values.sum() / a.numel())


def partial_section(feats: list[torch.Tensor], device: str) -> dict:
    """The cut with the two-eigenpair solver, against the default full decomposition."""
    times, agree = [], []
    for f in feats:
        labels, t = timed(device, ncut_labels, f, 0.5, 10, 100, True)
        times.append(t)
        agree.append(round(_agreement(labels, ncut_labels(f)), 3))
    return {"cut_partial_s": statistics.median(times), "agreement": agree}


def extraction_section(images: int, device: str, image_size: int = 1024) -> dict:
    """DiffCut's feature pass (VAE, noise, conditioning, UNet up to the layer) per image."""
    from diffseg import DiffCut, build_backbone

    name = "sdxl_random" if device == "cuda" else "tiny_sdxl"
    dtype = torch.float16 if device == "cuda" else torch.float32
    backbone, method = build_backbone(name, device=device, dtype=dtype), DiffCut()
    batch = torch.rand(1, 3, image_size, image_size, device=device) * 2 - 1
    method.features(backbone, batch)  # warm-up
    times = [timed(device, method.features, backbone, batch)[1] for _ in range(images)]
    return {"extraction_s": statistics.median(times), "extraction_model": name}


def assign_direct(features: torch.Tensor, labels: torch.Tensor, size: int) -> torch.Tensor:
    """The assignment as the release computes it: upsample all C channels, then score."""
    c, h, w = features.shape
    _, ranks = torch.unique(labels.reshape(-1), return_inverse=True)
    onehot = F.one_hot(ranks).T.to(features.dtype)
    embeddings = (onehot / (onehot.sum(1, keepdim=True) + 1e-8)) @ features.reshape(c, -1).T
    up = F.interpolate(features[None], size=(size, size), mode="bilinear", align_corners=False)
    return (up[0].reshape(c, -1).T @ embeddings.T).argmax(1).reshape(size, size)


def assign_refine_section(feats: list[torch.Tensor], device: str, size: int) -> dict:
    """Assignment at ``size`` (and the direct way, same labels asserted) and PAMR + median on a
    random image of that size."""
    assign, direct, refine = [], [], []
    g = torch.Generator().manual_seed(0)
    for f in feats:
        labels = ncut_labels(f)
        out, t_assign = timed(device, assign_concepts, f, labels, size)
        ref, t_direct = timed(device, assign_direct, f, labels, size)
        assert (out == ref).float().mean() > 0.999, "assignment and direct assignment disagree"
        image = torch.rand(1, 3, size, size, generator=g).to(device)
        _, t_refine = timed(device, refine_labels, image, out[None])
        assign.append(t_assign)
        direct.append(t_direct)
        refine.append(t_refine)
    return {
        "assign_s": statistics.median(assign),
        "assign_direct_s": statistics.median(direct),
        "pamr_s": statistics.median(refine),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--output-size", type=int, default=128)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--extraction", action="store_true", help="also time the UNet pass")
    ap.add_argument("--tokens", type=int, default=32, help="token grid side (SSD-1B at 1024: 32)")
    ap.add_argument("--channels", type=int, default=1280, help="feature channels (SSD-1B: 1280)")
    ap.add_argument("--image-size", type=int, default=1024, help="input side of --extraction")
    args = ap.parse_args(argv)
    if args.images < 1 or args.tokens < 4 or args.channels < 8:
        ap.error("--images must be >= 1, --tokens >= 4 and --channels >= 8")
    if args.threads:
        torch.set_num_threads(args.threads)
    feats = [
        F.normalize(clustered_features(i, args.channels, args.tokens), dim=0).to(args.device)
        for i in range(args.images)
    ]
    # Warm-up: first calls pay for allocations and kernel selection.
    ncut_labels(feats[0])
    figures = {"device": args.device, "threads": torch.get_num_threads(), "images": args.images}
    sections = [
        ("cut", lambda: cut_section(feats, args.device)),
        ("cut (partial_eigh)", lambda: partial_section(feats, args.device)),
        ("search", lambda: search_section(feats, args.device)),
        ("assign+pamr", lambda: assign_refine_section(feats, args.device, args.output_size)),
    ]
    if args.extraction:
        sections.append(
            (
                "extraction",
                lambda: extraction_section(args.images, args.device, args.image_size),
            )
        )
    for name, section in sections:
        result = section()
        figures.update(result)
        print(f"{name}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in result.items()), flush=True)
    total = figures["cut_s"] + figures["assign_s"] + figures["pamr_s"]
    print(f"algorithm per image (cut + assignment + PAMR): {total:.3f} s")
    ours = figures["cut_s"] + figures["assign_s"]
    release = figures["cut_reference_s"] + figures["assign_direct_s"]
    print(f"cut + assignment: {ours:.3f} s against {release:.3f} s computed the release's way "
          f"({release / ours:.1f}x)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    main()
