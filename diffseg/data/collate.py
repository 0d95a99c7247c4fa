"""Batching items whose labels may differ in size from image to image.

With ``preprocessing=seg4diff`` every image is evaluated at its own resized size, so the labels of
a batch are (h_b, w_b) of several shapes that cannot be stacked. torch's default collate stacks
everything and fails on them; :func:`collate_items` keeps such a field as a list and leaves every
other field exactly as the default collate makes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import default_collate

__all__ = ["collate_items"]


def collate_items(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One batch from dataset items (dicts with the same keys).

    Returns:
        ``default_collate(items)``, except that a tensor field whose shapes differ between the
        items (e.g. ``label`` (h_b, w_b)) is a list of the B tensors, in item order.
    """
    if not items:
        raise ValueError("cannot collate an empty batch")
    ragged = {
        key
        for key, value in items[0].items()
        if isinstance(value, torch.Tensor) and len({tuple(it[key].shape) for it in items}) > 1
    }
    if not ragged:
        return default_collate(list(items))
    batch = default_collate([{k: v for k, v in it.items() if k not in ragged} for it in items])
    batch.update({key: [it[key] for it in items] for key in ragged})
    return {key: batch[key] for key in items[0]}  # the items' key order
