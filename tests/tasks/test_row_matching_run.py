"""eval.matching=row through run.py's task: the records are the release's per-row matching of
the saved predictions, the results and the summary say so, and a run dir keeps its matching."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from diffseg.data import CocoStuff27
from diffseg.errors import ConfigError, ResumeError
from diffseg.testing import fakedata
from eval.metrics import match_image

REPO = Path(__file__).resolve().parents[2]


def _cfg(root, *extra):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="config", overrides=[
            "method=diffseg", "backbone=tiny", "dataset=coco_stuff27", f"dataset.root={root}",
            "dataset.curated=false", "logger=none", "num_workers=0", "resolution=32",
            "save_predictions=true", *extra])  # fmt: skip


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    return root, fakedata.write_cocostuff(root, n=2, size=(40, 48), seed=5)


def test_row_matching_records_are_the_per_row_matching(coco, tmp_path, capsys):
    from diffseg.tasks.evaluate import evaluate

    root, ids = coco
    evaluate(_cfg(root, "eval.matching=row"), tmp_path / "run")
    run = tmp_path / "run"
    res = json.loads((run / "results.json").read_text())
    assert res["matching"] == "row"
    assert "matching  ROW" in (run / "summary.txt").read_text()
    rows = {r["id"]: r for r in csv.DictReader((run / "per_image.csv").open())}
    ds = CocoStuff27(root, curated=False, label_size=32)
    for k, image_id in enumerate(ids):
        pred = np.asarray(Image.open(run / "predictions" / f"{image_id}.png")).astype(np.int64)
        label = ds.load_label(k).numpy()
        want = match_image(pred, label, num_classes=27, matching="row")
        assert json.loads(rows[image_id]["tp"]) == want.tp.tolist()
        assert json.loads(rows[image_id]["fp"]) == want.fp.tolist()
        assert int(rows[image_id]["pixels"]) == int((label >= 0).sum())

    with pytest.raises(ResumeError):  # the same run dir with the other matching is refused
        evaluate(_cfg(root), run)


def test_image_matching_is_the_default_and_recorded(coco, tmp_path):
    from diffseg.tasks.evaluate import evaluate

    root, _ = coco
    evaluate(_cfg(root, "limit=1"), tmp_path / "run")
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["matching"] == "image"
    assert "ROW" not in (tmp_path / "run" / "summary.txt").read_text()


def test_an_unknown_matching_is_a_config_error(coco, tmp_path):
    from diffseg.tasks.evaluate import evaluate

    root, _ = coco
    with pytest.raises(ConfigError, match="eval.matching='rows' is invalid"):
        evaluate(_cfg(root, "eval.matching=rows"), tmp_path / "run")
