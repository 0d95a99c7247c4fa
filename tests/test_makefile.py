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


FAKE_PIP = """#!/bin/sh
# A stand-in for the venv's pip: logs its arguments, fails for the package named nonexistent-*.
echo "$*" >> "$(dirname "$0")/calls.log"
echo "DEPRECATION: something is ignored"
case "$*" in
  *nonexistent-*) echo "ERROR: No matching distribution found for nonexistent-package==0"; exit 1;;
esac
echo "installed: $*"
"""


@pytest.fixture
def fake_venv(tmp_path):
    """A venv folder whose pip and python are scripts (offline, instant)."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "pip").write_text(FAKE_PIP)
    (bin_dir / "python").write_text("#!/bin/sh\nexit 0\n")
    for name in ("pip", "python"):
        (bin_dir / name).chmod(0o755)
    return tmp_path / "venv"


def test_install_fails_loudly_when_torch_cannot_be_installed(fake_venv):
    done = _make("install", f"VENV={fake_venv}", "TORCH=nonexistent-package==0")
    assert done.returncode != 0
    assert "No matching distribution found for nonexistent-package==0" in done.stdout
    assert "DEPRECATION" not in done.stdout  # pip's "... is ignored" noise is still filtered
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "'pip install nonexistent-package==0' failed" in errors[0]
    calls = (fake_venv / "bin" / "calls.log").read_text()
    assert "-e .[test,app]" not in calls  # the default index never got a chance to pull torch
    assert not (fake_venv / ".installed").exists()


def test_install_succeeds_and_filters_noise_when_pip_does(fake_venv):
    done = _make("install", f"VENV={fake_venv}", "TORCH=torch==2.13.0")
    assert done.returncode == 0, done.stderr
    assert "installed: install -q torch==2.13.0" in done.stdout
    assert "installed: install -q -e .[test,app]" in done.stdout
    assert "DEPRECATION" not in done.stdout and "error:" not in done.stderr
    assert (fake_venv / ".installed").exists()
