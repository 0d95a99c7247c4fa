"""SeeDiff generation end to end on a tiny random SD (``backbone=tiny``): VOC layout, index,
resume, random-weights flags, the refusal of other settings, the entry-point error policy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from diffseg.data.synthetic import SyntheticVOC
from diffseg.data.voc_writer import VOCWriter
from diffseg.errors import ConfigError, ResumeError
from diffseg.methods.seediff import SeeDiff
from diffseg.tasks.generate import generate, main, read_settings, shard

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["dog", "cab"]


def backbone_config(name: str = "tiny", **overrides):
    """The backbone group's config file, as ``backbone=<name>`` composes it."""
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "backbone" / f"{name}.yaml"))
    cfg.update(overrides)
    return cfg


def config(out, **overrides):
    cfg = {
        "classes": CLASSES,
        "images_per_class": 2,
        "seed_start": 200000,
        "backbone": backbone_config(),
        "dtype": "float32",
        "device": "cpu",
        "output_dir": str(out),
        "logger": {"name": "none"},
        # 256 px keeps the tiny run fast: the recorded grids are 8 (cross), 8/16/32 (self)
        "method": {
            "_target_": "diffseg.SeeDiff",
            "image_size": 256,
            "num_inference_steps": 2,
            "pamr_iterations": 10,
        },
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
        overlay = Image.open(out / "overlays" / f"{id_}.jpg")
        assert overlay.width == 512 and overlay.height > 256  # the random-weights caption strip
    assert "RANDOM WEIGHTS" in (out / "RANDOM_WEIGHTS").read_text()


def test_loader_reads_the_dataset_back(full_run):
    out, _ = full_run
    with pytest.warns(RuntimeWarning, match="RANDOM WEIGHTS"):
        data = SyntheticVOC(out, image_size=256, label_size=256)
    assert data.random_weights
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
    with pytest.raises(ResumeError, match="other settings") as err:
        method = {"_target_": "diffseg.SeeDiff", "image_size": 256, "num_inference_steps": 3}
        generate(config(out, method=method))
    assert "settings.num_inference_steps: 2 -> 3" in str(err.value)  # names the setting


def test_user_errors_exit_2(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exc:
        main(config(tmp_path / "a", classes=None, class_list="pascal"))
    assert exc.value.code == 2
    assert "error: unknown class-list preset 'pascal'" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = tmp_path / "no_such_weights"
    with pytest.raises(SystemExit) as exc:
        main(config(tmp_path / "b", backbone=backbone_config("sd14", path=str(missing))))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error:") and str(missing) in err
    assert not (tmp_path / "b").exists()  # nothing is written before the weights are loaded


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


def test_a_real_weights_folder_has_plain_overlays_and_reads_silently(tmp_path, recwarn):
    """Only random weights are flagged: a dataset written as from real weights has no caption
    and no warning when read back."""
    writer = VOCWriter(tmp_path, ["dog"])
    writer.prepare(random_weights=False)
    image = np.full((64, 64, 3), 90, dtype=np.uint8)
    mask = np.zeros((64, 64), dtype=bool)
    mask[16:48, 16:48] = True
    writer.write("dog_1", image, mask, "dog", {"random_weights": False})
    writer.finalize(["dog_1"])
    assert Image.open(writer.overlay_path("dog_1")).size == (128, 64)
    data = SyntheticVOC(tmp_path, image_size=64, label_size=64)
    assert not data.random_weights
    assert not [w for w in recwarn if "RANDOM" in str(w.message)]


def test_dtype_names_and_devices_are_parsed_as_run_py_parses_them(tmp_path):
    from diffseg.precision import resolve_dtype

    cpu = torch.device("cpu")
    for name in ("float16", "fp16", "half", "bf16", "float32"):
        settings = read_settings(config(tmp_path, dtype=name))
        assert settings.dtype == resolve_dtype(name, cpu) and settings.device == cpu
    with pytest.raises(ConfigError, match="dtype='fp8' is not supported"):
        read_settings(config(tmp_path, dtype="fp8"))
    with pytest.raises(ConfigError, match="device='tpu' is not"):
        read_settings(config(tmp_path, device="tpu"))
    with pytest.raises(ConfigError, match="precision.attention=float16"):
        read_settings(config(tmp_path, precision={"attention": "float16"}))


def test_the_method_comes_from_its_target(tmp_path):
    settings = read_settings(config(tmp_path))
    assert type(settings.method) is SeeDiff and settings.method.num_inference_steps == 2
    assert settings.identity["settings"] == settings.method.settings()  # no _target_ in it
    with pytest.raises(ConfigError, match=r"method\._target_ is missing"):
        read_settings(config(tmp_path, method={"image_size": 256}))
    with pytest.raises(ConfigError, match="diffseg.DiffCut is not a generation method"):
        read_settings(config(tmp_path, method={"_target_": "diffseg.DiffCut"}))
    with pytest.raises(ConfigError, match="cannot be imported"):
        read_settings(config(tmp_path, method={"_target_": "diffseg.NoSuchMethod"}))
    with pytest.raises(ConfigError, match=r"method: unknown keys \['stepz'\]; known: threshold"):
        read_settings(config(tmp_path, method={"_target_": "diffseg.SeeDiff", "stepz": 3}))
    bad = {"_target_": "diffseg.SeeDiff", "image_size": 100}
    with pytest.raises(ConfigError, match="image_size=100 is invalid: it must be a multiple of 64"):
        read_settings(config(tmp_path, method=bad))


def test_backbones_come_from_the_registry(tmp_path):
    settings = read_settings(config(tmp_path, backbone=backbone_config("sd14")))
    assert settings.model == "CompVis/stable-diffusion-v1-4" and not settings.random_weights
    local = read_settings(config(tmp_path, backbone=backbone_config("sd15", path="/m/sd")))
    assert local.model == "/m/sd"
    rnd = read_settings(config(tmp_path, backbone=backbone_config("sd14_random")))
    assert rnd.model == "sd14_random" and rnd.random_weights
    with pytest.raises(ConfigError, match="SeeDiff records the attention of an SD 1.x/2.x"):
        read_settings(config(tmp_path, backbone=backbone_config("tiny_sdxl")))
    with pytest.raises(ConfigError, match="model=tiny was replaced by backbone="):
        read_settings(config(tmp_path, model="tiny"))


def _generate_py(*args, cwd):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "generate.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_generate_py_failed_starts_leave_nothing_and_name_the_setting(full_run, tmp_path):
    """As users type it: a refused folder and a bad option each give one error line, exit 2,
    and no log folder; the refusal names the setting that differs."""
    out, _ = full_run
    common = ["backbone=tiny", "device=cpu", "classes=[dog,cab]", "images_per_class=2"]
    common += ["method.image_size=256", "method.pamr_iterations=10"]
    refused = _generate_py(
        *common, f"output_dir={out}", "method.num_inference_steps=3", cwd=tmp_path
    )
    lines = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr[-2000:]
    assert "settings.num_inference_steps: 2 -> 3" in lines[0]
    assert not (out / "logs").exists()
    fresh = tmp_path / "fresh"
    bad = _generate_py(*common, f"output_dir={fresh}", "class_list=pascal", cwd=tmp_path)
    assert bad.returncode == 2 and "error: give classes=[...] or class_list" in bad.stderr
    assert not fresh.exists()


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_a_half_precision_unet_runs_beside_the_float32_text_encoder(dtype, one_thread):
    """The backbones keep their text encoder in float32; diffusers would cast the prompt
    embeddings back to it and feed float32 to a half-precision UNet (dtype=fp16 failed)."""
    from diffseg.backbones import build_backbone

    backbone = build_backbone("tiny", dtype=dtype)
    assert backbone.text_encoder.dtype == torch.float32 and backbone.unet.dtype == dtype
    seediff = SeeDiff(image_size=128, num_inference_steps=1, refine=False)
    image, mask, info = seediff.generate(backbone, "dog", 200000)
    assert image.shape == (128, 128, 3) and mask.shape == (128, 128) and info["unet_calls"] >= 1
    assert seediff.pipeline(backbone).text_encoder is backbone.text_encoder  # put back


def test_a_local_model_folder_gives_the_images_of_its_weights(full_run, tmp_path, one_thread):
    """``backbone.path=<folder>``: the tiny weights saved in the diffusers layout (with SD's PNDM
    scheduler config) load as real weights and generate the same images and masks as
    ``backbone=tiny``, without the random-weights flags."""
    from diffseg.backbones import build_backbone
    from diffseg.methods.seediff import sd_scheduler

    out, _ = full_run
    folder = tmp_path / "model"
    tiny = build_backbone("tiny")
    for part in ("vae", "unet", "text_encoder", "tokenizer"):
        getattr(tiny, part).save_pretrained(folder / part)
    sd_scheduler().save_pretrained(folder / "scheduler")
    local = tmp_path / "local"
    summary = generate(config(local, backbone=backbone_config("sd14", path=str(folder))))
    assert summary["complete"] == 4 and not summary["random_weights"]
    assert not (local / "RANDOM_WEIGHTS").exists()
    for sub in ("JPEGImages", "SegmentationClass"):
        for path in sorted((out / sub).iterdir()):
            assert (local / sub / path.name).read_bytes() == path.read_bytes(), path.name
    record = json.loads((local / "records" / "dog_200000.json").read_text())
    assert record["model"] == str(folder) and record["random_weights"] is False
