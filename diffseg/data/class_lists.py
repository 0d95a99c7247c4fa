"""Class-list presets: Pascal VOC's 20 names and COCO's 80 thing names (package data)."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

__all__ = ["CLASS_LISTS", "class_list"]

CLASS_LISTS = ("voc", "coco")


@cache
def _lists() -> dict[str, list[str]]:
    text = resources.files(__package__).joinpath("class_lists.json").read_text(encoding="utf-8")
    return json.loads(text)


def class_list(name: str) -> list[str]:
    """The class names of preset ``name`` ("voc": aeroplane ... tvmonitor, VOC's spelling and
    order; "coco": person ... toothbrush, COCO's 80 thing classes in category-id order).
    Raises ``ValueError`` for an unknown preset."""
    lists = _lists()
    if name not in lists:
        raise ValueError(f"unknown class-list preset {name!r}; choose one of {', '.join(lists)}")
    return list(lists[name])
