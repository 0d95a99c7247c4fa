"""Class names and stored-value maps of the background benchmarks, read from shipped JSON files.

Each file in ``datasets/`` holds ``class_names`` (the classes in index order) and
``value_to_class`` (stored label value, as a string key -> class index, or -1 for ignored).
Values missing from the map are errors when a label file holds them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from diffseg.data.base import _INVALID, IGNORE_INDEX, make_lut
from diffseg.data.paths import metadata_file


def load_class_table(
    filename: str, num_classes: int, path: str | Path | None = None
) -> tuple[dict[str, Any], np.ndarray]:
    """Read and check a class table; return it with its lookup table.

    Args:
        filename: the shipped file in ``datasets/``; ``path`` overrides where it is read from.
        num_classes: how many class names it must hold.

    Returns:
        (the JSON object, the (257,) int16 lookup table of :func:`make_lut`: stored value ->
        class index, -1 ignored, -2 not a value of the dataset).
    """
    path = Path(path) if path is not None else metadata_file(filename)
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    names, table = meta.get("class_names"), meta.get("value_to_class")
    try:
        mapping = {int(k): int(v) for k, v in table.items()}
    except (AttributeError, TypeError, ValueError):
        mapping = None
    if (
        not isinstance(names, list)
        or len(names) != num_classes
        or not mapping
        or not all(0 <= k <= 255 and IGNORE_INDEX <= v < num_classes for k, v in mapping.items())
    ):
        raise ValueError(
            f"{path} is not a class table of {num_classes} classes: expected 'class_names' "
            f"({num_classes} names) and 'value_to_class' (stored value 0..255 -> class index "
            "or -1)."
        )
    return meta, make_lut(mapping, default=_INVALID)


def layout_listing(folder: Path, limit: int = 12) -> str:
    """What ``folder`` holds, for error messages ("X does not exist" when it is missing)."""
    if not folder.is_dir():
        return f"{folder} does not exist"
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    shown = ", ".join(entries[:limit]) or "nothing"
    return f"{folder} holds: {shown}" + (" ..." if len(entries) > limit else "")
