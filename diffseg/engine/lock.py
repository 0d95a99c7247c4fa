"""One job at a time on a run directory: an OS-level lock (``fcntl.flock``).

A whole run (one process, or torchrun's processes as one job through their main process) holds
``.lock`` exclusively. An independent shard job (``num_shards``/``shard_index``) holds ``.lock``
shared, so shard jobs run side by side but never beside a whole run or a merge, and its own
``.lock.shard<i>`` exclusively, so one shard is never run twice at once.

The OS releases a lock when its holder dies (kill -9, a crashed node's NFS lease), so a lock
left by a dead process is simply taken by the next start; the lock file then gets the new
holder's pid, host and start time, which a refused start names.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import RunError

__all__ = ["LOCK_NAME", "RunDirLocked", "RunLock", "holder_of", "while_writing"]

LOCK_NAME = ".lock"


class RunDirLocked(RunError):
    """Another process is running in this run dir (the message names it)."""

    #: The folder is the holder's: a refused start must not remove it.
    keeps_run_dir = True


def _shard_name(shard: int) -> str:
    return f"{LOCK_NAME}.shard{shard}"


def _describe(info: dict | None) -> str:
    if not info:
        return "another process (starting)"
    return f"pid {info.get('pid')} on host {info.get('host')}, started {info.get('started')}"


def _read_info(path: Path) -> dict | None:
    """The holder's pid, host and start time; None while a new holder has not written them
    yet (the file still names a process of this host that is gone)."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict):
        return None
    if info.get("host") == socket.gethostname() and not _alive(info.get("pid")):
        return None
    return info


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _try_flock(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def holder_of(path: Path) -> dict | None:
    """The holder's info of the lock file ``path`` if a live process holds it, else None."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        if _try_flock(fd, fcntl.LOCK_SH):  # nobody holds it exclusively
            return None
        return _read_info(path) or {}
    finally:
        os.close(fd)  # also drops the probe's own shared lock


class RunLock:
    """The lock of ``run_dir`` for a whole run (``shard=None``) or one shard job.

    Args:
        run_dir: the run directory (created if missing).
        shard: the shard job's index, None for a whole run.

    ``acquire()`` raises :class:`RunDirLocked` at once (it never waits) when another job holds
    what this one needs; ``release()`` (or the process's exit) lets go.
    """

    def __init__(self, run_dir: Path, shard: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.shard = shard
        self._fds: list[int] = []

    @property
    def held(self) -> bool:
        return bool(self._fds)

    def acquire(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        main = self.run_dir / LOCK_NAME
        try:
            if self.shard is None:
                self._take(main, fcntl.LOCK_EX, write_info=True)
            else:
                self._take(main, fcntl.LOCK_SH, write_info=False)
                self._take(self.run_dir / _shard_name(self.shard), fcntl.LOCK_EX, write_info=True)
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        for fd in reversed(self._fds):
            os.close(fd)  # closing the descriptor drops its flock
        self._fds = []

    def _take(self, path: Path, mode: int, write_info: bool) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        if not _try_flock(fd, mode):
            os.close(fd)
            raise RunDirLocked(self._refusal(path))
        self._fds.append(fd)
        if write_info:  # a lock left by a dead process is ours now: its file names us
            data = json.dumps(_my_info()).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data + b"\n", 0)
            os.fsync(fd)

    def _refusal(self, path: Path) -> str:
        """The line naming who holds ``path`` and what to do."""
        holders = []
        if path.name == LOCK_NAME and self.shard is None:  # shard jobs hold it shared
            for shard_file in sorted(self.run_dir.glob(f"{LOCK_NAME}.shard*")):
                info = holder_of(shard_file)
                if info is not None:
                    holders.append(f"{_describe(info)} ({shard_file.name[len(LOCK_NAME) + 1 :]})")
        if not holders:
            shard = f" (shard{self.shard})" if path.name != LOCK_NAME else ""
            holders.append(_describe(_read_info(path)) + shard)
        return (
            f"{self.run_dir} is in use by {'; '.join(holders)}. Wait for it to finish (or stop "
            "it), or choose another dir (hydra.run.dir=...)."
        )


@contextmanager
def while_writing(path: Path) -> Iterator[None]:
    """A short exclusive lock on ``path`` (waits for it): one read-modify-write at a time of a
    file that several shard jobs update (``run.json``)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _my_info() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
