"""Makefile targets: the torch index variable, clean keeps results, clean-results asks first."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import diffseg

REPO = Path(diffseg.__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _make(*args: str, cwd: Path = REPO, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", *args], cwd=cwd, input=stdin, capture_output=True, text=True, timeout=60
    )


def _torch_line(out: str) -> str:
    return next(line for line in out.splitlines() if "pip install" in line and "torch==" in line)


def test_install_takes_an_index_for_torch_only():
    default = _make("-n", "-B", "install").stdout
    assert "--index-url" not in _torch_line(default)
    cpu = _make("-n", "-B", "install", "TORCH_INDEX=https://download.pytorch.org/whl/cpu").stdout
    assert '--index-url "https://download.pytorch.org/whl/cpu"' in _torch_line(cpu)
    assert all("--index-url" not in line for line in cpu.splitlines() if '-e ".[test,app]"' in line)


def test_clean_keeps_results():
    out = _make("-n", "clean").stdout
    assert ".venv" in out
    assert "outputs" not in out and "multirun" not in out


@pytest.fixture
def results_copy(tmp_path):
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    for d in ("outputs/run", "multirun", "experiments/tables"):
        (tmp_path / d).mkdir(parents=True)
    return tmp_path


def test_clean_results_asks_and_keeps_on_no(results_copy):
    for answer in ("", "n\n"):
        done = _make("clean-results", cwd=results_copy, stdin=answer)
        assert done.returncode != 0 and "nothing deleted" in done.stdout
        assert (results_copy / "outputs" / "run").is_dir()


def test_clean_results_deletes_on_yes_or_force(results_copy):
    assert _make("clean-results", cwd=results_copy, stdin="y\n").returncode == 0
    assert not (results_copy / "outputs").exists()
    assert not (results_copy / "experiments" / "tables").exists()
    (results_copy / "multirun").mkdir()
    assert _make("clean-results", "FORCE=1", cwd=results_copy).returncode == 0
    assert not (results_copy / "multirun").exists()


def test_gitignore_covers_generated_tables():
    lines = (REPO / ".gitignore").read_text().splitlines()
    assert "experiments/tables/" in lines
