"""SeeDiff generation end to end on a tiny random SD: VOC layout, index, resume, flags, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from diffseg.data.synthetic import SyntheticVOC
from diffseg.seediff import SeeDiff
from diffseg.seediff.task import generate, main, shard

CLASSES = ["dog", "cab"]


def config(out, **overrides):
    cfg = {
        "classes": CLASSES,
        "images_per_class": 2,
        "seed_start": 200000,
        "model": "tiny",
        "dtype": "float32",
        "device": "cpu",
        "output_dir": str(out),
        "logger": {"name": "none"},
        # 256 px keeps the tiny run fast: the recorded grids are 8 (cross), 8/16/32 (self)
        "method": {"image_size": 256, "num_inference_steps": 2, "pamr_iterations": 10},
    }
    cfg.update(overrides)
    return OmegaConf.create(cfg)


def dataset_files(root):
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "logs" not in p.parts
    }


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("seediff") / "full"
    summary = generate(config(out))
    return out, summary


def test_generation_writes_the_voc_layout(full_run):
    out, summary = full_run
    ids = ["dog_200000", "dog_200001", "cab_200000", "cab_200001"]
    assert summary["complete"] == summary["planned"] == 4 and summary["random_weights"]
    assert (out / "ImageSets/Segmentation/train.txt").read_text().split() == ids
    assert json.loads((out / "classes.json").read_text()) == ["background", *CLASSES]
    records = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ids
    for record in records:
        id_ = record["id"]
        image = Image.open(out / "JPEGImages" / f"{id_}.jpg")
        label = Image.open(out / "SegmentationClass" / f"{id_}.png")
        assert image.mode == "RGB" and image.size == (256, 256)
        assert label.mode == "P" and label.size == (256, 256)
        assert label.getpalette()[:6] == [0, 0, 0, 128, 0, 0]  # VOC colours
        values = np.asarray(label)
        expected = CLASSES.index(record["class"]) + 1
        assert set(np.unique(values)) <= {0, expected} and record["label"] == expected
        assert record["mask_area"] == pytest.approx(float((values == expected).mean()))
        assert record["prompt"] == f"A photo of a {record['class']}"
        assert record["seed"] == int(id_.rsplit("_", 1)[1])
        assert record["random_weights"] is True and record["unet_calls"] == 3  # PNDM: 2 steps
        assert record["settings"]["image_size"] == 256
        assert (out / "overlays" / f"{id_}.jpg").is_file()
    assert "RANDOM WEIGHTS" in (out / "RANDOM_WEIGHTS").read_text()


def test_loader_reads_the_dataset_back(full_run):
    out, _ = full_run
    data = SyntheticVOC(out, image_size=256, label_size=256)
    assert len(data) == 4 and data.class_names == ["background", *CLASSES]
    item = data[2]
    assert item["id"] == "cab_200000" and item["image"].shape == (3, 256, 256)
    assert set(item["label"].unique().tolist()) <= {0, 2}
    assert data.records["cab_200000"]["class"] == "cab"


def test_resume_after_an_interruption_gives_identical_files(full_run, tmp_path, monkeypatch):
    out, _ = full_run
    resumed = tmp_path / "resumed"
    real = SeeDiff.generate
    calls = []

    def dies_on_third(self, *args, **kwargs):
        calls.append(args[1:])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SeeDiff, "generate", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        generate(config(resumed))
    assert not (resumed / "index.jsonl").exists()
    monkeypatch.setattr(SeeDiff, "generate", real)
    generated = []
    monkeypatch.setattr(
        SeeDiff, "generate", lambda self, *a, **k: generated.append(a[1:]) or real(self, *a, **k)
    )
    summary = generate(config(resumed))
    assert summary["generated"] == 2 and generated == [("cab", 200000), ("cab", 200001)]
    assert dataset_files(resumed) == dataset_files(out)


def test_generation_refuses_another_configuration(full_run):
    out, _ = full_run
    with pytest.raises(ValueError, match="other settings"):
        generate(config(out, method={"image_size": 256, "num_inference_steps": 3}))


def test_user_errors_exit_2(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exc:
        main(config(tmp_path / "a", classes=None, class_list="pascal"))
    assert exc.value.code == 2
    assert "error: unknown class-list preset 'pascal'" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = tmp_path / "no_such_weights"
    with pytest.raises(SystemExit) as exc:
        main(config(tmp_path / "b", model=str(missing)))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error:") and str(missing) in err


def test_shards_are_contiguous_and_cover_the_plan():
    items = list(range(10))
    parts = [shard(items, i, 3) for i in range(3)]
    assert sum(parts, []) == items and [len(p) for p in parts] == [4, 3, 3]
    with pytest.raises(ValueError):
        shard(items, 3, 3)


def test_fp16_unet_records_float32(one_thread):
    """A float16 UNet gives float32 maps (checked on CPU when half matmul is available)."""
    from diffseg.attention import attention_probabilities

    q = torch.randn(1, 2, 16, 8).half()
    k = torch.randn(1, 2, 16, 8).half()
    (_, _, probs), *_ = attention_probabilities(q, k, 8**-0.5)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 2, 16))
