"""The worked examples of docs/architecture.md run as written: a method, a backbone and an
evaluator, end to end on the tiny random backbone where they need a model."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from diffseg.tasks.evaluate import evaluate
from diffseg.testing import fakedata

REPO = Path(__file__).resolve().parents[1]
DOC = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    start = DOC.index(f"## {title}\n")
    end = DOC.find("\n## ", start + 1)
    return DOC[start : end if end != -1 else None]


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


@pytest.fixture()
def examples(tmp_path, monkeypatch):
    """The method and evaluator modules written where Python imports them, and a copy of the
    configs with the method's config added."""
    method_code, snippet = blocks(section("How to add a method"), "python")
    (tmp_path / "nearest_anchor.py").write_text(method_code)
    (evaluator_code,) = blocks(section("How to add an evaluator"), "python")
    (tmp_path / "segment_sizes.py").write_text(evaluator_code)
    configs = tmp_path / "configs"
    shutil.copytree(REPO / "configs", configs)
    (method_yaml,) = blocks(section("How to add a method"), "yaml")
    (configs / "method" / "nearest_anchor.yaml").write_text(method_yaml)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield configs, snippet
    for name in ("nearest_anchor", "segment_sizes"):
        sys.modules.pop(name, None)


def test_method_example_runs_on_synthetic_attention(examples):
    _, snippet = examples
    from nearest_anchor import NearestAnchor

    exec(snippet, {"NearestAnchor": NearestAnchor, "torch": torch})
    with pytest.raises(ValueError, match="num_points=0 is invalid"):
        NearestAnchor(num_points=0)


def test_method_and_evaluator_examples_run_end_to_end(examples, tmp_path):
    configs, _ = examples
    photos = tmp_path / "photos"
    fakedata.write_image_folder(photos)
    (evaluators_yaml,) = blocks(section("How to add an evaluator"), "yaml")
    targets = re.findall(r"_target_: (\S+)", evaluators_yaml)
    listed = ",".join(f"{{_target_:{t}}}" for t in targets)
    overrides = [
        "method=nearest_anchor", "backbone=tiny", "logger=none", "dataset=folder",
        f"dataset.path={photos}", "limit=2", "num_workers=0", "resolution=64",
        f"evaluators=[{listed}]",
    ]  # fmt: skip
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    out = evaluate(cfg, tmp_path / "run")
    (result,) = out["results"].values()
    assert result["method"] == {"name": "nearest_anchor", "num_points": 8, "timestep": None}
    assert result["num_images"] == 2 and result["mean_segments"] >= 1
    written = json.loads((tmp_path / "run" / "segment_sizes.json").read_text())
    assert written == {"mean_segments": result["mean_segments"]}
    assert len(list((tmp_path / "run" / "predictions").rglob("*.png"))) == 2


def test_backbone_example_registers_a_buildable_backbone():
    from diffseg.backbones import BACKBONES, build_backbone

    (code,) = [b for b in blocks(section("How to add a backbone"), "python") if "BACKBONES[" in b]
    try:
        exec(code, {})
        assert BACKBONES["my_sd"].model_id == "my-org/my-sd-model"
        backbone = build_backbone("my_tiny", seed=0)
        assert backbone.is_random and backbone.image_size == 512
    finally:
        BACKBONES.pop("my_sd", None)
        BACKBONES.pop("my_tiny", None)
