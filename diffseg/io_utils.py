"""Atomic file writes that respect the umask.

A result file is written to a temporary name in the same folder and renamed into place, so a
crash or Ctrl-C never leaves a truncated file under the final name. The temporary file is
created with ``os.open(..., 0o666)``, so the kernel applies the process umask exactly as for
``open(path, "w")``: with umask 022 results are 0644 and teammates on a shared server can read
them (``tempfile.mkstemp`` would make every result 0600).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_open", "atomic_write_bytes", "atomic_write_text", "atomic_write_with"]

# Mode before the umask: what open(path, "w") asks for.
_FILE_MODE = 0o666


def _create_temp(path: Path) -> tuple[int, Path]:
    """Create a new, empty temp file next to ``path``; returns its descriptor and name."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file next to {path}")


@contextmanager
def atomic_open(path: str | os.PathLike, fsync: bool = False) -> Iterator[BinaryIO]:
    """A binary file object whose content replaces ``path`` only when the block succeeds.

    The parent folder is created if needed. On an exception the temp file is removed and
    ``path`` is left as it was. ``fsync=True`` flushes the data to disk before the rename
    (survives a power cut, not only a crash of the process).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + rename), mode 0666 & ~umask."""
    with atomic_open(path, fsync=fsync) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(
    path: str | os.PathLike, text: str, encoding: str = "utf-8", fsync: bool = False
) -> Path:
    """Write ``text`` to ``path`` atomically (temp file + rename), mode 0666 & ~umask."""
    return atomic_write_bytes(path, text.encode(encoding), fsync=fsync)


def atomic_write_with(
    path: str | os.PathLike, write: Callable[[BinaryIO], object], fsync: bool = False
) -> Path:
    """Call ``write(file)`` on a temp file and rename it to ``path`` (e.g. ``img.save``)."""
    with atomic_open(path, fsync=fsync) as f:
        write(f)
    return Path(path)
