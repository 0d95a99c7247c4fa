"""preprocessing=seg4diff end to end: items at each image's own size, ragged batches, per-image
evaluation sizes through the loop, the evaluators and the writers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from diffseg.data import CocoStuff27
from diffseg.data.collate import collate_items
from diffseg.data.io import read_label
from diffseg.data.transforms import seg4diff_image, seg4diff_label, seg4diff_size, to_original_size
from diffseg.testing import fakedata

REPO = Path(__file__).resolve().parents[2]
SIZES = [(40, 52), (52, 40), (36, 36)]


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    ids = fakedata.write_cocostuff(root, n=3, sizes=SIZES, seed=3)
    return root, ids


def test_items_keep_each_images_aspect(coco):
    root, ids = coco
    ds = CocoStuff27(root, curated=False, image_size=128, label_size=64, preprocessing="seg4diff")
    for k, (h, w) in enumerate(SIZES):
        item = ds[k]
        want = seg4diff_size(h, w, 64)
        assert item["image"].shape == (3, 128, 128)
        assert tuple(item["eval_size"].tolist()) == want == tuple(item["label"].shape)
        rgb = np.asarray(Image.open(ds.image_paths[k]).convert("RGB"))
        assert torch.equal(item["image"], seg4diff_image(rgb, 64, 128)[0])
        raw = read_label(ds.label_paths[k])
        expected = seg4diff_label(ds.map_label(raw).astype(np.int64), 64)
        assert np.array_equal(item["label"].numpy(), expected)
    assert ds.describe()["preprocessing"] == "seg4diff"


def test_collate_keeps_ragged_fields_as_lists(coco):
    root, _ = coco
    ds = CocoStuff27(root, curated=False, image_size=64, label_size=32, preprocessing="seg4diff")
    batch = collate_items([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 64, 64)
    assert isinstance(batch["label"], list) and [tuple(t.shape) for t in batch["label"]] == [
        seg4diff_size(*SIZES[0], 32),
        seg4diff_size(*SIZES[1], 32),
    ]
    assert batch["eval_size"].shape == (2, 2) and batch["id"] == [ds.ids[0], ds.ids[1]]
    square = CocoStuff27(root, curated=False, image_size=64, label_size=32)
    plain = collate_items([square[0], square[1]])
    assert plain["label"].shape == (2, 32, 32)  # equal shapes: the default collate


def test_to_original_size_takes_non_square_resize_predictions():
    pred = torch.arange(6).reshape(2, 3)
    out = to_original_size(pred, (4, 6), "resize")
    assert out.shape == (4, 6) and torch.equal(out[::2, ::2], pred)
    with pytest.raises(ValueError, match="crop='resize'"):
        to_original_size(pred, (4, 6), "center")


def _cfg(overrides):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_seg4diff_run_scores_each_image_at_its_own_size(coco, tmp_path):
    from diffseg.tasks.evaluate import evaluate

    root, ids = coco
    cfg = _cfg(["method=seg4diff", "backbone=tiny_sd3", "dataset=coco_stuff27",
                f"dataset.root={root}", "dataset.curated=false", "logger=none",
                "num_workers=0", "resolution=48", "batch_size=3", "save_predictions=true",
                "num_overlays=3"])  # fmt: skip
    out = evaluate(cfg, tmp_path / "run")
    run = tmp_path / "run"
    res = json.loads((run / "results.json").read_text())
    assert res["dataset"]["preprocessing"] == "seg4diff" and res["num_images"] == 3
    rows = {r["id"]: r for r in csv.DictReader((run / "per_image.csv").open())}
    ds = CocoStuff27(root, curated=False, label_size=48, preprocessing="seg4diff")
    for k, image_id in enumerate(ids):
        h, w = seg4diff_size(*SIZES[k], 48)
        label = ds.load_label(k)
        assert label.shape == (h, w)
        assert int(rows[image_id]["pixels"]) == int((label >= 0).sum())
        pred = np.asarray(Image.open(run / "predictions" / f"{image_id}.png"))
        assert pred.shape == (h, w)
        assert Image.open(run / "overlays" / f"{image_id}.png").size[0] > w
    assert out["results"]

    # the offline scorer reads the same per-image sizes and gives the run's numbers
    from eval.score import main

    args = ["--dataset", "coco_stuff27", "--root", str(root), "--no-curated", "--resolution",
            "48", "--preprocessing", "seg4diff", "--predictions", str(run / "predictions"),
            "--output", str(tmp_path / "scored.json")]  # fmt: skip
    assert main(args) == 0
    scored = json.loads((tmp_path / "scored.json").read_text())
    assert scored["miou"] == pytest.approx(res["miou"]) and scored["pixels"] == res["pixels"]


def test_a_square_only_method_is_refused_before_the_run(coco, tmp_path):
    from diffseg.errors import ConfigError
    from diffseg.tasks.evaluate import evaluate

    root, _ = coco
    cfg = _cfg(["method=diffcut", "backbone=tiny", "dataset=coco_stuff27",
                f"dataset.root={root}", "dataset.curated=false", "logger=none",
                "preprocessing=seg4diff", "resolution=32"])  # fmt: skip
    with pytest.raises(ConfigError, match="predicts square label maps only"):
        evaluate(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "results.json").exists()


def test_diffseg_runs_under_the_seg4diff_preprocessing(coco, tmp_path):
    """DiffSeg (no PAMR) upsamples its proposals to any (h, w): a DiffSeg row under Seg4Diff's
    protocol is comparable with Seg4Diff's."""
    from diffseg.tasks.evaluate import evaluate

    root, ids = coco
    cfg = _cfg(["method=diffseg", "backbone=tiny", "dataset=coco_stuff27",
                f"dataset.root={root}", "dataset.curated=false", "logger=none",
                "num_workers=0", "preprocessing=seg4diff", "resolution=40", "batch_size=2",
                "save_predictions=true"])  # fmt: skip
    evaluate(cfg, tmp_path / "run")
    for k, image_id in enumerate(ids):
        pred = np.asarray(Image.open(tmp_path / "run" / "predictions" / f"{image_id}.png"))
        assert pred.shape == seg4diff_size(*SIZES[k], 40)


def test_folder_predictions_go_back_to_the_photo_size(tmp_path):
    from diffseg.tasks.evaluate import evaluate

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, hw in (("wide", (30, 50)), ("tall", (44, 26))):
        Image.fromarray(rng.integers(0, 255, (*hw, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    cfg = _cfg(["method=seg4diff", "backbone=tiny_sd3", "dataset=folder",
                f"dataset.path={folder}", "logger=none", "num_workers=0", "batch_size=2",
                "resolution=32"])  # fmt: skip
    evaluate(cfg, tmp_path / "run")
    for name, hw in (("wide", (30, 50)), ("tall", (44, 26))):
        pred = np.asarray(Image.open(tmp_path / "run" / "predictions" / f"{name}.png"))
        assert pred.shape == hw
        assert (pred >= 0).all()  # the whole photo was segmented: nothing cropped away


def test_seg4diff_protocol_matches_the_background_one_to_one(tmp_path):
    """Seg4Diff's release scores VOC's background as an ordinary class (no many-to-one merge):
    its protocol turns the merge off, and the saved predictions score the same offline without
    a merge."""
    from diffseg.tasks.evaluate import evaluate
    from diffseg.testing.fakedata_diffcut import write_voc
    from eval.score import main

    ids = write_voc(tmp_path / "VOCdevkit", seed=4)
    cfg = _cfg(["method=seg4diff", "backbone=tiny_sd3", "dataset=voc",
                f"dataset.root={tmp_path / 'VOCdevkit'}", "logger=none", "num_workers=0",
                "resolution=32", "save_predictions=true"])  # fmt: skip
    assert cfg.eval.background_merge is False
    evaluate(cfg, tmp_path / "run")
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["background_merge"] is False and res["num_images"] == len(ids)
    args = ["--dataset", "voc", "--root", str(tmp_path / "VOCdevkit"), "--resolution", "32",
            "--preprocessing", "seg4diff", "--no-background-merge", "--predictions",
            str(tmp_path / "run" / "predictions"), "--output", str(tmp_path / "s.json")]  # fmt: skip
    assert main(args) == 0
    assert json.loads((tmp_path / "s.json").read_text())["tp"] == res["tp"]
    assert _cfg(["method=diffcut", "dataset=voc"]).eval.background_merge is True
