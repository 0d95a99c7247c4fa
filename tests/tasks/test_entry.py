"""The entry-point policy shared by run.py and generate.py (diffseg.tasks.entry)."""

from __future__ import annotations

import logging

import pytest

from diffseg.errors import ConfigError
from diffseg.tasks.entry import random_weights_banner, run_task


@pytest.fixture
def run_log(tmp_path):
    """A Hydra-like start: ``<out>/logs/<stamp>/task.log`` attached to the root logger."""
    run_dir = tmp_path / "out" / "logs" / "stamp"
    run_dir.mkdir(parents=True)
    handler = logging.FileHandler(run_dir / "task.log")
    logging.getLogger().addHandler(handler)
    yield run_dir
    logging.getLogger().removeHandler(handler)
    handler.close()


def fails():
    raise ConfigError("dtype='fp8' is not supported")


def test_a_user_error_is_one_line_exit_2_and_in_the_log(run_log, capsys):
    with pytest.raises(SystemExit) as exc:
        run_task(fails, run_log, claimed=lambda: True, interrupted=lambda: "")
    assert exc.value.code == 2
    assert capsys.readouterr().err == "error: dtype='fp8' is not supported\n"
    assert "error: dtype='fp8' is not supported" in (run_log / "task.log").read_text()


def test_a_start_that_failed_before_its_claim_leaves_no_folder(run_log, tmp_path):
    keep = tmp_path / "out" / "dataset.txt"
    with pytest.raises(SystemExit):
        run_task(fails, run_log, lambda: False, lambda: "", clean_up_to=tmp_path / "out")
    assert not run_log.exists() and not run_log.parent.exists()  # logs/ was left empty
    assert (tmp_path / "out").exists() is False
    (tmp_path / "out").mkdir()
    keep.write_text("x")
    run_dir = tmp_path / "out" / "logs" / "again"
    run_dir.mkdir(parents=True)
    with pytest.raises(SystemExit):
        run_task(fails, run_dir, lambda: False, lambda: "", clean_up_to=tmp_path / "out")
    assert keep.is_file() and not (tmp_path / "out" / "logs").exists()  # never a user's file


def test_bugs_keep_their_traceback_and_ctrl_c_says_how_to_continue(run_log, capsys):
    def bug():
        raise KeyError("x")

    with pytest.raises(KeyError):
        run_task(bug, run_log, lambda: False, lambda: "")
    assert run_log.exists()

    def interrupt():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exc:
        run_task(interrupt, run_log, lambda: False, lambda: "run it again")
    assert exc.value.code == 130 and "run it again" in capsys.readouterr().err


def test_random_weights_banner_frames_the_message(caplog):
    with caplog.at_level(logging.WARNING):
        random_weights_banner("RANDOM WEIGHTS: noise")
    assert [r.getMessage() for r in caplog.records] == [
        "!" * 78,
        "!!! RANDOM WEIGHTS: noise",
        "!" * 78,
    ]
