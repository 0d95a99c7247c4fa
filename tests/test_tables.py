"""experiments/make_tables.py on results.json files written by real (tiny-model) engine runs.

Two runs of the engine on a fixture Cityscapes (2 images, DiffSeg at 320: the paper's setting):
the whole dataset, which the engine records as the full benchmark (the catalog's official size
is set to the fixture's 2 images for it), and ``limit=1``. A third run on a 3-frame copy against
the real official size (500) is a partial copy, marked as such everywhere. No trained weights
exist offline, so "trained" rows are the same files with only the weights flag turned off (what
a run on SD v1.4 writes differs in nothing else that the tables read).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from diffseg import tracking
from diffseg.data import Cityscapes27
from diffseg.tasks.evaluate import evaluate
from diffseg.testing import fakedata

REPO = Path(__file__).resolve().parents[1]


def _load_make_tables():
    spec = importlib.util.spec_from_file_location(
        "make_tables", REPO / "experiments" / "make_tables.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_tables = _load_make_tables()


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory, one_thread):
    """``(folder of both runs, full run dir, limit=1 run dir)``, on random weights."""
    from diffseg.backbones import build_backbone

    base = tmp_path_factory.mktemp("tables")
    root = base / "cityscapes"
    assert len(fakedata.write_cityscapes(root, n=2, size=(32, 64), seed=2)) == 2
    common = ["backbone=tiny", "logger=none", "dataset=cityscapes", f"dataset.root={root}"]
    common += ["resolution=320", "num_workers=0", "num_overlays=0"]
    backbone = build_backbone("tiny", seed=0)
    runs = base / "random"
    info = dataclasses.replace(Cityscapes27.info, official_sizes={"val": 2})
    with pytest.MonkeyPatch.context() as mp:  # the fixture is the whole benchmark here
        mp.setattr(Cityscapes27, "info", info)
        evaluate(compose_cfg(*common), runs / "full", backbone=backbone)
        evaluate(compose_cfg(*common, "limit=1"), runs / "limit1", backbone=backbone)
    return runs, runs / "full", runs / "limit1"


class RecordingTracker(tracking.NullTracker):
    """Stands in for W&B: keeps the tags it was built with and the summary it was given."""

    def __init__(self, tags):
        self.tags, self.summary = list(tags), {}

    def log_summary(self, summary):
        self.summary.update(summary)


@pytest.fixture(scope="module")
def partial_run(tmp_path_factory, one_thread):
    """A run on a Cityscapes copy with 3 of the 500 val frames: ``(run dir, tracker)``."""
    from diffseg.backbones import build_backbone

    base = tmp_path_factory.mktemp("partial")
    root = base / "cityscapes"
    fakedata.write_cityscapes(root, n=3, size=(32, 64), seed=3)
    trackers = []

    def build_tracker(logger_cfg, run_dir, config, tags=(), run_id=None, name=None):
        trackers.append(RecordingTracker(tags))
        return trackers[-1]

    overrides = ["backbone=tiny", "logger=none", "dataset=cityscapes", f"dataset.root={root}"]
    overrides += ["resolution=320", "num_workers=0", "num_overlays=0"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tracking, "build_tracker", build_tracker)
        evaluate(compose_cfg(*overrides), base / "run", backbone=build_backbone("tiny", seed=0))
    return base / "run", trackers[0]


def test_a_partial_copy_is_marked_partial_everywhere(partial_run, tmp_path, capsys):
    run_dir, tracker = partial_run
    res = read(run_dir)
    ds = res["dataset"]
    # results.json: not the full benchmark, with the count found vs the official one
    assert ds["full_benchmark"] is False and ds["incomplete"] is True
    assert (ds["images_found"], ds["images_expected"]) == (3, 500)
    assert res["complete"] is True and res["limit"] is None  # every image found was scored
    # the printed summary
    assert "NOT the full benchmark: 3 of 500 found" in (run_dir / "summary.txt").read_text()
    # the tables: partial, with the official count, never compared with the paper
    cov = make_tables.coverage(res)
    assert cov == {"images": 3, "expected": 500, "partial": True, "subset": None}
    trained = as_trained(run_dir, tmp_path / "trained" / "run")
    assert make_tables.main([str(trained.parent)]) == 0
    row = _row(capsys.readouterr().out.split("## The paper's numbers")[0], "trained/run")
    assert "| 3/500 (partial) |" in row and f"| {res['acc']:.1f} | 76.0 | – |" in row
    # W&B: a tag, and the coverage in the summary
    assert "partial" in tracker.tags
    assert tracker.summary["dataset/full_benchmark"] is False
    assert tracker.summary["dataset/images_expected"] == 500


def test_an_own_id_list_is_a_subset_not_a_partial_copy(tmp_path, caplog):
    root = tmp_path / "cityscapes"
    ids = fakedata.write_cityscapes(root, n=3, size=(32, 64))
    listed = Cityscapes27(root, ids_file=fakedata.write_id_list(tmp_path / "ids.txt", ids[:2]))
    assert not caplog.records  # no warning for the user's own list
    assert listed.benchmark_coverage() == {
        "full_benchmark": False,
        "images_found": 2,
        "images_expected": None,
        "incomplete": False,
    }
    assert tracking.coverage_tags(listed.benchmark_coverage()) == ["partial"]
    whole = Cityscapes27(root)
    (warning,) = [r.getMessage() for r in caplog.records]  # said when the copy is opened
    assert warning == whole.coverage_note() and str(root) in warning
    assert whole.benchmark_coverage(whole.ids[:1])["images_expected"] == 500
    assert "3 of the benchmark's 500 images found" in whole.coverage_note()


def read(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def as_trained(src: Path, dst: Path, name: str = "sd14", **changes) -> Path:
    """A copy of a run dir whose results.json says the weights were trained (backbone ``name``),
    with ``changes`` to its top-level keys."""
    shutil.copytree(src, dst)
    res = read(dst)
    res.pop("WARNING", None)
    res["random_weights"] = False
    res["backbone"] = {**res["backbone"], "name": name, "is_random": False}
    res.update(changes)
    (dst / "results.json").write_text(json.dumps(res))
    return dst


def test_paper_numbers():
    rows = {r["key"]: r for r in make_tables.load_paper()}
    expected = {
        "coco_diffseg_512": (72.5, 43.6),
        "coco_diffseg_320": (72.5, 43.0),
        "coco_kmeans_c_512": (58.9, 33.7),
        "coco_kmeans_s_512": (62.6, 34.7),
        "coco_stego": (56.9, 28.2),
        "coco_reco": (46.1, 26.3),
        "coco_maskclip": (32.2, 19.6),
        "coco_picie": (48.1, 13.8),
        "cityscapes_diffseg_320": (76.0, 21.2),
    }
    diffseg_rows = {k: (r["acc"], r["miou"]) for k, r in rows.items()
                    if "diffcut" not in k and "seg4diff" not in k}  # fmt: skip
    assert diffseg_rows == expected
    # DiffCut's tables (mIoU only): Table 1 with PAMR, and one value of each other row
    table1 = [rows[f"diffcut_pamr_{d}"]["miou"] for d in
              ("voc", "context", "coco_object", "coco_stuff27", "cityscapes", "ade20k")]  # fmt: skip
    assert table1 == [65.2, 56.5, 34.1, 49.1, 30.6, 44.3]
    assert rows["diffcut_no_pamr_cityscapes"]["miou"] == 28.4
    assert rows["diffcut_sd14_ade20k"]["match"]["settings"]["tau"] == 0.2
    assert rows["diffcut_tuned_coco_object"]["miou"] == 38.7
    assert all(r["acc"] is None for k, r in rows.items() if "diffcut" in k)


def test_engine_results_match_the_paper_and_say_what_they_cover(engine_runs):
    _, full_dir, limit_dir = engine_runs
    paper = make_tables.load_paper()
    full, limited = read(full_dir), read(limit_dir)
    assert full["dataset"]["full_benchmark"] is True and full["complete"] is True
    assert limited["dataset"]["full_benchmark"] is False and limited["limit"] == 1
    # dataset, method, resolution and settings (the method's own description) are the paper's
    assert make_tables.paper_row(full, paper)["key"] == "cityscapes_diffseg_320"
    assert make_tables.paper_row(limited, paper)["key"] == "cityscapes_diffseg_320"
    assert make_tables.coverage(full) == {
        "images": 2,
        "expected": 2,
        "partial": False,
        "subset": None,
    }
    cov = make_tables.coverage(limited)
    assert cov["subset"] == "limit=1 of 2" and not make_tables.comparable({**cov, "paper": None})
    # another setting, another resolution, another method: not the paper's row
    other = {**full, "method": {**full["method"], "kl_threshold": [1.1] * 3}}
    assert make_tables.paper_row(other, paper) is None
    assert make_tables.paper_row({**full, "resolution": 512}, paper) is None
    assert make_tables.paper_row({**full, "method": {"name": "kmeans_c"}}, paper) is None
    # a run that does not finish its images is partial
    cov = make_tables.coverage({**full, "num_images": 1, "complete": False})
    assert cov["partial"] is True and cov["expected"] == 2


def test_another_class_list_is_its_own_dataset(engine_runs, tmp_path, capsys):
    """A Cityscapes run with the 19 trainIds (or Context with 59 classes) is never shown as,
    or compared with, the 27-class benchmark's row."""
    _, full_dir, _ = engine_runs
    full = read(full_dir)
    assert full["dataset"]["classes"] == 27 and make_tables.dataset_key(full) == "cityscapes"
    nineteen = {**full, "dataset": {**full["dataset"], "classes": 19}}
    assert make_tables.dataset_key(nineteen) == "cityscapes19"
    assert make_tables.paper_row(nineteen, make_tables.load_paper()) is None
    context = {"dataset": {"name": "context", "classes": 59}}
    assert make_tables.dataset_key(context) == "context59"
    assert make_tables.dataset_key({"dataset": {"name": "context", "classes": 60}}) == "context"
    run = as_trained(full_dir, tmp_path / "trained19")
    (run / "results.json").write_text(json.dumps({**read(run), "dataset": nineteen["dataset"]}))
    assert make_tables.main([str(tmp_path)]) == 0
    row = _row(capsys.readouterr().out, "trained19")
    assert row.startswith("| Cityscapes-19 |") and "76.0" not in row


def _row(md: str, path_part: str) -> str:
    lines = [line for line in md.splitlines() if line.startswith("|") and path_part in line]
    assert len(lines) == 1, (path_part, md)
    return lines[0]


def test_tables_give_deltas_only_to_the_full_benchmark(engine_runs, tmp_path, capsys):
    runs, full_dir, limit_dir = engine_runs
    trained = tmp_path / "trained"
    as_trained(full_dir, trained / "full")
    as_trained(limit_dir, trained / "limit1")
    out = tmp_path / "tables"
    assert make_tables.main([str(trained), str(runs), "--out", str(out)]) == 0
    md = capsys.readouterr().out
    assert md == (out / "tables.md").read_text()
    results, rest = md.split("## ⚠ RANDOM WEIGHTS")
    random_part = rest.split("## The paper's numbers")[0]

    full, limited = read(full_dir), read(limit_dir)
    row = _row(results, "trained/full")
    acc, miou = full["acc"], full["miou"]
    assert f"| {acc:.1f} | 76.0 | {acc - 76.0:+.1f} |" in row
    assert f"| {miou:.1f} | 21.2 | {miou - 21.2:+.1f} |" in row
    row = _row(results, "trained/limit1")
    assert "| 1 (limit=1 of 2) |" in row  # marked...
    assert f"| {limited['acc']:.1f} | 76.0 | – |" in row  # ...and never compared
    assert f"| {limited['miou']:.1f} | 21.2 | – |" in row
    assert "not the full benchmark" in results
    # the runs on random weights are apart and flagged, never among the results
    assert "random/" not in results
    for name in ("random/full", "random/limit1"):
        assert "| tiny ⚠ RANDOM WEIGHTS |" in _row(random_part, name)

    tex = (out / "tables.tex").read_text()
    assert r"\toprule" in tex and "2 run(s) on RANDOM WEIGHTS left out" in tex
    (full_tex,) = [line for line in tex.splitlines() if "DiffSeg &" in line]
    (limit_tex,) = [line for line in tex.splitlines() if "DiffSeg (limit=1 of 2)" in line]
    assert f"{acc - 76.0:+.1f}" in full_tex
    assert limit_tex.count("--") == 2


def test_script_runs_on_engine_output(engine_runs, tmp_path):
    runs, _, _ = engine_runs
    proc = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "make_tables.py"), str(runs)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "RANDOM WEIGHTS" in proc.stdout and "Cityscapes-27" in proc.stdout


def test_no_results_is_a_clear_error(tmp_path, capsys):
    assert make_tables.main([str(tmp_path), str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert "missing does not exist" in err and "no results.json" in err


@pytest.mark.parametrize("value", [None, math.nan])
def test_results_without_a_metric_are_skipped(engine_runs, tmp_path, value):
    _, full_dir, _ = engine_runs
    res = {**read(full_dir), "acc": value, "miou": value}  # as an image-folder run writes
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "results.json").write_text(json.dumps(res))
    assert make_tables.collect([tmp_path], make_tables.load_paper()) == []


# ---- the MM-DiT experiments: Seg4Diff (UNCONFIRMED paper numbers) and the rows no paper has ----

MMDIT_EXPERIMENTS = {
    "mmdit_diffseg": ["backbone=tiny_sd3"],
    "mmdit_diffcut": ["backbone=tiny_flux", "method.refine=false", "method.partial_eigh=true"],
    "seg4diff_released": ["backbone=tiny_sd3"],
    "seg4diff_intended": ["backbone=tiny_sd3"],
}


@pytest.fixture(scope="module")
def mmdit_runs(tmp_path_factory, one_thread):
    """The folder of one engine run per MM-DiT experiment (tiny random backbones, one
    COCO-Stuff image, 512 px input, evaluation at 64)."""
    base = tmp_path_factory.mktemp("mmdit")
    root = base / "coco"
    fakedata.write_cocostuff(root, n=1, size=(40, 52), seed=1)
    common = [f"dataset.root={root}", "dataset.curated=false", "logger=none", "num_workers=0",
              "num_overlays=0", "image_size=512", "resolution=64"]  # fmt: skip
    for name, overrides in MMDIT_EXPERIMENTS.items():
        evaluate(compose_cfg(f"experiment={name}", *overrides, *common), base / "random" / name)
    return base / "random"


def test_mmdit_experiments_are_rows_with_their_paper_status(mmdit_runs, tmp_path, capsys):
    trained = tmp_path / "trained"
    for name in MMDIT_EXPERIMENTS:
        as_trained(mmdit_runs / name, trained / name, name="flux" if "diffcut" in name else "sd3")
    # a Seg4Diff run under the release's protocol (preprocessing=seg4diff at 640, what
    # method=seg4diff runs; the fixture evaluates at 64 to stay small) is compared with the
    # UNCONFIRMED numbers
    released = read(mmdit_runs / "seg4diff_released")
    protocol = {"resolution": 640, "dataset": {**released["dataset"], "preprocessing": "seg4diff"}}
    as_trained(mmdit_runs / "seg4diff_released", trained / "release_protocol", "sd3", **protocol)
    out = tmp_path / "tables"
    assert make_tables.main([str(trained), str(mmdit_runs), "--out", str(out)]) == 0
    md = capsys.readouterr().out
    results, rest = md.split("## ⚠ RANDOM WEIGHTS")
    random_part, paper_part = rest.split("## The paper's numbers")

    for name, method in (("mmdit_diffseg", "DiffSeg"), ("mmdit_diffcut", "DiffCut")):
        res, row = read(mmdit_runs / name), _row(results, f"trained/{name}")
        assert row.startswith(f"| COCO-Stuff-27 | {method} | 64 |")
        assert f"| {res['miou']:.1f} | no paper number | – |" in row
        assert f"| {res['acc']:.1f} | no paper number | – |" in row
    for name in ("seg4diff_released", "seg4diff_intended"):  # at 64, not the protocol's 640
        row = _row(results, f"trained/{name}")
        assert row.startswith("| COCO-Stuff-27 | Seg4Diff | 64 | sd3 |") and "paper" not in row
        assert f"| {read(mmdit_runs / name)['miou']:.1f} | – | – |" in row
    row = _row(results, "trained/release_protocol")
    assert f"| {released['miou']:.1f} | 49.7 (UNCONFIRMED) | – |" in row  # curated=false: no Δ
    assert "no paper number: DiffSeg on an MM-DiT (`experiment=mmdit_diffseg`)" in results
    assert "Paper numbers marked UNCONFIRMED" in results
    assert "compared only with runs under the release's protocol" in results
    # random weights: apart and flagged, no paper column
    for name in MMDIT_EXPERIMENTS:
        assert "tiny_" in _row(random_part, f"random/{name}")
        assert "⚠ RANDOM WEIGHTS" in _row(random_part, f"random/{name}")
    # the paper's table: Seg4Diff's five UNCONFIRMED rows, and the experiments without a number
    seg4diff = [line for line in paper_part.splitlines() if "Seg4Diff" in line]
    assert len(seg4diff) == 5 and all("(UNCONFIRMED)" in line for line in seg4diff)
    assert (
        "| Pascal VOC | Seg4Diff, SD3-medium, training-free (UNCONFIRMED) | – | 54.9 |" in seg4diff
    )
    assert "Rows no paper has (no paper number):" in paper_part
    for experiment in (REPO / "configs" / "experiment").glob("mmdit_*.yaml"):
        assert f"`experiment={experiment.stem}`" in paper_part
    tex = (out / "tables.tex").read_text()
    assert tex.count("no paper number") == 4 and "49.7 (UNCONFIRMED)" in tex


def test_seg4diff_paper_rows_need_the_release_protocol():
    """Seg4Diff's UNCONFIRMED numbers sit beside a run only under its protocol: the release's
    preprocessing at 640, per-image matching, no background merge, Context's 59 classes."""
    paper = make_tables.load_paper()

    def result(dataset, **extra):
        return {
            "dataset": {"preprocessing": "seg4diff", **dataset},
            "method": {"name": "seg4diff", "layer": 9, "noise_step": 8},
            "backbone_name": "sd3",
            "resolution": 640,
            **extra,
        }

    voc = result({"name": "voc"}, background_merge=False, matching="image")
    assert make_tables.paper_row(voc, paper)["miou"] == 54.9
    assert make_tables.paper_row({**voc, "background_merge": True}, paper) is None
    assert make_tables.paper_row({**voc, "matching": "row"}, paper) is None
    assert make_tables.paper_row({**voc, "resolution": 512}, paper) is None
    pc59 = result({"name": "context", "classes": 59})
    assert make_tables.paper_row(pc59, paper)["miou"] == 52.6
    assert make_tables.paper_row(result({"name": "context", "classes": 60}), paper) is None
