"""Hydra's own reports of a user's mistake as one ``error:`` line and exit status 2.

Hydra prints a mistyped key (``foo=1``), an unknown group option (``method=nope``), an override
it cannot parse, or an output folder it cannot create as several lines and exits 1, before the
task function (which has its own one-line errors) ever runs. :func:`install` puts a wrapper
around Hydra's reporter: those mistakes become one line naming the override and the fix; every
other exception (a bug) keeps Hydra's report and traceback as before.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = ["install", "user_error_line"]

#: Why a folder cannot be written: a user can fix these (another folder, its permissions).
_UNWRITABLE = {
    errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.ENOSPC,
    errno.EDQUOT,
}  # fmt: skip


def _flat(text: str) -> str:
    """Hydra's several lines as one: the lines joined, tabs and blank lines dropped."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _unwritable(ex: BaseException) -> OSError | None:
    """The OSError (itself or what caused it, e.g. a log file's handler) that says a folder
    cannot be written, if that is what ``ex`` is."""
    seen = 0
    while ex is not None and seen < 5:
        if isinstance(ex, OSError) and ex.errno in _UNWRITABLE:
            return ex
        ex, seen = ex.__cause__ or ex.__context__, seen + 1
    return None


def user_error_line(ex: BaseException) -> str | None:
    """``error: ...`` for a mistake Hydra reports before the run starts, None for the rest."""
    from hydra.errors import (
        ConfigCompositionException,
        MissingConfigException,
        OverrideParseException,
    )

    if isinstance(ex, MissingConfigException):
        options = getattr(ex, "options", None)
        first = _flat(str(ex).split("\n\n")[0])
        return f"error: {first}" + (f"; choose one of: {', '.join(options)}" if options else "")
    if isinstance(ex, ConfigCompositionException):
        cause = f" ({_flat(ex.__cause__).split(' full_key:')[0]})" if ex.__cause__ else ""
        return f"error: {_flat(ex)}{cause}"
    if isinstance(ex, OverrideParseException):
        return f"error: {_flat(ex)}"
    bad = _unwritable(ex)
    if bad is not None:
        return (
            f"error: cannot write the run's output folder: {os.path.abspath(bad.filename)}: "
            f"{bad.strerror}. "
            "Choose a writable folder with hydra.run.dir=DIR (hydra.sweep.dir=DIR with -m) "
            "or fix its permissions."
        )
    return None


def install() -> None:
    """Wrap Hydra's reporter (``hydra._internal.utils.run_and_report``) once per process."""
    import hydra._internal.utils as hydra_utils

    original = hydra_utils.run_and_report
    if getattr(original, "_diffseg_one_line", False):
        return

    def run_and_report(func: Callable[[], Any]) -> Any:
        line: list[str] = []

        def guarded() -> Any:
            try:
                return func()
            except Exception as ex:
                message = user_error_line(ex)
                if message is None:
                    raise  # a bug: Hydra's report, as before
                line.append(message)
                return None

        result = original(guarded)
        if line:
            if int(os.environ.get("RANK", "0")) == 0:  # torchrun: every process has it; once
                print(line[0], file=sys.stderr, flush=True)
            else:  # torchrun stops every process once one exits: the main one speaks first
                time.sleep(2)
            raise SystemExit(2)
        return result

    run_and_report._diffseg_one_line = True  # type: ignore[attr-defined]
    hydra_utils.run_and_report = run_and_report
