"""One job per run dir: the OS lock, refusing a second start, taking over a dead holder's lock,
shard jobs side by side, duplicated records read once, and a re-run of a finished run that
changes none of its reported figures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from diffseg.engine.lock import LOCK_NAME, RunDirLocked, RunLock
from diffseg.engine.records import CSV_COLUMNS, read_per_image
from diffseg.tasks.evaluate import evaluate
from diffseg.testing import fakedata

REPO = Path(__file__).resolve().parents[2]
N_IMAGES = 2

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(coco_root: Path, *extra: str):
    overrides = [
        "backbone=tiny", "logger=none", "resolution=64", "num_workers=0", "num_overlays=0",
        f"dataset.root={coco_root}", "dataset.curated=false", *extra,
    ]  # fmt: skip
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    fakedata.write_cocostuff(root, n=N_IMAGES, size=(48, 64), seed=7)
    return root


@pytest.fixture(scope="module")
def backbone():
    from diffseg.backbones import build_backbone

    return build_backbone("tiny")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WORLD_SIZE", "RANK"))}
    env.pop("HYDRA_FULL_ERROR", None)
    return {**env, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}


HOLD = """
import sys, time
from pathlib import Path
from diffseg.engine.lock import RunLock
shard = None if sys.argv[2] == "-" else int(sys.argv[2])
RunLock(Path(sys.argv[1]), shard).acquire()
print("locked", flush=True)
time.sleep(float(sys.argv[3]))
"""


def _holder(run_dir: Path, shard: int | None = None, seconds: float = 120):
    """Another process that holds the run dir's lock until it is killed (or exits)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir), "-" if shard is None else str(shard),
         str(seconds)],
        stdout=subprocess.PIPE, text=True, env=_env(), cwd=REPO,
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _stop(proc) -> None:
    proc.send_signal(signal.SIGKILL)  # like kill -9: the OS lets the lock go
    proc.wait(timeout=30)


def test_second_run_stops_at_once_naming_the_holder(coco_root, tmp_path):
    """`python run.py` on a dir another process is running in: one `error:` line naming that
    process (pid, host, start time), exit 2, nothing segmented, the holder's files kept."""
    run_dir = tmp_path / "run"
    holder = _holder(run_dir)
    try:
        cmd = [sys.executable, str(REPO / "run.py"), "backbone=tiny", "logger=none",
               "resolution=64", "num_workers=0", f"dataset.root={coco_root}",
               "dataset.curated=false", f"hydra.run.dir={run_dir}"]  # fmt: skip
        proc = subprocess.run(
            cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300
        )
    finally:
        _stop(holder)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert f"pid {holder.pid} on host {os.uname().nodename}" in errors[0]
    assert "started 20" in errors[0] and str(run_dir) in errors[0]
    assert (run_dir / LOCK_NAME).exists()  # the holder's dir is not cleaned away
    assert not list(run_dir.glob("per_image*.csv")) and not (run_dir / "run.json").exists()


def test_two_runs_on_one_dir_never_write_a_row_twice(coco_root, backbone, tmp_path):
    """While a run segments (its first batch is done), a second run on the same dir is
    refused; the first finishes with one row per image."""
    cfg = _cfg(coco_root)
    refusals = []

    def second_run(done, ids):
        if done == 1:
            with pytest.raises(RunDirLocked) as err:
                evaluate(cfg, tmp_path, backbone=backbone)
            refusals.append(str(err.value))

    out = evaluate(cfg, tmp_path, backbone=backbone, on_batch=second_run)
    assert len(refusals) == 1 and f"pid {os.getpid()} " in refusals[0]
    ids = [r["id"] for r in read_per_image(tmp_path / "per_image.csv", CSV_COLUMNS)]
    assert len(ids) == len(set(ids)) == N_IMAGES
    assert out["results"][""]["num_images"] == N_IMAGES
    # the lock went with the session: the same command again is a (finished) resume
    again = evaluate(cfg, tmp_path, backbone=backbone)
    assert again["results"][""]["num_images"] == N_IMAGES


def test_a_dead_holders_lock_is_taken_over(tmp_path):
    """kill -9 leaves the lock file with the dead pid in it; the next start takes the lock and
    writes its own pid, host and start time there."""
    holder = _holder(tmp_path)
    _stop(holder)
    stale = json.loads((tmp_path / LOCK_NAME).read_text())
    assert stale["pid"] == holder.pid
    lock = RunLock(tmp_path).acquire()
    try:
        info = json.loads((tmp_path / LOCK_NAME).read_text())
        assert info["pid"] == os.getpid() and info["host"] == os.uname().nodename
        # while we hold it, another process is refused and told who we are
        proc = subprocess.run(
            [sys.executable, "-c", HOLD, str(tmp_path), "-", "0"],
            capture_output=True, text=True, env=_env(), cwd=REPO, timeout=120,
        )  # fmt: skip
        assert proc.returncode != 0 and f"pid {os.getpid()} " in proc.stderr
    finally:
        lock.release()


def test_shard_jobs_lock_their_own_shard(tmp_path):
    """Shard jobs run side by side; the same shard twice, or a whole run (or merge) beside a
    shard job, is refused and names the shard's holder."""
    shard0 = _holder(tmp_path, shard=0)
    try:
        one = RunLock(tmp_path, shard=1).acquire()  # another shard: fine
        with pytest.raises(RunDirLocked, match=rf"in use by pid {shard0.pid} .*\(shard0\)"):
            RunLock(tmp_path, shard=0).acquire()
        with pytest.raises(RunDirLocked) as err:
            RunLock(tmp_path).acquire()
        assert f"pid {shard0.pid} " in str(err.value) and f"pid {os.getpid()} " in str(err.value)
        one.release()
    finally:
        _stop(shard0)
    whole = RunLock(tmp_path).acquire()  # every shard job gone: a merge may start
    with pytest.raises(RunDirLocked, match=f"pid {os.getpid()} "):
        RunLock(tmp_path, shard=1).acquire()
    whole.release()


def test_rows_written_twice_by_an_old_version_count_once(coco_root, backbone, tmp_path):
    """A per_image.csv with every row twice (two unlocked runs of an older version): the
    records are read with each id once, and the results equal the clean run's."""
    cfg = _cfg(coco_root)
    clean = evaluate(cfg, tmp_path / "clean", backbone=backbone)["results"][""]
    run_dir = tmp_path / "doubled"
    evaluate(cfg, run_dir, backbone=backbone)
    csv = run_dir / "per_image.csv"
    lines = csv.read_text().splitlines(keepends=True)
    csv.write_text(lines[0] + "".join(line * 2 for line in lines[1:]))
    (run_dir / "results.json").unlink()
    rows = read_per_image(csv, CSV_COLUMNS)
    assert [r["id"] for r in rows] == [line.split(",")[0] for line in lines[1:]]
    res = evaluate(cfg, run_dir, backbone=backbone)["results"][""]
    for key in ("num_images", "acc", "miou", "tp", "fp", "fn"):
        assert res[key] == clean[key], key


def test_rerunning_a_finished_run_changes_no_figure(coco_root, backbone, tmp_path):
    """The same command on a finished run dir: results.json and summary.txt stay byte for
    byte (no new peak memory, finish time or summary)."""
    cfg = _cfg(coco_root)
    evaluate(cfg, tmp_path, backbone=backbone)
    files = ("results.json", "summary.txt", "per_image.csv")
    before = {name: (tmp_path / name).read_bytes() for name in files}
    sessions = json.loads((tmp_path / "run.json").read_text())["sessions"]
    time.sleep(1.1)  # a rewritten file would carry another finish time
    evaluate(cfg, tmp_path, backbone=backbone)
    assert {name: (tmp_path / name).read_bytes() for name in files} == before
    assert json.loads((tmp_path / "run.json").read_text())["sessions"] == sessions


def test_shard_jobs_started_together_keep_every_session(tmp_path):
    """Two shard jobs open a new run dir at once, then claim it and add their sessions in
    turn: run.json ends with both sessions (the later claim does not wipe the first's)."""
    from diffseg.engine.rundir import RunDir

    jobs = [RunDir(tmp_path, {"a": 1}).lock(shard=k).open() for k in range(2)]
    jobs[0].claim("a: 1\n")
    jobs[0].add_session({"images": 2})
    jobs[1].claim("a: 1\n")
    jobs[1].add_session({"images": 1})
    sessions = json.loads((tmp_path / "run.json").read_text())["sessions"]
    assert [s["images"] for s in sessions] == [2, 1]
    for job in jobs:
        job.unlock()


def test_a_start_refused_before_its_claim_leaves_no_folder(coco_root, backbone, tmp_path):
    """A run that locked a new dir and then stopped on a user's mistake (here: the backbone
    refuses the method's feature request) leaves neither the dir nor its lock file."""
    from diffseg.errors import ConfigError

    class Refusing:
        def __getattr__(self, name):
            return getattr(backbone, name)

        def check_request(self, request, image_size):
            raise ValueError("no such module")

    with pytest.raises(ConfigError, match="no such module"):
        evaluate(_cfg(coco_root), tmp_path / "run", backbone=Refusing())
    assert not (tmp_path / "run").exists()
