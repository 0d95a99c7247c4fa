"""docs/architecture.md's "How to add a dataset" works as written: its module, config and
fixture are written where the doc says (the module into ``diffseg.data``'s package path through a temporary folder, the
config into a copy of ``configs/``), its Python check runs, and its run.py command runs on a
tiny random backbone."""

from __future__ import annotations

import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import diffseg.data
import diffseg.testing
from diffseg.data import CATALOG

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "architecture.md"
SECTION = "## How to add a dataset\n"
BLOCK = re.compile(r"^```(\w+) ?([^\n]*)\n(.*?)^```\s*$", re.S | re.M)


def blocks() -> list[tuple[str, str, str]]:
    """(language, info after it, code) of every fenced block of the doc."""
    text = DOC.read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.find("\n## ", start + 1)
    return BLOCK.findall(text[start : end if end != -1 else None])


@pytest.fixture
def example(tmp_path, monkeypatch):
    """The doc's files written out: returns the copy of ``configs/`` holding its config."""
    files = {info.removeprefix("file="): code for _, info, code in blocks() if "file=" in info}
    assert set(files) == {
        "diffseg/data/shapes.py",
        "configs/dataset/shapes.yaml",
        "diffseg/testing/fake_shapes.py",
    }
    configs = tmp_path / "configs"
    shutil.copytree(REPO / "configs", configs)
    for rel, code in files.items():  # the config into the copy, the modules beside the packages
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(code)
    for package in (diffseg.data, diffseg.testing):
        extra = tmp_path.joinpath(*package.__name__.split("."))
        monkeypatch.setattr(package, "__path__", [*package.__path__, str(extra)])
    yield configs
    CATALOG.pop("shapes", None)
    from diffseg.data import catalog

    catalog._ALIASES.pop("toy_shapes", None)
    for module in ("diffseg.data.shapes", "diffseg.testing.fake_shapes"):
        sys.modules.pop(module, None)


def test_the_python_check_runs(example):
    (code,) = [code for lang, info, code in blocks() if lang == "python" and info == "run"]
    assert "shapes" not in CATALOG  # found by the catalog, not imported by hand
    exec(compile(code, str(DOC), "exec"), {"__name__": "doc_example"})
    assert CATALOG["shapes"].loader.__module__ == "diffseg.data.shapes"


def test_the_run_command_runs(example, tmp_path, one_thread):
    from diffseg.testing.fake_shapes import write_shapes

    from diffseg.backbones import build_backbone
    from diffseg.tasks.evaluate import evaluate

    (command,) = [code for lang, info, code in blocks() if lang == "bash" and info == "run"]
    argv = shlex.split(command.strip())
    assert argv[:2] == ["python", "run.py"]
    root = tmp_path / "data" / "shapes"
    write_shapes(root, n=3)
    overrides = [
        a if not a.startswith("dataset.root=") else f"dataset.root={root}" for a in argv[2:]
    ]
    overrides += ["backbone=tiny", "logger=none", "image_size=64", "resolution=32"]
    overrides += ["num_workers=0", "num_overlays=0"]
    with initialize_config_dir(config_dir=str(example), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    out = evaluate(cfg, tmp_path / "run", backbone=build_backbone("tiny", seed=0))
    (res,) = out["results"].values()
    assert res["num_images"] == 3 and res["complete"] is True
    ds = res["dataset"]
    assert ds["name"] == "shapes" and ds["full_benchmark"] is True
    assert (ds["images_found"], ds["images_expected"]) == (3, 3)
    assert list(res["iou_per_class"]) == ["circle", "square", "background"]
