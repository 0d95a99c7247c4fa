"""The evaluation task end to end: real Hydra config, tiny random backbone, fixture datasets.

UNet passes of the tiny model dominate the time, so the tests share one uninterrupted reference
run and one loaded backbone (passed to ``evaluate(backbone=...)``), count passes with a wrapper,
and use 48x64 fixture images evaluated at 64x64.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import MissingConfigException
from hydra.types import RunMode
from omegaconf import open_dict
from PIL import Image

from diffseg.data import load_coco_stuff27_metadata
from diffseg.engine.records import CSV_COLUMNS, CSV_COLUMNS_UNLABELLED, RowWriter, read_per_image
from diffseg.engine.settings import format_value
from diffseg.errors import ConfigError, DataError, ResumeError
from diffseg.tasks.evaluate import evaluate, resume_hint
from diffseg.testing import fakedata
from eval.metrics import HungarianMetrics

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = str(REPO / "configs")
RES = 64  # evaluation size: small labels keep the metric and PNGs cheap
N_IMAGES = 2
STAGES = ("data", "features", "method", "scoring")


def compose_cfg(*overrides: str, hydra: bool = False):
    """The real config, composed as `python run.py <overrides>` would."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra)


def cli_env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def run_cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "run.py"), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=cli_env(),
        timeout=timeout,
    )


@pytest.fixture(scope="module", autouse=True)
def shared_umask():
    """Results must follow the umask: with 022 every file is readable by the group."""
    old = os.umask(0o022)
    yield
    os.umask(old)


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
    """Wraps a backbone and counts feature passes (and the images through them)."""

    def __init__(self, backbone):
        self._bb = backbone
        self.calls = 0
        self.images = 0

    def __getattr__(self, name):
        return getattr(self._bb, name)

    def extract(self, images, request):
        self.calls += 1
        self.images += images.shape[0]
        return self._bb.extract(images, request)


@pytest.fixture(scope="module")
def tiny_backbone(one_thread):
    from diffseg.backbones import build_backbone

    return build_backbone("tiny", seed=0)


@pytest.fixture(scope="module")
def ref_run(coco_root, tiny_backbone, tmp_path_factory):
    """One uninterrupted run with predictions and overlays."""
    run_dir = tmp_path_factory.mktemp("ref")
    cfg = compose_cfg(*base(coco_root), "save_predictions=true", "num_overlays=2")
    out = evaluate(cfg, run_dir, backbone=tiny_backbone)
    return run_dir, out


def load_rows(path: Path, columns=CSV_COLUMNS) -> list[dict]:
    return read_per_image(path, columns, repair=False)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_run_writes_consistent_outputs(ref_run, coco_root):
    run_dir, out = ref_run
    res = read_json(run_dir / "results.json")
    # random weights are flagged loudly
    assert res["random_weights"] is True and out["random_weights"] is True
    assert "RANDOM WEIGHTS" in res["WARNING"]
    assert res["backbone"]["name"].startswith("tiny") and res["backbone"]["is_random"] is True
    assert res["method"]["name"] == "diffseg" and res["method"]["kl_threshold"] == [1.1] * 3
    assert res["resolution"] == RES
    ds = res["dataset"]
    assert ds["name"] == "coco_stuff27" and ds["size"] == ds["num_images_run"] == N_IMAGES
    assert ds["full_benchmark"] is False  # dataset.curated=false is not the benchmark
    assert res["limit"] is None and res["complete"] is True and res["images_resumed"] == 0
    assert res["num_images"] == N_IMAGES
    names = load_coco_stuff27_metadata()["coarse_names"]
    assert list(res["iou_per_class"]) == names and len(names) == 27
    timing = res["timing"]
    assert len(timing["sessions"]) == 1 and timing["images"] == N_IMAGES
    assert set(timing["stage_seconds"]) == set(STAGES) and timing["stage_seconds"]["features"] > 0
    assert timing["images_per_s"] > 0 and res["peak_memory"]["cpu_rss_mb"] > 0
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
        assert r["random_weights"] == 1  # every row says its weights were random

    # overlays for the first 2 images: image | segments | overlay | ground truth, with a
    # caption strip on top and PNG text saying the weights were random
    overlays = sorted((run_dir / "overlays").glob("*.png"))
    assert [p.stem for p in overlays] == [r["id"] for r in rows[:2]]
    with Image.open(overlays[0]) as im:
        side = 4 * RES  # captioned: magnified (x4) so that the caption is readable
        assert im.size[0] == 4 * side + 3 * 4 and im.size[1] > side
        assert im.text["diffseg:random_weights"] == "true"
        strip = np.asarray(im.convert("RGB"))[: im.size[1] - side]
        assert strip.std() > 0  # the caption is drawn, not an empty band

    # predictions are segment-id PNGs, marked too, that eval.score scores to the same numbers
    from eval.score import main as score_main

    preds = sorted((run_dir / "predictions").glob("*.png"))
    assert len(preds) == N_IMAGES
    with Image.open(preds[0]) as im:
        assert im.size == (RES, RES) and im.text["diffseg:random_weights"] == "true"
    scored = run_dir.parent / f"{run_dir.name}_scored.json"
    argv = ["--dataset", "coco_stuff27", "--predictions", str(run_dir / "predictions")]
    argv += ["--root", str(coco_root), "--resolution", str(RES), "--no-curated"]
    argv += ["--output", str(scored), "--workers", "1"]
    assert score_main(argv) == 0
    s = read_json(scored)
    assert s["tp"] == res["tp"] and s["fn"] == res["fn"] and s["fp"] == res["fp"]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_result_files_follow_the_umask(ref_run):
    """Under umask 022 every result file is 0644, atomic writes included."""
    run_dir, _ = ref_run
    files = [run_dir / n for n in ("results.json", "run.json", "per_image.csv", "summary.txt")]
    files += sorted((run_dir / "overlays").glob("*.png"))
    files += sorted((run_dir / "predictions").glob("*.png"))
    assert len(files) == 4 + 2 * N_IMAGES
    assert {f.name: oct(_mode(f)) for f in files} == {f.name: oct(0o644) for f in files}


def test_resume_after_kill_equals_uninterrupted_and_sweep_shares_features(
    ref_run, coco_root, tiny_backbone, tmp_path
):
    """Two thresholds from one feature pass per image; interrupted after the first image with
    a torn last row in one setting (kill -9 mid-write), then resumed: the 1.1 setting equals
    the uninterrupted reference run exactly, and results.json keeps both sessions' timings."""
    ref_dir, _ = ref_run
    cfg = compose_cfg(*base(coco_root), "+sweep.kl_threshold=[1.1,1.0]", "num_overlays=0")
    counting = CountingBackbone(tiny_backbone)

    def interrupt(done: int, ids: list[str]) -> None:
        if done >= 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate(cfg, tmp_path, on_batch=interrupt, backbone=counting)
    assert counting.calls == 1
    # setting names keep the decimal point of a float: kl_threshold=1.0, not kl_threshold=1
    dirs = [tmp_path / "kl_threshold=1.1", tmp_path / "kl_threshold=1.0"]
    for d in dirs:
        assert len(load_rows(d / "per_image.csv")) == 1
        assert not (d / "results.json").exists()  # results only at the end of a session
    ref_rows = load_rows(ref_dir / "per_image.csv")
    # kill -9 while writing the first image's row of the second setting: its file ends in a
    # torn row (no newline), the first setting's row is complete
    csv_10 = dirs[1] / "per_image.csv"
    text = csv_10.read_text()
    header, row = text.splitlines()[:2]
    csv_10.write_text(header + "\n" + row[: len(row) // 2])

    out = evaluate(cfg, tmp_path, backbone=counting)
    # both images need a pass again (image 1 for the 1.0 setting only), one pass each
    assert counting.calls == 1 + N_IMAGES
    assert set(out["results"]) == {"kl_threshold=1.1", "kl_threshold=1.0"}
    ref = read_json(ref_dir / "results.json")
    res = read_json(dirs[0] / "results.json")
    assert res["tp"] == ref["tp"] and res["fp"] == ref["fp"] and res["fn"] == ref["fn"]
    assert res["acc"] == ref["acc"] and res["miou"] == ref["miou"]
    assert res["images_resumed"] == 1 and res["complete"] is True
    assert read_json(dirs[1] / "results.json")["images_resumed"] == 0
    rows = load_rows(dirs[0] / "per_image.csv")
    assert [r["id"] for r in rows] == [r["id"] for r in ref_rows]
    assert [r["id"] for r in load_rows(csv_10)] == [r["id"] for r in ref_rows]
    assert csv_10.read_text().endswith("\n")
    other = read_json(dirs[1] / "results.json")
    assert other["method"]["kl_threshold"] == [1.0] * 3 and other["num_images"] == N_IMAGES
    assert other["sweep_overrides"] == {"kl_threshold": 1.0}
    sweep = read_json(tmp_path / "sweep_results.json")
    assert [s["setting"] for s in sweep["settings"]] == ["kl_threshold=1.1", "kl_threshold=1.0"]

    # the timings of both sessions: the interrupted one (1 image) and the resume (2 images)
    timing = res["timing"]
    sessions = timing["sessions"]
    assert [s["images"] for s in sessions] == [1, N_IMAGES]
    assert timing["images"] == 1 + N_IMAGES
    assert timing["wall_time_s"] == pytest.approx(sum(s["wall_time_s"] for s in sessions), abs=1e-2)
    for key in STAGES:
        total = sum(s["stages"]["seconds"][key] for s in sessions)
        assert timing["stage_seconds"][key] == pytest.approx(total, abs=1e-2)
    assert read_json(tmp_path / "run.json")["sessions"] == sessions

    # every file of a sweep is readable by the group too
    for f in (tmp_path / "sweep_results.json", tmp_path / "run.json", *dirs):
        f = f / "results.json" if f.is_dir() else f
        assert _mode(f) == 0o644, f

    # a finished run started again does nothing but rewrite the same results
    evaluate(cfg, tmp_path, backbone=counting)
    assert counting.calls == 1 + N_IMAGES
    again = read_json(dirs[0] / "results.json")
    assert again["tp"] == ref["tp"] and len(again["timing"]["sessions"]) == 2


def test_resume_mid_batch_segments_only_the_missing_images(coco_root, tiny_backbone, tmp_path):
    """batch_size=2, killed while writing the batch's rows: the 1.1 setting kept its first row,
    the 0.9 setting none. The resume passes the batch through the UNet once and each setting
    segments only what it lacks; every row equals the one the interrupted session computed."""
    cfg = compose_cfg(
        *base(coco_root), "batch_size=2", "+sweep.kl_threshold=[1.1,0.9]", "num_overlays=0"
    )
    counting = CountingBackbone(tiny_backbone)

    def interrupt(done: int, ids: list[str]) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate(cfg, tmp_path, on_batch=interrupt, backbone=counting)
    csvs = [
        tmp_path / "kl_threshold=1.1" / "per_image.csv",
        tmp_path / "kl_threshold=0.9" / "per_image.csv",
    ]
    first = [load_rows(c) for c in csvs]
    assert [len(rows) for rows in first] == [N_IMAGES, N_IMAGES]
    for c, keep in zip(csvs, (1, 0), strict=True):
        lines = c.read_text().splitlines(keepends=True)
        c.write_text("".join(lines[: 1 + keep]))

    evaluate(cfg, tmp_path, backbone=counting)
    assert counting.calls == 2 and counting.images == 2 * N_IMAGES
    for c, rows in zip(csvs, first, strict=True):
        assert load_rows(c) == rows
        res = read_json(c.parent / "results.json")
        again = HungarianMetrics(27)
        again.add_records(rows)
        assert res["tp"] == again.compute()["tp"] and res["num_images"] == N_IMAGES


def test_resume_refuses_another_config(ref_run, coco_root):
    run_dir, _ = ref_run
    before = (run_dir / "per_image.csv").read_bytes()
    cfg = compose_cfg(*base(coco_root), "save_predictions=true", "method.kl_threshold=0.9")
    with pytest.raises(ResumeError, match=r"kl_threshold.*1\.1.*0\.9"):
        evaluate(cfg, run_dir)
    assert (run_dir / "per_image.csv").read_bytes() == before


@pytest.fixture(scope="module")
def city_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("city")
    assert len(fakedata.write_cityscapes(root, n=N_IMAGES, size=(32, 64), seed=1)) == N_IMAGES
    return root


def test_limit_is_recorded_marked_partial_and_cannot_change(city_root, tiny_backbone, tmp_path):
    """A limit=1 run of a benchmark records the dataset's size and the limit and is not the
    full benchmark; the same run dir refuses another limit and a late save_predictions."""
    common = ["backbone=tiny", "logger=none", f"resolution={RES}", "num_workers=0"]
    common += ["dataset=cityscapes", f"dataset.root={city_root}", "num_overlays=0"]
    run_dir = tmp_path / "run"
    evaluate(compose_cfg(*common, "limit=1"), run_dir, backbone=tiny_backbone)
    res_file = run_dir / "results.json"
    before = res_file.read_bytes()
    res = json.loads(before)
    assert res["limit"] == 1 and res["num_images"] == 1 and res["complete"] is True
    ds = res["dataset"]
    assert ds["name"] == "cityscapes" and ds["size"] == N_IMAGES and ds["num_images_run"] == 1
    assert ds["full_benchmark"] is False
    assert "NOT the full benchmark" in (run_dir / "summary.txt").read_text()

    for change, key in ((["limit=2"], "limit"), (["limit=null"], "limit")):
        with pytest.raises(ResumeError, match=key):
            evaluate(compose_cfg(*common, *change), run_dir, backbone=tiny_backbone)
    # the earlier image has no prediction PNG: asking for predictions now is refused
    with pytest.raises(ResumeError, match="save_predictions"):
        evaluate(compose_cfg(*common, "limit=1", "save_predictions=true"), run_dir)
    assert res_file.read_bytes() == before
    assert not (run_dir / "predictions").exists()


def test_setting_names_keep_floats():
    assert format_value(1.0) == "1.0" and format_value(1.1) == "1.1" and format_value(2) == "2"
    assert format_value([1.1, 1.0]) == "1.1-1.0" and format_value(1e-5) == "1e-05"


def test_method_defaults_are_the_methods_and_explicit_values_win():
    cfg = compose_cfg("dataset=cityscapes")
    assert cfg.method.kl_threshold is None and "kl_threshold" not in cfg.dataset
    cfg = compose_cfg("dataset=cityscapes", "method.kl_threshold=1.0")
    assert cfg.method.kl_threshold == 1.0
    cfg = compose_cfg("experiment=coco_table1_diffseg_320")
    assert cfg.resolution == 320 and cfg.backbone.name == "sd14"
    cfg = compose_cfg("experiment=ablation_threshold")
    assert list(cfg.sweep.kl_threshold) == [0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3]
    cfg = compose_cfg("experiment=cityscapes_diffseg_320")
    assert cfg.dataset.name == "cityscapes" and cfg.resolution == 320


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("resolution=7", "resolution=7"),
        ("resolution=abc", "resolution='abc'"),
        ("device=cuda:0" if not torch.cuda.is_available() else "device=tpu", "device="),
        ("dtype=int8", "dtype='int8'"),
        ("batch_size=0", "batch_size=0"),
        ("+sweep.bogus=[1,2]", "no parameter 'bogus'"),
        ("method.num_points=0", "num_points=0 is invalid"),
        ("method.kl_threshold=abc", "kl_threshold='abc' is invalid: it must be a number > 0"),
    ],
)
def test_bad_values_give_one_clear_error(coco_root, tmp_path, override, match):
    cfg = compose_cfg(*base(coco_root), override)
    with pytest.raises(ConfigError, match=match):
        evaluate(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_missing_dataset_root_and_folder_path(tmp_path):
    missing = tmp_path / "nowhere"
    cfg = compose_cfg("backbone=tiny", "logger=none", f"dataset.root={missing}")
    with pytest.raises(DataError, match="nowhere"):
        evaluate(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    cfg = compose_cfg("backbone=tiny", "logger=none", "dataset=folder")
    with pytest.raises(ConfigError, match="dataset.path="):
        evaluate(cfg, tmp_path / "run")
    with pytest.raises(MissingConfigException, match="kmeans_x"):
        compose_cfg("method=kmeans_x")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("dataset.root={missing}", "error: dataset=coco_stuff27: COCO-Stuff not found at"),
        ("resolution=abc", "error: resolution='abc' is invalid"),
    ],
)
def test_cli_error_is_one_line_and_leaves_no_run_dir(tmp_path, override, message):
    """A run that never started: one `error:` line, exit 2, and no run dir left behind."""
    run_dir = tmp_path / "run"
    override = override.format(missing=tmp_path / "missing")
    proc = run_cli(
        "backbone=tiny", "logger=none", override, f"hydra.run.dir={run_dir}", cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), proc.stderr
    assert not run_dir.exists()


def test_corrupt_image_is_one_error_line_in_stderr_and_run_log(tmp_path):
    """A damaged benchmark image (read in a DataLoader worker): one `error:` line naming the
    file, exit status 2, and the same line in the run dir's run.log."""
    root = tmp_path / "coco"
    ids = fakedata.write_cocostuff(root, n=N_IMAGES, size=(48, 64), seed=5)
    bad = root / "images" / "val2017" / f"{ids[0]}.jpg"
    bad.write_bytes(b"\x00 not a jpeg \xff" * 7)
    run_dir = tmp_path / "run"
    proc = run_cli(
        *base(root), "num_workers=1", "num_overlays=0", f"hydra.run.dir={run_dir}", cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert str(bad) in errors[0]
    log_lines = (run_dir / "run.log").read_text().splitlines()
    assert any(line.endswith(errors[0]) for line in log_lines)
    assert not (run_dir / "results.json").exists()


def test_resume_hint_repeats_the_multirun(monkeypatch, tmp_path):
    """Ctrl-C in a multirun: the hint is the whole sweep again (the command line, not the job's
    one combination) with hydra.sweep.dir pinned; a single run gets hydra.run.dir."""
    cfg = compose_cfg("method=kmeans_s", "resolution=320", hydra=True)
    sweep_dir = tmp_path / "multi"
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.sweep.dir = str(sweep_dir)
    argv = ["run.py", "-m", "method=diffseg,kmeans_s", "resolution=320", "sweep.tau=[0.1,0.2]"]
    monkeypatch.setattr(sys, "argv", argv)
    try:
        HydraConfig.instance().set_config(cfg)
        hint = resume_hint(sweep_dir / "method=kmeans_s,resolution=320")
        assert hint == (
            "python run.py -m method=diffseg,kmeans_s resolution=320 'sweep.tau=[0.1,0.2]' "
            f"hydra.sweep.dir={sweep_dir}"
        )
        # a second Ctrl-C: the hint of the resumed multirun names the dir once
        monkeypatch.setattr(sys, "argv", [*argv, f"hydra.sweep.dir={sweep_dir}"])
        assert resume_hint(sweep_dir / "x") == hint
        HydraConfig.instance().set_config(
            compose_cfg("method=kmeans_s", "resolution=320", hydra=True)
        )
        single = resume_hint(tmp_path / "run")
        assert (
            single == f"python run.py method=kmeans_s resolution=320 hydra.run.dir={tmp_path}/run"
        )
    finally:
        HydraConfig.instance().cfg = None


def _write_photo(path: Path, height: int, width: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)


def test_folder_run_writes_outputs_at_photo_size_and_skips_unreadable(
    tmp_path, tiny_backbone, caplog
):
    """A folder with a panorama and a corrupt file: strict, the corrupt file is a DataError
    that says how to skip it; with skip_unreadable=true it is listed in results.json and the
    run finishes, with the prediction at the photo's own size and one warning about shapes."""
    photos = tmp_path / "photos"
    _write_photo(photos / "pano.jpg", 40, 200, seed=0)
    (photos / "a_broken.jpg").write_bytes(b"this is not a jpeg")
    common = ["backbone=tiny", "logger=none", "dataset=folder", f"dataset.path={photos}"]
    common += ["num_workers=0", f"resolution={RES}"]
    counting = CountingBackbone(tiny_backbone)
    with pytest.raises(DataError, match=r"a_broken\.jpg.*dataset\.skip_unreadable=true"):
        evaluate(compose_cfg(*common), tmp_path / "strict", backbone=counting)
    assert counting.calls == 0

    caplog.clear()
    caplog.set_level(logging.WARNING)
    run_dir = tmp_path / "run"
    cfg = compose_cfg(*common, "dataset.skip_unreadable=true")
    out = evaluate(cfg, run_dir, backbone=counting)
    assert counting.calls == 1
    res = out["results"][""]
    assert res["acc"] is None and res["random_weights"] is True and res["num_images"] == 1
    assert [s["id"] for s in res["skipped"]] == ["a_broken"]
    assert "a_broken.jpg" in res["skipped"][0]["error"]
    assert read_json(run_dir / "results.json")["skipped"] == res["skipped"]
    with Image.open(run_dir / "predictions/pano.png") as im:
        assert im.size == (200, 40) and im.mode in ("L", "I;16")
        assert im.text["diffseg:random_weights"] == "true"
    with Image.open(run_dir / "overlays/pano.png") as im:
        assert im.text["diffseg:random_weights"] == "true"
    rows = load_rows(run_dir / "per_image.csv", CSV_COLUMNS_UNLABELLED)
    assert [r["id"] for r in rows] == ["pano"] and rows[0]["num_segments"] >= 1
    assert rows[0]["random_weights"] == 1
    shapes = [r.getMessage() for r in caplog.records if "to the centre crop" in r.getMessage()]
    assert len(shapes) == 1 and shapes[0].startswith("1 of 2 images lose up to 80% of their area")
    assert "(most: pano); dataset.crop=pad keeps them whole" in shapes[0]  # once per run


def test_bfloat16_run_completes_and_is_flagged_random(coco_root, tmp_path):
    """dtype=bfloat16 end to end, the backbone built from its config."""
    cfg = compose_cfg(*base(coco_root), "dtype=bfloat16", "limit=1", "num_overlays=0")
    out = evaluate(cfg, tmp_path)
    res = read_json(tmp_path / "results.json")
    assert out["random_weights"] is True and res["random_weights"] is True
    assert "RANDOM WEIGHTS" in res["WARNING"]
    assert res["backbone"]["precision"]["unet"] == "bfloat16"
    assert res["complete"] is True and res["num_images"] == 1
    assert 0 <= res["acc"] <= 100 and 0 <= res["miou"] <= 100
    assert [r["random_weights"] for r in load_rows(tmp_path / "per_image.csv")] == [1]


def test_wandb_offline_writes_a_run(ref_run, coco_root, tmp_path, monkeypatch):
    """logger=wandb with WANDB_MODE=offline: an offline run under the run dir with the final
    metrics, the per-class IoU table and the overlays (on a copy of the finished reference run,
    so no UNet pass is needed: a resumed, complete run still logs its results)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    ref_dir, _ = ref_run
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir, ignore=shutil.ignore_patterns("results.json"))
    cfg = compose_cfg(*base(coco_root), "logger=wandb", "save_predictions=true", "num_overlays=2")
    out = evaluate(cfg, run_dir)
    assert out["results"][""]["tp"] == read_json(ref_dir / "results.json")["tp"]
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb"))
    wandb_id = read_json(run_dir / "run.json")["wandb_id"]
    assert wandb_id and runs[0].name.endswith(wandb_id)
    media = runs[0] / "files" / "media"
    assert list(media.glob("table/iou_per_class*.table.json"))
    assert len(list(media.glob("images/overlays*.png"))) == 2


def test_multirun_one_result_per_combination(coco_root, tmp_path):
    """`run.py -m` in a subprocess: 2 methods x 1 resolution -> 2 run dirs."""
    sweep_dir = tmp_path / "multi"
    proc = run_cli(
        "-m",
        "method=diffseg,kmeans_s",
        "limit=1",
        *base(coco_root),
        "num_overlays=0",
        f"hydra.sweep.dir={sweep_dir}",
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted(sweep_dir.rglob("results.json"))
    names = sorted(p.parent.name for p in results)
    assert len(results) == 2, names
    assert names[0].startswith("backbone=tiny") and "method=diffseg" in names[0]
    assert "method=kmeans_s" in names[1] and "dataset.root" not in names[1]
    km = read_json(next(p for p in results if "kmeans_s" in str(p)))
    assert km["method"]["name"] == "kmeans_s" and km["random_weights"] is True
    assert km["limit"] == 1 and km["dataset"]["size"] == N_IMAGES
    # K-Means-S gets each image's number of ground-truth classes: never more segments than that
    for row in load_rows(results[1].parent / "per_image.csv"):
        assert 1 <= row["num_segments"] <= row["num_classes"]


# ---- small pieces, no model ------------------------------------------------------------------


def test_per_image_csv_repairs_only_a_torn_tail(tmp_path):
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
        "random_weights": True,
    }
    w = RowWriter(path, CSV_COLUMNS)
    w.write({"id": "a", **rec})
    w.write({"id": "b", **rec})
    w.close()
    good = path.read_bytes()
    rows = read_per_image(path, CSV_COLUMNS)
    assert [r["id"] for r in rows] == ["a", "b"] and rows[0]["tp"] == rec["tp"]
    assert rows[0]["miou"] is None and rows[1]["acc"] == 50.0 and rows[0]["random_weights"] == 1
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
