"""`python -m eval.score` on fixture datasets written in the real on-disk layouts."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffseg.data import Cityscapes27, CocoStuff27
from diffseg.testing import fakedata
from eval.metrics import HungarianMetrics
from eval.score import main, score_predictions

RES = 24  # evaluation resolution of the fixtures: small and fast


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    ids = fakedata.write_cocostuff(root, n=3, size=(30, 40), seed=2)
    return root, ids


def _write_preds(out: Path, labels, wide: bool, seed: int = 0) -> Path:
    """Predictions = the labels with their classes renamed to arbitrary ids (ignore too)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, image_id in enumerate(labels.ids):
        label = labels.load_label(i).numpy()
        ids = rng.permutation(40000 if wide else 250)[:28]  # [0] = the ignored pixels' id
        pred = ids[label + 1]
        dtype = np.uint16 if wide else np.uint8
        Image.fromarray(pred.astype(dtype)).save(out / f"{image_id}.png")
    return out


def _coco_args(root, preds, *extra):
    return [
        "--dataset",
        "coco_stuff27",
        "--root",
        str(root),
        "--predictions",
        str(preds),
        "--resolution",
        str(RES),
        "--no-curated",
        *extra,
    ]


@pytest.mark.parametrize("wide", [False, True])
def test_permuted_label_predictions_score_100(coco, tmp_path, capsys, wide):
    root, ids = coco
    labels = CocoStuff27(root, curated=False, label_size=RES)
    assert labels.ids == sorted(ids)
    preds = _write_preds(tmp_path / "preds", labels, wide=wide)
    out, per_image = tmp_path / "res" / "results.json", tmp_path / "per_image.jsonl"
    assert main(_coco_args(root, preds, "--output", str(out), "--per-image", str(per_image))) == 0
    assert "ACC 100.00  mIoU 100.00" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["acc"] == 100.0 and res["miou"] == 100.0 and res["num_images"] == 3
    assert res["pixels"] == sum(int((labels.load_label(i) >= 0).sum()) for i in range(3))
    assert res["resolution"] == RES and res["curated"] is False and len(res["class_names"]) == 27
    assert res["classes_counted"] == sum(v is not None for v in res["iou_per_class"])
    rows = [json.loads(line) for line in per_image.read_text().splitlines()]
    assert [r["id"] for r in rows] == labels.ids and all(r["acc"] == 100.0 for r in rows)


def test_scores_equal_the_metric_on_the_arrays(coco, tmp_path):
    root, _ = coco
    labels = CocoStuff27(root, curated=False, label_size=RES)
    rng = np.random.default_rng(3)
    preds = tmp_path / "preds"
    preds.mkdir()
    direct = HungarianMetrics()
    for i, image_id in enumerate(labels.ids):
        pred = rng.integers(0, 12, size=(RES, RES)).astype(np.uint8)
        pred[: RES // 2] = 3  # a big segment so the match is not all noise
        Image.fromarray(pred).save(preds / f"{image_id}.png")
        direct.update(pred, labels.load_label(i))
    metrics, records = score_predictions(labels, preds, batch_size=2, workers=2)
    assert metrics.state() == direct.state()
    assert 0 < metrics.compute()["acc"] < 100
    assert [r["id"] for r in records] == labels.ids


def test_row_matching_flag(coco, tmp_path, capsys):
    # One segment per image: the row matching scores it far higher, and says so.
    root, _ = coco
    labels = CocoStuff27(root, curated=False, label_size=RES)
    preds = tmp_path / "preds"
    preds.mkdir()
    direct = HungarianMetrics(matching="row")
    for i, image_id in enumerate(labels.ids):
        pred = np.zeros((RES, RES), dtype=np.uint8)
        Image.fromarray(pred).save(preds / f"{image_id}.png")
        direct.update(pred, labels.load_label(i))
    results = {}
    for matching in ("image", "row"):
        out = tmp_path / f"{matching}.json"
        assert main(_coco_args(root, preds, "--matching", matching, "--output", str(out))) == 0
        printed = capsys.readouterr().out
        assert ("ROW matching" in printed) == (matching == "row")
        results[matching] = json.loads(out.read_text())
        assert results[matching]["matching"] == matching
    row, image = results["row"], results["image"]
    assert row["tp"] == direct.compute()["tp"] and row["fp"] == direct.compute()["fp"]
    assert "per-row" in row["protocol"] and "NOT a headline" in row["protocol"]
    assert image["protocol"].startswith("per-image")
    assert row["miou"] > image["miou"] and row["pixels"] == image["pixels"]
    metrics, _ = score_predictions(labels, preds, matching="row")
    assert metrics.state() == direct.state()
    with pytest.raises(SystemExit) as exit_info:  # argparse refuses it
        main(_coco_args(root, preds, "--matching", "column"))
    assert exit_info.value.code == 2 and "invalid choice: 'column'" in capsys.readouterr().err


def test_cityscapes(tmp_path, capsys):
    root = tmp_path / "cs"
    fakedata.write_cityscapes(root, n=2, size=(20, 40))
    labels = Cityscapes27(root, label_size=RES)
    preds = _write_preds(tmp_path / "preds", labels, wide=False, seed=1)
    args = ["--dataset", "cityscapes", "--root", str(root), "--predictions", str(preds)]
    out = tmp_path / "results.json"
    assert main([*args, "--resolution", str(RES), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ACC 100.00  mIoU 100.00  (2 images" in printed
    # 2 of the 500 val frames: said as run.py says it
    assert "(NOT the full benchmark: 2 of 500 found)" in printed
    res = json.loads(out.read_text())
    assert res["full_benchmark"] is False and res["images_expected"] == 500
    assert main([*args, "--other-as-class"]) == 2
    assert "--other-as-class applies to ade20k only" in capsys.readouterr().err
    assert main([*args, "--resolution", str(RES), "--no-curated"]) == 2
    assert "applies to coco_stuff27 and coco_object only" in capsys.readouterr().err


def test_missing_prediction(coco, tmp_path, capsys):
    root, ids = coco
    labels = CocoStuff27(root, curated=False, label_size=RES)
    preds = _write_preds(tmp_path / "preds", labels, wide=False)
    (preds / f"{ids[1]}.png").unlink()
    out = tmp_path / "results.json"
    assert main(_coco_args(root, preds, "--output", str(out))) == 2
    err = capsys.readouterr().err
    assert "1 of 3 predictions are missing" in err and ids[1] in err
    assert not out.exists()


def test_wrong_size_prediction(coco, tmp_path, capsys):
    root, ids = coco
    labels = CocoStuff27(root, curated=False, label_size=RES)
    preds = _write_preds(tmp_path / "preds", labels, wide=False)
    Image.fromarray(np.zeros((RES, RES + 1), np.uint8)).save(preds / f"{ids[2]}.png")
    out = tmp_path / "results.json"
    assert main(_coco_args(root, preds, "--output", str(out))) == 2
    err = capsys.readouterr().err
    assert f"{ids[2]}.png is {RES}x{RES + 1}" in err and f"{RES}x{RES}" in err
    assert not out.exists()


def test_extra_file_and_ignore_extra(coco, tmp_path, capsys):
    root, _ = coco
    labels = CocoStuff27(root, curated=False, label_size=RES)
    preds = _write_preds(tmp_path / "preds", labels, wide=False)
    (preds / "notes.txt").write_text("hello")
    (preds / ".hidden").write_text("never counted")
    assert main(_coco_args(root, preds)) == 2
    err = capsys.readouterr().err
    assert "1 entries" in err and "notes.txt" in err and "--ignore-extra" in err
    assert main(_coco_args(root, preds, "--ignore-extra")) == 0


def test_colour_prediction_is_refused(coco, tmp_path, capsys):
    root, ids = coco
    labels = CocoStuff27(root, curated=False, label_size=RES)
    preds = _write_preds(tmp_path / "preds", labels, wide=False)
    Image.fromarray(np.zeros((RES, RES, 3), np.uint8)).save(preds / f"{ids[0]}.png")
    assert main(_coco_args(root, preds)) == 2
    assert "RGB image" in capsys.readouterr().err


def test_ids_file_and_module_entry_point(coco, tmp_path):
    root, ids = coco
    labels = CocoStuff27(root, ids=ids[:2], label_size=RES)
    preds = _write_preds(tmp_path / "preds", labels, wide=True)
    ids_file = fakedata.write_id_list(tmp_path / "ids.txt", ids[:2])
    cmd = [sys.executable, "-m", "eval.score", *_coco_args(root, preds, "--ids-file", ids_file)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr
    assert "ACC 100.00  mIoU 100.00  (2 images" in done.stdout


def _engine_predictions(run_dir: Path, labels, random_weights: bool) -> Path:
    """The labels written as predictions by the engine's PredictionWriter (with its manifest)."""
    import torch

    from diffseg.engine.evaluators import PredictionWriter, SegmentedBatch

    meta = {
        "method": "diffseg",
        "setting": "",
        "backbone": "tiny",
        "random_weights": random_weights,
    }
    writer = PredictionWriter(run_dir, meta, original_size=False)
    preds = torch.stack([labels.load_label(i) + 1 for i in range(len(labels.ids))])
    writer.process(SegmentedBatch(list(labels.ids), preds, [{} for _ in labels.ids]))
    return writer.folder


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("eval.score: warning:")]


@pytest.mark.parametrize("random_weights", [True, False])
def test_manifest_travels_and_random_weights_warn(coco, tmp_path, capsys, random_weights):
    root, _ = coco
    labels = CocoStuff27(root, curated=False, label_size=RES)
    preds = _engine_predictions(tmp_path / "run", labels, random_weights)
    manifest = json.loads((preds / "manifest.json").read_text())
    assert manifest["random_weights"] is random_weights and manifest["backbone"] == "tiny"
    assert manifest["method"] == "diffseg" and manifest["output_dir"] == str(tmp_path / "run")
    out = tmp_path / "scored.json"
    assert main(_coco_args(root, preds, "--output", str(out))) == 0  # manifest is no extra file
    captured = capsys.readouterr()
    assert "ACC 100.00" in captured.out
    res = json.loads(out.read_text())
    assert res["random_weights"] is random_weights and res["acc"] == 100.0
    if random_weights:
        (line,) = _warnings(captured.err)
        assert "RANDOM weights" in line and "manifest.json" in line and "tiny" in line
        assert "RANDOM weights" in res["WARNING"]
    else:
        assert _warnings(captured.err) == [] and "WARNING" not in res


def test_random_weights_png_text_warns_without_manifest(coco, tmp_path, capsys):
    """Folders from before the manifest: the first PNG's diffseg:random_weights text."""
    from diffseg.overlay import save_segments_png

    root, _ = coco
    labels = CocoStuff27(root, curated=False, label_size=RES)
    preds = tmp_path / "preds"
    for i, image_id in enumerate(labels.ids):
        save_segments_png(preds / f"{image_id}.png", labels.load_label(i) + 1, random_weights=True)
    assert main(_coco_args(root, preds)) == 0
    (line,) = _warnings(capsys.readouterr().err)
    assert "RANDOM weights" in line and "PNG text" in line
