"""What every task entry point (``run.py``, ``generate.py``) does around its task.

One error policy: a user's mistake (:class:`~diffseg.errors.RunError`: a bad option, missing or
damaged data or weights, a folder holding another configuration's run) becomes ONE ``error:``
line on stderr, the same line in the task's log file, and exit status 2. A start that failed
before the task claimed its output leaves nothing behind (Hydra makes the log folder and an empty
log before the config is checked). Ctrl-C prints how to continue and exits with 130.

And one random-weights banner, so that no run on random weights goes unnoticed in the log.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ..errors import RunError

__all__ = ["hydra_run_dir", "log_error_to_files", "random_weights_banner", "run_task"]

log = logging.getLogger(__name__)

T = TypeVar("T")


def random_weights_banner(message: str, logger: logging.Logger | None = None) -> None:
    """Log ``message`` as a warning between two bars of ``!`` (a run on random weights)."""
    logger = logger or log
    bar = "!" * 78
    for line in (bar, "!!! " + message, bar):
        logger.warning(line)


def hydra_run_dir() -> Path | None:
    """Hydra's output dir of this job; None when the task was called without Hydra (tests)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return Path(HydraConfig.get().runtime.output_dir)


def log_error_to_files(message: str) -> None:
    """Put ``message`` into the task's log file(s) only (the console line is printed apart)."""
    record = logging.LogRecord(__name__, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _close_file_handlers(folder: Path) -> None:
    """Detach and close the log handlers writing into ``folder`` (before it is removed)."""
    root = logging.getLogger()
    folder = folder.absolute()
    for handler in list(root.handlers):
        if (
            isinstance(handler, logging.FileHandler)
            and folder in Path(handler.baseFilename).parents
        ):
            root.removeHandler(handler)
            handler.close()


def _remove_unstarted(folder: Path, up_to: Path | None) -> None:
    """Remove ``folder`` (made by Hydra for this start), then its parents while they are empty,
    stopping after ``up_to``."""
    if not folder.is_dir():
        return
    _close_file_handlers(folder)
    shutil.rmtree(folder, ignore_errors=True)
    if up_to is None:
        return
    up_to = up_to.absolute()
    parent = folder.absolute().parent
    cwd = Path.cwd().absolute()
    while (parent == up_to or up_to in parent.parents) and parent != cwd:  # never the cwd
        try:
            parent.rmdir()  # only when empty
        except OSError:
            return
        if parent == up_to:
            return
        parent = parent.parent


def _prints(err: BaseException) -> bool:
    """Under torchrun a mistake that every process meets (options, data, weights, run dir) is
    printed once, by the main process; an error in one process's own images by that one."""
    return int(os.environ.get("RANK", "0")) == 0 or getattr(err, "own_images", False)


def run_task(
    task: Callable[[], T],
    run_dir: Path | None,
    claimed: Callable[[], bool],
    interrupted: Callable[[], str],
    clean_up_to: Path | None = None,
) -> T:
    """Run ``task()`` under the entry-point policy.

    Args:
        task: the task itself.
        run_dir: the folder Hydra made for this start (its log is there); None without Hydra.
        claimed: whether the task has claimed its output by now: a failure before the claim
            removes ``run_dir`` (and its parents up to ``clean_up_to`` that are left empty, never
            the working directory),
            unless the error says ``keeps_run_dir`` (the folder is another job's).
        interrupted: the message printed on Ctrl-C (how to continue).
    """
    try:
        return task()
    except RunError as err:
        message = f"error: {err}"
        log_error_to_files(message)
        if _prints(err):
            print(message, file=sys.stderr, flush=True)
        else:  # torchrun stops every process once one exits: the main one speaks first
            time.sleep(2)
        keep = getattr(err, "keeps_run_dir", False)  # e.g. the dir is another job's (locked)
        if run_dir is not None and not keep and not claimed():
            _remove_unstarted(run_dir, clean_up_to)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(interrupted(), file=sys.stderr, flush=True)
        raise SystemExit(130) from None
