"""Many processes, one result: exact shards, torchrun with gloo on the CPU, independent shard
jobs merged afterwards, resuming with another number of processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from diffseg.backbones import build_backbone
from diffseg.engine.distributed import shard
from diffseg.engine.records import CSV_COLUMNS, read_per_image
from diffseg.tasks.evaluate import evaluate
from diffseg.tasks.merge import main as merge_main
from diffseg.testing import fakedata

REPO = Path(__file__).resolve().parents[2]
N_IMAGES = 3

pytestmark = pytest.mark.usefixtures("one_thread")


def test_shards_are_contiguous_exact_and_balanced():
    items = list(range(10))
    for world in (1, 2, 3, 4, 10, 12):
        parts = [shard(items, r, world) for r in range(world)]
        assert [x for p in parts for x in p] == items  # no padding, no repeats, in order
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    with pytest.raises(ValueError):
        shard(items, 2, 2)


def _cfg(coco_root: Path, *extra: str):
    overrides = [
        "backbone=tiny",
        "logger=none",
        "resolution=64",
        "num_workers=0",
        "num_overlays=0",
        f"dataset.root={coco_root}",
        "dataset.curated=false",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    fakedata.write_cocostuff(root, n=N_IMAGES, size=(48, 64), seed=5)
    return root


@pytest.fixture(scope="module")
def backbone():
    return build_backbone("tiny")


@pytest.fixture(scope="module")
def reference(coco_root, backbone, tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("single")
    evaluate(_cfg(coco_root), run_dir, backbone=backbone)
    return json.loads((run_dir / "results.json").read_text())


def _same_numbers(a: dict, b: dict) -> bool:
    return all(a[k] == b[k] for k in ("tp", "fp", "fn", "acc", "miou", "num_images"))


def test_shard_jobs_merge_exactly_and_resume_with_another_world_size(
    coco_root, backbone, reference, tmp_path
):
    # job 0 of 2 (e.g. a Slurm array task): its slice only, records in its own file, no results
    out = evaluate(_cfg(coco_root, "num_shards=2", "shard_index=0"), tmp_path, backbone=backbone)
    assert out["results"] == {} and not (tmp_path / "results.json").exists()
    rows = read_per_image(tmp_path / "per_image.rank0.csv", CSV_COLUMNS)
    assert len(rows) == 2  # shard sizes 2 and 1
    # merging now gives partial results, marked so
    assert merge_main([str(tmp_path)]) == 0
    partial = json.loads((tmp_path / "results.json").read_text())
    assert partial["num_images"] == 2 and partial["complete"] is False
    # the rest by ONE process (another world size): it takes only what is left
    evaluate(_cfg(coco_root), tmp_path, backbone=backbone)
    merged = json.loads((tmp_path / "results.json").read_text())
    assert _same_numbers(merged, reference) and merged["complete"]
    assert merged["images_resumed"] == 2
    # one per_image.csv in dataset order, the per-process files folded into it
    assert sorted(p.name for p in tmp_path.glob("per_image*.csv")) == ["per_image.csv"]
    ids = [r["id"] for r in read_per_image(tmp_path / "per_image.csv", CSV_COLUMNS)]
    assert ids == sorted(ids) and len(ids) == N_IMAGES
    sessions = json.loads((tmp_path / "run.json").read_text())["sessions"]
    assert [s["images"] for s in sessions] == [2, 1]


def test_torchrun_two_cpu_processes_equal_one(coco_root, reference, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WORLD_SIZE", "RANK"))}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1")
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "run.py", "backbone=tiny", "logger=none", "resolution=64", "num_workers=0",
        "num_overlays=0", f"dataset.root={coco_root}", "dataset.curated=false",
        f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((run_dir / "results.json").read_text())
    assert _same_numbers(res, reference) and res["complete"]
    session = json.loads((run_dir / "run.json").read_text())["sessions"][0]
    assert session["images"] == N_IMAGES and [p["images"] for p in session["processes"]] == [2, 1]
    assert sorted(p.name for p in run_dir.glob("per_image*.csv")) == ["per_image.csv"]
    assert (run_dir / "run.log").exists() and (run_dir / "run_rank1.log").exists()


def test_submitit_local_launcher_runs_a_sweep(coco_root, tmp_path):
    """The Slurm code path (Hydra's submitit launcher), on this machine: one job per setting."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "run.py", "-m", "hydra/launcher=submitit_local",
        "method=diffseg,kmeans_c", "backbone=tiny", "logger=none", "resolution=64",
        "num_workers=0", "num_overlays=0", f"dataset.root={coco_root}", "dataset.curated=false",
        "limit=1", f"hydra.sweep.dir={tmp_path}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = {json.loads(p.read_text())["method"]["name"]: json.loads(p.read_text())
             for p in tmp_path.glob("*/results.json")}  # fmt: skip
    assert set(found) == {"diffseg", "kmeans_c"}
    assert all(
        r["complete"] and r["random_weights"] and r["num_images"] == 1 for r in found.values()
    )
    assert list(tmp_path.glob(".submitit/*"))  # the jobs went through submitit
