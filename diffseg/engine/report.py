"""What a run reports: ``results.json`` per setting, ``sweep_results.json``, the screen summary.

A results file says exactly what was run: the dataset (its full size, the limit, whether the
images are the whole benchmark), the evaluation size, the backbone and its precision, the method
settings, whether the weights were random, the metrics, and the time of every session.
"""

from __future__ import annotations

import math
import platform
import resource
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .loop import STAGES
from .rundir import write_json_atomic

__all__ = [
    "RANDOM_WARNING",
    "combine_sessions",
    "peak_memory",
    "print_summary",
    "timing_summary",
    "versions",
    "write_results",
]

RANDOM_WARNING = (
    "RANDOM WEIGHTS: this run used a backbone with random weights (tests, smoke runs, compute "
    "measurements). Its numbers say nothing about any method and must not be reported."
)


def peak_memory(device: torch.device) -> dict[str, float | None]:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mb = rss / 1024 / 1024 if platform.system() == "Darwin" else rss / 1024  # bytes vs KiB
    cuda_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "cpu_rss_mb": round(rss_mb, 1),
        "cuda_mb": None if cuda_mb is None else round(cuda_mb, 1),
    }


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("diffusers", "transformers", "diffseg"):
        try:
            out[mod] = getattr(__import__(mod), "__version__", "?")
        except ImportError:
            pass
    return out


def combine_sessions(sessions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One session entry for the processes of one launch: images and stage seconds summed,
    the wall time of the slowest, each process's own entry kept under ``processes``."""
    if len(sessions) == 1:
        return dict(sessions[0])
    first = dict(sessions[0])
    seconds = {k: sum(s["stages"]["seconds"][k] for s in sessions) for k in STAGES}
    timed = sum(s["stages"]["images_timed"] for s in sessions)
    busy = sum(seconds.values())
    first.update(
        images=sum(s["images"] for s in sessions),
        wall_time_s=max(s["wall_time_s"] for s in sessions),
        stages={
            "seconds": {k: round(v, 4) for k, v in seconds.items()},
            "images_timed": timed,
            "images_per_s": round(timed / busy * len(sessions), 4) if timed and busy else None,
            "warmup_s": max((s["stages"]["warmup_s"] or 0) for s in sessions),
            "warmup_images": sum(s["stages"]["warmup_images"] for s in sessions),
        },
        processes=list(sessions),
    )
    return first


def timing_summary(sessions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Every session's timing and their sums (stage seconds, images, wall time)."""
    total = dict.fromkeys(STAGES, 0.0)
    images = timed = 0
    wall = 0.0
    for s in sessions:
        for key in STAGES:
            total[key] += s["stages"]["seconds"][key]
        images += s["images"]
        timed += s["stages"]["images_timed"]
        wall += s["wall_time_s"]
    busy = sum(total.values())
    return {
        "sessions": list(sessions),
        "images": images,
        "wall_time_s": round(wall, 3),
        "stage_seconds": {k: round(v, 3) for k, v in total.items()},
        "images_per_s": round(timed / busy, 4) if timed and busy > 0 else None,
    }


#: What differs between two sessions that report the same figures (this process's memory, the
#: clock, the packages, how the run dir was spelled, how many images this session read back).
_SESSION_KEYS = ("peak_memory", "finished", "versions", "run_dir", "images_resumed")


def write_results(path: Path, results: dict[str, Any]) -> dict[str, Any]:
    """Write one setting's ``results.json``, unless the file there already reports the same
    figures (a session that scored no new image): then it is left as it is, byte for byte,
    and returned, so that re-running a finished run changes none of its reported numbers."""
    import json

    from eval.metrics import json_safe

    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        saved = None
    new = json.loads(json.dumps(json_safe(results)))
    if isinstance(saved, dict) and _figures(saved) == _figures(new):
        return saved
    write_json_atomic(path, results)
    return results


def _figures(results: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in results.items() if k not in _SESSION_KEYS}


def write_sweep_results(run_dir: Path, results: Mapping[str, Mapping[str, Any]], random: bool):
    rows = [
        {k: r.get(k) for k in ("acc", "miou", "num_images", "complete", "method")}
        | {"setting": name}
        for name, r in results.items()
    ]
    head = {"WARNING": RANDOM_WARNING} if random else {}
    write_json_atomic(run_dir / "sweep_results.json", {**head, "settings": rows})


def _pct(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def print_summary(results: Mapping[str, Mapping[str, Any]], run_dir: Path) -> str:
    """The one-screen summary at the end of a run (stdout and ``summary.txt``)."""
    first = next(iter(results.values()))
    ds, bb, timing = first["dataset"], first["backbone"], first["timing"]
    rule = "=" * 72
    lines = [rule, "run summary", rule]
    if first["random_weights"]:
        lines += ["!!! " + RANDOM_WARNING, ""]
    subset = "" if ds["full_benchmark"] else " (NOT the full benchmark)"
    if ds.get("incomplete"):  # a partial copy: say how much of it was found
        subset = f" (NOT the full benchmark: {ds['images_found']} of {ds['images_expected']} found)"
    res = first["resolution"]
    at = f"{res}x{res}"
    if ds.get("preprocessing") == "seg4diff":
        at = f"shortest side {res} (each image's own aspect)"
    lines.append(
        f"dataset   {ds['name']} ({ds.get('split') or '-'}), {ds['num_images_run']} images"
        f"{subset}, evaluated at {at}"
    )
    if first.get("matching") == "row":
        lines.append(
            "matching  ROW (every pixel row matched on its own, as Seg4Diff's released "
            "evaluator): far more lenient, NOT comparable with per-image numbers"
        )
    lines.append(
        f"backbone  {bb['name']} ({bb.get('model_id') or 'random'}) at "
        f"{bb.get('image_size', '?')} px, unet {(bb.get('precision') or {}).get('unet', '?')} "
        f"on {bb.get('device', '?')}"
    )
    lines.append("-" * 72)
    lines.append(f"{'setting':<40} {'images':>8} {'ACC':>8} {'mIoU':>8}")
    for name, r in results.items():
        flag = "" if r.get("complete") else " (partial)"
        label = (name or r["method"]["name"]) + flag
        lines.append(f"{label:<40} {r['num_images']:>8} {_pct(r['acc']):>8} {_pct(r['miou']):>8}")
    lines.append("-" * 72)
    rate = timing["images_per_s"]
    lines.append(
        f"time      {timing['wall_time_s']:.1f} s over {len(timing['sessions'])} session(s)"
        + (f", {rate:.2f} img/s after warm-up" if rate else "")
    )
    mem = first["peak_memory"]
    lines.append(
        f"memory    peak RSS {mem['cpu_rss_mb']:.0f} MiB"
        + (f", peak CUDA {mem['cuda_mb']:.0f} MiB" if mem.get("cuda_mb") is not None else "")
    )
    lines.append(f"outputs   {run_dir}")
    lines.append(rule)
    text = "\n".join(lines) + "\n"
    print(text, end="", flush=True)
    (run_dir / "summary.txt").write_text(text, encoding="utf-8")
    return text
