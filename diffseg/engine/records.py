"""Durable per-image records: ``per_image.csv``, one row per image, appended as images finish.

Each batch's rows are flushed and fsync'ed before the next batch starts, with the integer
TP/FP/FN counts that make a resume exact. A row torn by a kill is cut off on the next start and
recomputed; damage anywhere else stops the run with the line to fix.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ResumeError

__all__ = [
    "CSV_COLUMNS",
    "CSV_COLUMNS_UNLABELLED",
    "RowWriter",
    "merge_record_files",
    "read_all_records",
    "read_per_image",
    "record_files",
]

log = logging.getLogger(__name__)

#: Columns of ``per_image.csv`` for labelled datasets (tp/fp/fn: JSON lists of per-class ints;
#: random_weights: 1 when the backbone had random weights, so the row means nothing).
CSV_COLUMNS = [
    "id", "acc", "miou", "num_segments", "num_classes", "pixels", "tp", "fp", "fn",
    "random_weights",
]  # fmt: skip
#: Columns for image folders (no labels, no metric).
CSV_COLUMNS_UNLABELLED = ["id", "num_segments", "random_weights"]


def _parse_row(row: dict[str, str], columns: Sequence[str]) -> dict[str, Any]:
    """A CSV row back to a record; raises ValueError on anything malformed."""
    if None in row or any(row.get(c) is None for c in columns):
        raise ValueError("wrong number of fields")
    rec: dict[str, Any] = {"id": row["id"]}
    if not rec["id"]:
        raise ValueError("empty id")
    for key in ("acc", "miou"):
        if key in columns:
            rec[key] = float(row[key]) if row[key] != "" else None
    for key in ("num_segments", "num_classes", "pixels", "random_weights"):
        if key in columns:
            rec[key] = int(row[key])
    for key in ("tp", "fp", "fn"):
        if key in columns:
            values = json.loads(row[key])
            if not isinstance(values, list) or not all(isinstance(v, int) for v in values):
                raise ValueError(f"{key} is not a list of integers")
            rec[key] = values
    return rec


def read_per_image(path: Path, columns: Sequence[str], repair: bool = True) -> list[dict[str, Any]]:
    """Records saved in ``per_image.csv``, in file order, each id once.

    A file written by two processes at once (before run dirs were locked) may hold an id
    twice: its first row is the record, the others are skipped with a warning.
    A trailing partial line (the process died mid-write) is cut off the file when ``repair``;
    a last complete row that does not parse is dropped the same way. Damage anywhere else
    raises :class:`ResumeError`.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    keep = data
    if data and not data.endswith(b"\n"):
        keep = data[: data.rfind(b"\n") + 1]  # rfind -1 -> b""
    lines = keep.decode("utf-8", errors="replace").splitlines()
    if not lines:
        if repair and keep != data:
            _truncate(path, 0)
        return []
    header = next(csv.reader([lines[0]]))
    if header != list(columns):
        raise ResumeError(
            f"{path} has columns {header}, expected {list(columns)}: it belongs to another kind of "
            "run. Use a new run dir (hydra.run.dir=...)."
        )
    records: list[dict[str, Any]] = []
    good_bytes = len(lines[0].encode("utf-8")) + 1
    for n, line in enumerate(lines[1:], start=2):
        try:
            row = next(csv.DictReader([line], fieldnames=list(columns)))
            rec = _parse_row(row, columns)
        except (ValueError, StopIteration, csv.Error) as err:
            if n == len(lines):  # the last row: a torn write that happened to end in a newline
                log.warning("%s: dropping its damaged last row (%s); it is recomputed", path, err)
                break
            raise ResumeError(
                f"{path} line {n} is damaged ({err}); fix or delete that line (the image is "
                "then recomputed) and run again"
            ) from None
        records.append(rec)
        good_bytes += len(line.encode("utf-8")) + 1
    if repair and good_bytes != len(data):
        log.warning("%s: removing an incomplete last row (interrupted write)", path)
        _truncate(path, good_bytes)
    return _first_of_each_id(records, path)


def _first_of_each_id(records: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for rec in records:
        seen.setdefault(rec["id"], rec)
    if len(seen) < len(records):
        log.warning("%s: %d repeated rows (an image written twice); each image counts once",
                    path, len(records) - len(seen))  # fmt: skip
    return list(seen.values())


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)
        f.flush()
        os.fsync(f.fileno())


class RowWriter:
    """Appends rows to ``per_image.csv`` and makes each batch durable (flush + fsync)."""

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        self.path = path
        self.columns = list(columns)
        new = not path.exists() or path.stat().st_size == 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8", newline="")
        self._writer = csv.writer(self._file, lineterminator="\n")
        if new:
            self._writer.writerow(self.columns)
            self.sync()

    def write(self, record: Mapping[str, Any]) -> None:
        row = []
        for col in self.columns:
            value = record.get(col)
            if col in ("tp", "fp", "fn"):
                row.append(json.dumps([int(v) for v in value], separators=(",", ":")))
            elif isinstance(value, bool):
                row.append(int(value))
            elif value is None or (isinstance(value, float) and math.isnan(value)):
                row.append("")
            elif isinstance(value, float):
                row.append(repr(round(value, 6)))
            else:
                row.append(value)
        self._writer.writerow(row)

    def sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self.sync()
            self._file.close()


def record_files(folder: Path) -> list[Path]:
    """``per_image.csv`` and the per-process ``per_image.rank<r>.csv`` files of a folder."""
    main = [folder / "per_image.csv"] if (folder / "per_image.csv").exists() else []
    return main + sorted(folder.glob("per_image.rank*.csv"))


def read_all_records(
    folder: Path, columns: Sequence[str], own: Path | None = None
) -> dict[str, dict[str, Any]]:
    """Every process's records of a folder, by image id (the first row of an id wins). Only
    ``own`` (this process's file) is repaired; the others are read as they are."""
    out: dict[str, dict[str, Any]] = {}
    for path in record_files(folder):
        for rec in read_per_image(path, columns, repair=path == own):
            out.setdefault(rec["id"], rec)
    return out


def merge_record_files(folder: Path, columns: Sequence[str], order: Sequence[str]) -> None:
    """Fold the per-process files into one ``per_image.csv`` (rows in ``order``; ids not in it
    are kept after them), written beside it and renamed, then remove the per-process files."""
    ranks = sorted(folder.glob("per_image.rank*.csv"))
    if not ranks:
        return
    records = read_all_records(folder, columns)
    ranked = {image_id: k for k, image_id in enumerate(order)}
    rows = sorted(records.values(), key=lambda r: ranked.get(r["id"], len(ranked)))
    tmp = folder / ".per_image.csv.merging"
    tmp.unlink(missing_ok=True)
    writer = RowWriter(tmp, columns)
    for row in rows:
        writer.write(row)
    writer.close()
    os.replace(tmp, folder / "per_image.csv")
    for path in ranks:
        path.unlink()
