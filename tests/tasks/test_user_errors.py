"""Every mistake a user makes on `python run.py` is one `error:` line and exit status 2, and a
failed start leaves no folder behind: mistyped keys and groups (Hydra's own checks), output
folders that cannot be written, config errors with the default run dir, and torchrun (the main
process says it once)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from diffseg.testing import fakedata

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WORLD_SIZE", "RANK"))}
    env.pop("HYDRA_FULL_ERROR", None)
    return {**env, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def run_cli(*args: str, cwd: Path, torchrun: bool = False) -> subprocess.CompletedProcess:
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return subprocess.run(
        [*launcher, str(REPO / "run.py"), "backbone=tiny", "logger=none", *args],
        capture_output=True, text=True, cwd=cwd, env=_env(), timeout=300,
    )  # fmt: skip


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    fakedata.write_cocostuff(root, n=1, size=(48, 64), seed=2)
    return root


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("resolutoin=64", "Could not override 'resolutoin'"),  # a mistyped key
        ("method.kl_treshold=1.1", "Could not override 'method.kl_treshold'"),
        ("method=difseg", "Could not find 'method/difseg'; choose one of: diffcut,"),
        ("dataset=[coco", "no viable alternative"),  # an override Hydra cannot parse
    ],
)
def test_hydra_mistakes_are_one_line(tmp_path, override, says):
    proc = run_cli(override, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert says in lines[0]
    assert list(tmp_path.iterdir()) == []  # no run dir, no outputs/ tree


def test_unwritable_output_folder_is_one_line(tmp_path):
    """A file where the run dir should go (and, as a normal user, a read-only folder)."""
    (tmp_path / "afile").write_text("")
    cases = [(tmp_path / "afile" / "run", "Not a directory")]
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        cases.append((ro / "run", "Permission denied"))
    for run_dir, reason in cases:
        proc = run_cli(f"hydra.run.dir={run_dir}", cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, proc.stderr
        assert lines[0].startswith(f"error: cannot write the run's output folder: {run_dir}")
        assert reason in lines[0] and "hydra.run.dir=" in lines[0]


@pytest.mark.parametrize("override", ["resolution=abc", "dataset.root={missing}"])
def test_failed_start_leaves_no_default_output_tree(tmp_path, override):
    """With the default run dir (outputs/<dataset>/<method>_<res>/<time>), a start that fails
    on its options or data leaves no folder; folders holding other runs stay."""
    proc = run_cli(override.format(missing=tmp_path / "nowhere"), cwd=tmp_path)
    assert proc.returncode == 2 and len(error_lines(proc)) == 1, proc.stderr
    assert list(tmp_path.iterdir()) == [], sorted(tmp_path.rglob("*"))
    other = tmp_path / "outputs" / "coco_stuff27" / "diffseg_abc" / "earlier_run"
    other.mkdir(parents=True)
    proc = run_cli("resolution=abc", cwd=tmp_path)
    assert proc.returncode == 2
    assert sorted(p.name for p in other.parent.iterdir()) == ["earlier_run"]


def test_torchrun_says_a_mistake_once_from_the_main_process(coco_root, tmp_path):
    """Two processes on a run dir another job holds: the main process prints the one line
    naming the holder; the other says nothing; nothing is segmented."""
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from diffseg.engine.lock import RunLock; RunLock(Path(sys.argv[1])).acquire(); "
         "print('locked', flush=True); time.sleep(300)", str(run_dir)],
        stdout=subprocess.PIPE, text=True, cwd=REPO, env={**_env(), "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = run_cli(
            "resolution=64", "num_workers=0", f"dataset.root={coco_root}",
            "dataset.curated=false", f"hydra.run.dir={run_dir}", cwd=REPO, torchrun=True,
        )  # fmt: skip
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert proc.returncode != 0
    errors = error_lines(proc)
    assert len(errors) == 1, proc.stderr[-3000:]
    assert f"pid {holder.pid} " in errors[0] and "is in use" in errors[0]
    assert not list(run_dir.glob("per_image*.csv"))
