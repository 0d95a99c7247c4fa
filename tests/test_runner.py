"""The experiment runner end to end: real Hydra config, tiny random backbone, fixture datasets.

Attention passes of the tiny model dominate the time, so the tests share one uninterrupted
reference run and one loaded backbone (passed to ``run(backbone=...)``), and count passes.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import fakedata
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from PIL import Image

from diffseg.data import load_coco_stuff27_metadata
from diffseg.runner import CSV_COLUMNS, ConfigError, ResumeError, read_per_image, run
from eval.metrics import HungarianMetrics

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(REPO / "configs")
RES = 64  # evaluation resolution: small labels keep the metric and PNGs cheap
N_IMAGES = 2


def compose_cfg(*overrides: str):
    """The real config, composed as `python run.py <overrides>` would (without the hydra node)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    ids = fakedata.write_cocostuff(root, n=N_IMAGES, size=(48, 64), seed=3)
    assert len(ids) == N_IMAGES
    return root


def base(coco_root: Path) -> list[str]:
    return [
        "backbone=tiny",
        "logger=none",
        f"resolution={RES}",
        "num_workers=0",
        f"dataset.root={coco_root}",
        "dataset.curated=false",
    ]


class CountingBackbone:
    """Wraps a backbone and counts attention passes (and images through them)."""

    def __init__(self, backbone):
        self._bb = backbone
        self.calls = 0
        self.images = 0

    def __getattr__(self, name):
        return getattr(self._bb, name)

    def attention_maps(self, images):
        self.calls += 1
        self.images += images.shape[0]
        return self._bb.attention_maps(images)


@pytest.fixture(scope="module")
def tiny_backbone():
    from diffseg.backbone import StableDiffusionBackbone

    return StableDiffusionBackbone.from_config("tiny", seed=0)


@pytest.fixture(scope="module")
def ref_run(coco_root, tmp_path_factory):
    """One uninterrupted run built entirely from the config (backbone included)."""
    run_dir = tmp_path_factory.mktemp("ref")
    cfg = compose_cfg(*base(coco_root), "save_predictions=true", "num_overlays=2")
    out = run(cfg, run_dir)
    return run_dir, out


def load_rows(path: Path) -> list[dict]:
    return read_per_image(path, CSV_COLUMNS, repair=False)


def test_run_writes_consistent_outputs(ref_run, coco_root):
    run_dir, out = ref_run
    res = json.loads((run_dir / "results.json").read_text())
    # random weights are flagged loudly
    assert res["random_weights"] is True and out["random_weights"] is True
    assert "RANDOM WEIGHTS" in res["WARNING"]
    assert res["backbone"]["name"] == "tiny"
    assert res["method"]["name"] == "diffseg" and res["method"]["kl_threshold"] == 1.1
    assert res["resolution"] == RES and res["dataset"]["name"] == "coco_stuff27"
    assert res["num_images"] == res["images_expected"] == N_IMAGES and res["complete"]
    names = load_coco_stuff27_metadata()["coarse_names"]
    assert list(res["iou_per_class"]) == names and len(names) == 27
    assert res["images_per_s"] > 0 and res["peak_memory"]["cpu_rss_mb"] > 0
    assert (run_dir / "config_resolved.yaml").is_file() and (run_dir / "run.json").is_file()
    assert "RANDOM WEIGHTS" in (run_dir / "summary.txt").read_text()

    # per_image.csv: one row per image; its saved counts reproduce results.json exactly
    rows = load_rows(run_dir / "per_image.csv")
    assert [r["id"] for r in rows] == sorted(
        p.stem for p in (coco_root / "images/val2017").iterdir()
    )
    again = HungarianMetrics(27)
    again.add_records(rows)
    m = again.compute()
    assert m["tp"] == res["tp"] and m["fp"] == res["fp"] and m["fn"] == res["fn"]
    assert m["acc"] == pytest.approx(res["acc"]) and m["miou"] == pytest.approx(res["miou"])
    assert 0 <= res["acc"] <= 100 and res["classes_counted"] == m["classes_counted"]
    for r in rows:
        assert r["num_segments"] >= 1 and r["pixels"] == sum(r["tp"]) + sum(r["fn"]) > 0

    # overlays for the first 2 images, three panels + ground truth side by side
    overlays = sorted((run_dir / "overlays").glob("*.png"))
    assert [p.stem for p in overlays] == [r["id"] for r in rows[:2]]
    with Image.open(overlays[0]) as im:
        assert im.size == (4 * RES + 3 * 4, RES)

    # predictions are segment-id PNGs that eval.score scores to the same numbers
    from eval.score import main as score_main

    preds = run_dir / "predictions"
    assert len(list(preds.glob("*.png"))) == N_IMAGES
    scored = run_dir.parent / f"{run_dir.name}_scored.json"
    argv = [
        "--dataset",
        "coco_stuff27",
        "--predictions",
        str(preds),
        "--root",
        str(coco_root),
        "--resolution",
        str(RES),
        "--no-curated",
        "--output",
        str(scored),
        "--workers",
        "1",
    ]
    assert score_main(argv) == 0
    s = json.loads(scored.read_text())
    assert s["tp"] == res["tp"] and s["fn"] == res["fn"] and s["fp"] == res["fp"]


def test_resume_after_kill_equals_uninterrupted_and_sweep_shares_attention(
    ref_run, coco_root, tiny_backbone, tmp_path
):
    """Two thresholds from one attention pass per image; interrupted after the first image with
    a torn last row in one setting (kill -9 mid-write), then resumed: the 1.1 setting equals
    the uninterrupted reference run exactly."""
    ref_dir, _ = ref_run
    cfg = compose_cfg(*base(coco_root), "sweep.kl_threshold=[1.1,0.9]", "num_overlays=0")
    counting = CountingBackbone(tiny_backbone)

    def interrupt(done: int) -> None:
        if done >= 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path, on_batch=interrupt, backbone=counting)
    assert counting.calls == 1
    dirs = [tmp_path / "kl_threshold=1.1", tmp_path / "kl_threshold=0.9"]
    for d in dirs:
        assert len(load_rows(d / "per_image.csv")) == 1
        assert not (d / "results.json").exists()  # results only when complete
    ref_rows = load_rows(ref_dir / "per_image.csv")
    # kill -9 while writing the first image's row of the second setting: its file ends in a
    # torn row (no newline), the first setting's row is complete
    csv_09 = dirs[1] / "per_image.csv"
    text = csv_09.read_text()
    header, row = text.splitlines()[:2]
    csv_09.write_text(header + "\n" + row[: len(row) // 2])

    out = run(cfg, tmp_path, backbone=counting)
    # both images need a pass again (image 1 for the 0.9 setting only), one pass each
    assert counting.calls == 1 + N_IMAGES
    assert set(out["results"]) == {"kl_threshold=1.1", "kl_threshold=0.9"}
    ref = json.loads((ref_dir / "results.json").read_text())
    res = json.loads((dirs[0] / "results.json").read_text())
    assert res["tp"] == ref["tp"] and res["fp"] == ref["fp"] and res["fn"] == ref["fn"]
    assert res["acc"] == ref["acc"] and res["miou"] == ref["miou"]
    assert res["images_resumed"] == 1 and res["images_this_session"] == N_IMAGES
    assert json.loads((dirs[1] / "results.json").read_text())["images_resumed"] == 0
    rows = load_rows(dirs[0] / "per_image.csv")
    assert [r["id"] for r in rows] == [r["id"] for r in ref_rows]
    assert [r["id"] for r in load_rows(csv_09)] == [r["id"] for r in ref_rows]
    assert csv_09.read_text().endswith("\n")
    other = json.loads((dirs[1] / "results.json").read_text())
    assert other["method"]["kl_threshold"] == 0.9 and other["num_images"] == N_IMAGES
    sweep = json.loads((tmp_path / "sweep_results.json").read_text())
    assert [s["setting"] for s in sweep["settings"]] == ["kl_threshold=1.1", "kl_threshold=0.9"]

    # a finished run started again does nothing but rewrite the same results
    run(cfg, tmp_path, backbone=counting)
    assert counting.calls == 1 + N_IMAGES
    assert json.loads((dirs[0] / "results.json").read_text())["tp"] == ref["tp"]


def test_resume_mid_batch_segments_only_the_missing_images(coco_root, tiny_backbone, tmp_path):
    """batch_size=2, killed while writing the batch's rows: the 1.1 setting kept its first row,
    the 0.9 setting none. The resume passes the batch through SD once and each setting segments
    only what it lacks; every row equals the one the interrupted session had computed."""
    cfg = compose_cfg(
        *base(coco_root), "batch_size=2", "sweep.kl_threshold=[1.1,0.9]", "num_overlays=0"
    )
    counting = CountingBackbone(tiny_backbone)

    def interrupt(done: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path, on_batch=interrupt, backbone=counting)
    csvs = [
        tmp_path / "kl_threshold=1.1" / "per_image.csv",
        tmp_path / "kl_threshold=0.9" / "per_image.csv",
    ]
    first = [load_rows(c) for c in csvs]
    assert [len(rows) for rows in first] == [N_IMAGES, N_IMAGES]
    for c, keep in zip(csvs, (1, 0), strict=True):
        lines = c.read_text().splitlines(keepends=True)
        c.write_text("".join(lines[: 1 + keep]))

    run(cfg, tmp_path, backbone=counting)
    assert counting.calls == 2 and counting.images == 2 * N_IMAGES
    for c, rows in zip(csvs, first, strict=True):
        assert load_rows(c) == rows
        res = json.loads((c.parent / "results.json").read_text())
        again = HungarianMetrics(27)
        again.add_records(rows)
        assert res["tp"] == again.compute()["tp"] and res["num_images"] == N_IMAGES


def test_resume_refuses_another_config(ref_run, coco_root):
    run_dir, _ = ref_run
    before = (run_dir / "per_image.csv").read_bytes()
    cfg = compose_cfg(*base(coco_root), "method.kl_threshold=0.9")
    with pytest.raises(ResumeError, match=r"kl_threshold.*1\.1.*0\.9"):
        run(cfg, run_dir)
    assert (run_dir / "per_image.csv").read_bytes() == before


def test_dataset_sets_threshold_and_method_overrides():
    cfg = compose_cfg("dataset=cityscapes")
    assert cfg.method.kl_threshold == 0.9
    cfg = compose_cfg("dataset=cityscapes", "method.kl_threshold=1.0")
    assert cfg.method.kl_threshold == 1.0
    cfg = compose_cfg("experiment=coco_table1_diffseg_320")
    assert cfg.resolution == 320 and cfg.method.kl_threshold == 1.1
    assert cfg.backbone.path == "CompVis/stable-diffusion-v1-4"
    cfg = compose_cfg("experiment=ablation_threshold")
    assert list(cfg.sweep.kl_threshold) == [0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3]
    cfg = compose_cfg("experiment=cityscapes_diffseg_320")
    assert cfg.dataset.name == "cityscapes" and cfg.method.kl_threshold == 0.9


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("resolution=7", "resolution=7"),
        ("device=cuda:0" if not torch.cuda.is_available() else "device=tpu", "device="),
        ("dtype=int8", "dtype='int8'"),
        ("batch_size=0", "batch_size=0"),
        ("+sweep.bogus=[1,2]", "no parameter 'bogus'"),
        ("method.num_points=0", "num_points"),
    ],
)
def test_bad_values_give_one_clear_error(coco_root, tmp_path, override, match):
    cfg = compose_cfg(*base(coco_root), override)
    with pytest.raises(ConfigError, match=match):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "results.json").exists()
    assert not (tmp_path / "run" / "per_image.csv").exists()


def test_missing_dataset_root_and_folder_path(tmp_path):
    missing = tmp_path / "nowhere"
    cfg = compose_cfg("backbone=tiny", "logger=none", f"dataset.root={missing}")
    with pytest.raises(ConfigError, match="nowhere"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    cfg = compose_cfg("backbone=tiny", "logger=none", "dataset=folder")
    with pytest.raises(ConfigError, match="dataset.path="):
        run(cfg, tmp_path / "run")
    with pytest.raises(MissingConfigException, match="kmeans_x"):
        compose_cfg("method=kmeans_x")


def test_cli_error_is_one_line_without_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "run.py"),
            "backbone=tiny",
            "logger=none",
            f"dataset.root={tmp_path / 'missing'}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "error: dataset=coco_stuff27: COCO-Stuff not found at" in proc.stderr


def test_folder_dataset_writes_overlays_and_label_pngs(tmp_path, tiny_backbone):
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(photos / "cat.jpg")
    cfg = compose_cfg(
        "backbone=tiny",
        "logger=none",
        "dataset=folder",
        f"dataset.path={photos}",
        "num_workers=0",
        f"resolution={RES}",
    )
    out = run(cfg, tmp_path / "run", backbone=CountingBackbone(tiny_backbone))
    res = out["results"][""]
    assert res["acc"] is None and res["random_weights"] is True
    with Image.open(tmp_path / "run/predictions/cat.png") as im:
        assert im.size == (RES, RES) and im.mode in ("L", "I;16")
    assert (tmp_path / "run/overlays/cat.png").is_file()
    rows = list(csv.DictReader(open(tmp_path / "run/per_image.csv")))
    assert rows[0]["id"] == "cat" and int(rows[0]["num_segments"]) >= 1


def test_wandb_offline_writes_a_run(ref_run, coco_root, tmp_path, monkeypatch):
    """logger=wandb with WANDB_MODE=offline: an offline run under the run dir with the final
    metrics, the per-class IoU table and the overlays (on a copy of the finished reference run,
    so no attention pass is needed: a resumed, complete run still logs its results)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    ref_dir, _ = ref_run
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir, ignore=shutil.ignore_patterns("results.json"))
    cfg = compose_cfg(*base(coco_root), "logger=wandb", "save_predictions=true", "num_overlays=2")
    out = run(cfg, run_dir)
    assert out["results"][""]["tp"] == json.loads((ref_dir / "results.json").read_text())["tp"]
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb"))
    wandb_id = json.loads((run_dir / "run.json").read_text())["wandb_id"]
    assert wandb_id and runs[0].name.endswith(wandb_id)
    media = runs[0] / "files" / "media"
    assert list(media.glob("table/iou_per_class*.table.json"))
    assert len(list(media.glob("images/overlays*.png"))) == 2


def test_multirun_one_result_per_combination_and_tables(coco_root, tmp_path):
    """`run.py -m` in a subprocess: 2 methods x 1 resolution -> 2 run dirs, then make_tables."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    sweep_dir = tmp_path / "multi"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "run.py"),
            "-m",
            "method=diffseg,kmeans_s",
            "limit=1",
            *base(coco_root),
            f"hydra.sweep.dir={sweep_dir}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted(sweep_dir.rglob("results.json"))
    names = sorted(p.parent.name for p in results)
    assert len(results) == 2, names
    assert names[0].startswith("backbone=tiny") and "method=diffseg" in names[0]
    assert "method=kmeans_s" in names[1] and "dataset.root" not in names[1]
    km = json.loads(next(p for p in results if "kmeans_s" in str(p)).read_text())
    assert km["method"]["name"] == "kmeans_s" and km["random_weights"] is True
    # K-Means-S gets each image's number of ground-truth classes: never more segments than that
    for row in load_rows(results[1].parent / "per_image.csv"):
        assert 1 <= row["num_segments"] <= row["num_classes"]

    table = subprocess.run(
        [
            sys.executable,
            str(REPO / "experiments/make_tables.py"),
            str(sweep_dir),
            "--out",
            str(tmp_path / "tables"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert table.returncode == 0, table.stderr
    md = (tmp_path / "tables/tables.md").read_text()
    assert "RANDOM WEIGHTS" in md and "K-Means-S" in md and "DiffSeg" in md
    assert "random" in (tmp_path / "tables/tables.tex").read_text().lower()


# ---- small pieces, no model ------------------------------------------------------------------


def test_per_image_csv_repairs_only_a_torn_tail(tmp_path):
    from diffseg.runner import RowWriter

    path = tmp_path / "per_image.csv"
    rec = {
        "acc": 50.0,
        "miou": None,
        "num_segments": 3,
        "num_classes": 2,
        "pixels": 4,
        "tp": [2] + [0] * 26,
        "fp": [1] + [0] * 26,
        "fn": [0, 2] + [0] * 25,
    }
    w = RowWriter(path, CSV_COLUMNS)
    w.write({"id": "a", **rec})
    w.write({"id": "b", **rec})
    w.close()
    good = path.read_bytes()
    rows = read_per_image(path, CSV_COLUMNS)
    assert [r["id"] for r in rows] == ["a", "b"] and rows[0]["tp"] == rec["tp"]
    assert rows[0]["miou"] is None and rows[1]["acc"] == 50.0
    with open(path, "ab") as f:  # kill -9 mid-row, and a power loss leaving zero bytes
        f.write(b'c,50.0,,3,2,4,"[2,0,0\x00\x00')
    assert [r["id"] for r in read_per_image(path, CSV_COLUMNS)] == ["a", "b"]
    assert path.read_bytes() == good  # the torn tail is cut off before appending resumes
    with open(path, "ab") as f:  # a complete but damaged last line is dropped too
        f.write(b"c,50.0,,3,2,4,[2],[1]\n")
    assert [r["id"] for r in read_per_image(path, CSV_COLUMNS)] == ["a", "b"]
    assert path.read_bytes() == good
    path.write_bytes(good.replace(b"\na,", b"\na,x", 1))  # damage inside the file: refuse
    with pytest.raises(ResumeError, match="line 2"):
        read_per_image(path, CSV_COLUMNS)


def test_segment_pngs_keep_ids_exactly(tmp_path):
    from diffseg.overlay import edges, make_overlay, save_segments_png
    from eval.score import read_prediction

    small = torch.tensor([[0, 7], [255, 3]])
    big = torch.tensor([[0, 300], [1000, 3]])
    for name, seg in (("small", small), ("big", big)):
        path = save_segments_png(tmp_path / f"{name}.png", seg)
        assert np.array_equal(read_prediction(path), seg.numpy())
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temp files
    assert edges(small).tolist() == [[True, True], [True, False]]
    pic = make_overlay(torch.zeros(3, 8, 8), torch.zeros(2, 2, dtype=torch.long))
    assert pic.shape == (2, 3 * 2 + 2 * 4, 3) and pic.dtype == np.uint8


def test_wandb_mode_never_prompts(monkeypatch, tmp_path):
    from diffseg import tracking

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(tracking, "wandb_logged_in", lambda: False)
    assert tracking._resolve_mode("auto")[0] == "offline"
    with pytest.raises(ValueError, match="no W&B API key"):
        tracking._resolve_mode("online")
    monkeypatch.setattr(tracking, "wandb_logged_in", lambda: True)
    assert tracking._resolve_mode("auto")[0] == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert tracking._resolve_mode("online")[0] == "offline"  # the environment wins
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert isinstance(tracking.build_tracker({"name": "wandb"}, tmp_path, {}), tracking.NullTracker)
    assert isinstance(tracking.build_tracker({"name": "none"}, tmp_path, {}), tracking.NullTracker)
