"""The run directory: what it holds, when it may be resumed, and atomic JSON writes.

A session locks the run dir (:mod:`.lock`) before it reads anything there, so two jobs never
segment into one dir. ``run.json`` records the run's fingerprint (everything that changes the numbers: dataset and
its limit, evaluation size, backbone, precision, seed, the settings, which outputs are written),
the W&B run id and one entry per session (start, end, images, time per stage). A start on a run
dir with another fingerprint is refused, naming what differs.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import shutil
from pathlib import Path
from typing import Any

from ..errors import ResumeError
from ..io_utils import atomic_write_text
from .lock import LOCK_NAME, RunDirLocked, RunLock, while_writing

__all__ = ["RunDir", "diff_fingerprints", "now", "write_json_atomic"]


def now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def write_json_atomic(path: Path, data: Any) -> None:
    """Strict JSON (nan -> null) written to a temp file beside ``path``, fsync'ed, renamed; the
    file's mode follows the umask like any other file."""
    from eval.metrics import json_safe

    text = json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text, fsync=True)


#: How a fingerprint key left out (an option at its default, see ``_fingerprint``) is shown.
_UNSET = "(default)"


def diff_fingerprints(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Lines ``key: old -> new`` for every leaf that differs (a key one side lacks: the
    option was at its default there)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            a, b = (d[key] if key in d else _UNSET for d in (old, new))
            out += diff_fingerprints(a, b, f"{prefix}{key}.")
        return out
    shown = lambda v: v if v is _UNSET else repr(v)  # noqa: E731
    return [f"{prefix.rstrip('.')}: {shown(old)} -> {shown(new)}"] if old != new else []


class RunDir:
    """A run directory and its ``run.json``.

    Args:
        path: the folder (Hydra's output dir).
        fingerprint: what must not change between sessions of the run (JSON-able).
    """

    def __init__(self, path: Path, fingerprint: dict[str, Any]) -> None:
        self.path = Path(path)
        self.fingerprint = json.loads(json.dumps(fingerprint))
        self.state: dict[str, Any] = {}
        self.resumed = False
        self._lock: RunLock | None = None
        self._made = False  # whether lock() created the folder

    @property
    def run_json(self) -> Path:
        return self.path / "run.json"

    def lock(self, shard: int | None = None) -> RunDir:
        """Take the run dir's OS lock for this session (:mod:`.lock`): ``shard`` for an
        independent shard job, None for a whole run; raises
        :class:`~diffseg.engine.lock.RunDirLocked` naming the holder when another job has it."""
        if self._lock is None:
            self._made = not self.path.exists()
            try:
                self._lock = RunLock(self.path, shard).acquire()
            except RunDirLocked:
                self._restore_hydra_files()  # this start rewrote them: the holder's come back
                raise
        return self

    def unlock(self) -> None:
        """Let the lock go; a dir this session made and never claimed goes with it."""
        if self._lock is None:
            return
        if self._made and not self.run_json.exists():
            for f in self.path.glob(f"{LOCK_NAME}*"):
                f.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.path.rmdir()  # only if nothing else is there
        self._lock.release()
        self._lock = None

    def open(self) -> RunDir:
        """Read ``run.json`` if there is one; raise :class:`ResumeError` when it describes
        another configuration (Hydra's copy of the config is put back as it was)."""
        if not self.run_json.exists():
            self.state = {"fingerprint": self.fingerprint, "created": now(), "sessions": []}
            return self
        try:
            saved = json.loads(self.run_json.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ResumeError(f"{self.run_json} is unreadable ({err}); use a new run dir") from None
        diffs = diff_fingerprints(saved.get("fingerprint"), self.fingerprint)
        if diffs:
            self._restore_hydra_files()
            raise ResumeError(
                f"refusing to resume: the run dir {self.path} holds a run with another "
                "configuration:\n  " + "\n  ".join(diffs[:10]) + "\nRun the original command to "
                "resume it, or choose a new dir (hydra.run.dir=...)."
            )
        saved.setdefault("sessions", [])
        self.state, self.resumed = saved, True
        return self

    def claim(self, config_yaml: str) -> None:
        """From here on the run dir belongs to this configuration: write the resolved config and
        ``run.json``, and keep the first start's Hydra files."""
        self.path.mkdir(parents=True, exist_ok=True)
        self._keep_hydra_files()
        atomic_write_text(self.path / "config_resolved.yaml", config_yaml)
        self.save()

    def save(self, session: dict[str, Any] | None = None) -> None:
        """Write ``run.json`` (with ``session`` appended). Independent shard jobs share it: each
        write takes the sessions on disk now, one job at a time, so none is lost."""
        with while_writing(self.path / f"{LOCK_NAME}.run_json"):
            try:
                on_disk = json.loads(self.run_json.read_text(encoding="utf-8")).get("sessions")
            except (OSError, json.JSONDecodeError, AttributeError):
                on_disk = None
            if isinstance(on_disk, list):  # every session this process added is there too
                self.state["sessions"] = on_disk
            if session is not None:
                self.state["sessions"].append(session)
            write_json_atomic(self.run_json, self.state)

    def add_session(self, session: dict[str, Any]) -> None:
        self.save(session)

    # -- what run.json holds besides the fingerprint: typed accessors (the file is unchanged) --

    @property
    def sessions(self) -> list[dict[str, Any]]:
        """One entry per session (start, end, images, stages, ...)."""
        return self.state.setdefault("sessions", [])

    @property
    def backbone(self) -> dict[str, Any] | None:
        """The loaded backbone's description (set by the first session that loaded it)."""
        return self.state.get("backbone")

    @backbone.setter
    def backbone(self, value: dict[str, Any]) -> None:
        self.state["backbone"] = value

    @property
    def skipped(self) -> list[dict[str, str]]:
        """Unreadable images passed over: id and reason."""
        return self.state.get("skipped") or []

    @skipped.setter
    def skipped(self, value: list[dict[str, str]]) -> None:
        self.state["skipped"] = value

    @property
    def wandb_id(self) -> str | None:
        """The W&B run id, so that a resumed run logs into the same W&B run."""
        return self.state.get("wandb_id")

    @wandb_id.setter
    def wandb_id(self, value: str | None) -> None:
        self.state["wandb_id"] = value

    # Hydra rewrites .hydra/*.yaml at every start: keep the first start's copy, and put it back
    # when a resume is refused so the run dir still describes its own run.
    def _keep_hydra_files(self) -> None:
        hydra_dir, keep = self.path / ".hydra", self.path / ".hydra" / "first_start"
        if hydra_dir.is_dir() and not keep.exists():
            keep.mkdir()
            for f in hydra_dir.glob("*.yaml"):
                shutil.copyfile(f, keep / f.name)

    def _restore_hydra_files(self) -> None:
        keep = self.path / ".hydra" / "first_start"
        for f in keep.glob("*.yaml") if keep.is_dir() else []:
            shutil.copyfile(f, self.path / ".hydra" / f.name)
