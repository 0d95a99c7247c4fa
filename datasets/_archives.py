"""Download, verify and read the official archives: helpers of the prepare_*.py scripts.

Standard library plus tqdm only. Every script stages what it writes in a hidden folder under
its root and moves the files into place once all are complete, so an interrupted or failed run
leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePosixPath

HERE = Path(__file__).resolve().parent


class PrepareError(Exception):
    """A problem the user can fix; printed as one ``error:`` line, no traceback."""


def default_data_root() -> Path:
    """``$DIFFSEG_DATA`` when set, else this ``datasets/`` folder."""
    env = os.environ.get("DIFFSEG_DATA", "").strip()
    return Path(env).expanduser() if env else HERE


def offline_message(url: str, reason: object, urls: Sequence[str], command: str) -> str:
    """What to do when ``url`` cannot be fetched: the archives to get elsewhere, the command."""
    listed = "".join(f"  {u}\n" for u in urls)
    return (
        f"could not download {url} ({reason}).\n"
        "This machine looks offline, or the server is unreachable. Download the archives on a "
        f"machine with internet access:\n{listed}"
        "put them in one folder, then run:\n"
        f"  {command} --from-archives <that folder>"
    )


def download(url: str, dest: Path, offline_hint: Callable[[object], str], md5: str | None) -> str:
    """Fetch ``url`` to ``dest`` through ``dest.part`` with a progress bar, checking the byte
    count against Content-Length and the md5 when given; renamed into place only when whole.
    Returns the file's md5 hex digest."""
    from tqdm import tqdm

    part = dest.with_name(dest.name + ".part")
    try:
        response = urllib.request.urlopen(url, timeout=60.0)
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise PrepareError(offline_hint(getattr(err, "reason", err))) from err
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest, written = hashlib.md5(), 0
    try:
        with response, open(part, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
        if total is not None and written != total:
            raise PrepareError(
                f"download of {url} stopped after {written} of {total} bytes; run again"
            )
        if md5 and digest.hexdigest() != md5:
            raise PrepareError(
                f"{url}: md5 {digest.hexdigest()} differs from the published {md5}; the download "
                "is damaged: run again"
            )
        os.replace(part, dest)
    except (OSError, urllib.error.URLError, http.client.HTTPException) as err:
        raise PrepareError(
            f"download of {url} failed ({err}); nothing was kept, run again"
        ) from err
    finally:
        part.unlink(missing_ok=True)
    return digest.hexdigest()


def file_md5(path: Path) -> str:
    """md5 hex digest of a file, with a progress bar (the archives are gigabytes)."""
    from tqdm import tqdm

    digest = hashlib.md5()
    size = path.stat().st_size
    with (
        open(path, "rb") as f,
        tqdm(total=size, unit="B", unit_scale=True, desc=f"md5 {path.name}", leave=False) as bar,
    ):
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def get_archive(
    name: str,
    url: str,
    md5: str | None,
    from_archives: Path | None,
    download_dir: Path,
    verify: bool,
    offline_hint: Callable[[str, object], str],
) -> tuple[Path, bool]:
    """An official archive: from ``from_archives``, from an earlier download, or downloaded.

    Checks the published md5 (when ``md5`` and ``verify``). Returns (path, downloaded now or
    earlier into ``download_dir``: the script's to delete on request).
    """
    if from_archives is not None:
        path = from_archives / name
        if not path.is_file():
            raise PrepareError(
                f"{path} not found: --from-archives must hold {name} (download: {url})"
            )
        fetched = False
    else:
        path, fetched = download_dir / name, True
        if path.is_file():
            print(f"using {path} downloaded earlier")
        else:
            print(f"downloading {url}")
            download(url, path, lambda reason: offline_hint(url, reason), md5 if verify else None)
            return path, True  # checked while downloading
    if verify and md5:
        actual = file_md5(path)
        if actual != md5:
            raise PrepareError(
                f"{path} has md5 {actual}, the official {name} has {md5}. Download it again, or "
                "pass --no-verify to use it anyway."
            )
    return path, fetched


class Archive:
    """Read-only view of a zip or tar(.gz) archive: member names, and reading a member.

    ``strip`` is a leading folder removed from every name (``VOCdevkit/`` say), so that names
    are relative to the dataset folder.
    """

    def __init__(self, path: Path, strip: str = "") -> None:
        self.path, self.strip = path, strip
        try:
            if zipfile.is_zipfile(path):
                self._zip: zipfile.ZipFile | None = zipfile.ZipFile(path)
                self._tar = None
                names = [n for n in self._zip.namelist() if not n.endswith("/")]
            else:
                self._zip, self._tar = None, tarfile.open(path)
                names = [m.name for m in self._tar.getmembers() if m.isfile()]
        except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as err:
            raise PrepareError(
                f"{path} is not a readable archive ({err}); it is probably an incomplete "
                "download: download it again"
            ) from err
        self._full = {self._rel(n): n for n in names if self._rel(n) is not None}

    def _rel(self, name: str) -> str | None:
        name = name.removeprefix("./")
        if self.strip and not name.startswith(self.strip):
            return None
        return name[len(self.strip) :]

    @property
    def names(self) -> list[str]:
        """Member file names, relative to ``strip``."""
        return list(self._full)

    def count(self, folder: str, suffix: str) -> int:
        """How many members ``<folder>/<name><suffix>`` (directly in ``folder``)."""
        return sum(
            1 for n in self._full if str(PurePosixPath(n).parent) == folder and n.endswith(suffix)
        )

    def read(self, name: str) -> bytes:
        """The bytes of member ``name`` (relative); a damaged member raises PrepareError."""
        full = self._full.get(name)
        if full is None:
            raise PrepareError(f"{self.path} has no member {self.strip}{name}")
        try:
            if self._zip is not None:
                return self._zip.read(full)
            f = self._tar.extractfile(full)
            return f.read()
        except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError, KeyError) as err:
            raise PrepareError(
                f"{self.path}: member {full} is damaged ({err}); download the archive again"
            ) from err

    def close(self) -> None:
        (self._zip or self._tar).close()


def check_counts(archive: Archive, expected: dict[tuple[str, str], int], verify: bool) -> None:
    """Member counts of the official archive, per (folder, suffix): a repacked or partial
    archive stops here (skipped with ``verify`` False)."""
    if not verify:
        return
    for (folder, suffix), n in expected.items():
        found = archive.count(folder, suffix)
        if found != n:
            raise PrepareError(
                f"{archive.path} has {found} {suffix} files in {archive.strip}{folder}/, the "
                f"official archive has {n}. Download it again, or pass --no-verify to use it "
                "anyway."
            )


def stage_and_move(
    root: Path, writers: Iterator[tuple[str, Callable[[Path], None]]], total: int
) -> int:
    """Run every (relative path, write(tmp_path)) into a staging folder under ``root``, then
    move all files into place; on any failure nothing is moved and the staging is removed.

    Returns:
        the number of files written.
    """
    from tqdm import tqdm

    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".prepare-", dir=root))
    try:
        staged = []
        for rel, write in tqdm(writers, total=total, desc=f"writing into {root}", unit="file"):
            tmp = staging / rel
            tmp.parent.mkdir(parents=True, exist_ok=True)
            write(tmp)
            staged.append((tmp, root / rel))
        for tmp, final in staged:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
        return len(staged)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_list(text: str) -> list[str]:
    """Ids of a VOC-style list (one per line; extra columns, as in Main/<class>_val.txt, cut)."""
    return [line.split()[0] for line in text.splitlines() if line.strip()]


def add_common_options(
    p: argparse.ArgumentParser, root_help: str, archives_help: str, force_help: str
) -> None:
    """The options every archive-based prepare script takes (root, archives, downloads,
    verification, force)."""
    p.add_argument("--root", type=Path, help=root_help)
    p.add_argument("--from-archives", type=Path, help=archives_help)
    p.add_argument(
        "--download-dir", type=Path, help="where downloads are kept (default: <root>/downloads)"
    )
    p.add_argument("--remove-archives", action="store_true", help="delete the downloads afterwards")
    p.add_argument(
        "--no-verify", dest="verify", action="store_false", help="skip md5 and count checks"
    )
    p.add_argument("--force", action="store_true", help=force_help)


def resolve_paths(args: argparse.Namespace, folder: str) -> argparse.Namespace:
    """``--root`` (default ``<data root>/<folder>``) and ``--download-dir``, expanded."""
    args.root = (args.root or default_data_root() / folder).expanduser()
    args.download_dir = (args.download_dir or args.root / "downloads").expanduser()
    return args


def cli(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a prepare script: a :class:`PrepareError` is one ``error:`` line and status 1."""
    try:
        return run(args)
    except PrepareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
