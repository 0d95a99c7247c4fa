"""Segmentation methods and their contract.

A method is an object with

- ``name``: a short name for results and logs;
- ``feature_request() -> FeatureRequest``: what it needs from the UNet pass
  (:mod:`diffseg.features`);
- ``segment(features, output_size, hints=None) -> LongTensor (B, S, S)``: segment ids for a batch,
  ``S = output_size`` (the evaluation size); ``hints`` carries per-image extra inputs that the
  engine provides on request (``hints`` attribute: e.g. K-Means-S's ``"num_classes"``); a hint the
  method does not list is an error;
- ``describe() -> dict``: its settings, JSON-able (written to results.json);
- optionally ``check_inputs`` (bool): the engine sets it False after the first batch, to skip
  checks that wait for the device.

The registered methods: :class:`diffseg.DiffSeg` (``diffseg/segmentor.py``), the K-Means baselines
(``diffseg/baselines.py``) and DiffCut (``diffseg/methods/diffcut.py``). A new method is one module
and one config in ``configs/method/`` with its ``_target_``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from ..features import FeatureRequest, Features
from ..segmentor import check_hints

__all__ = ["Method", "check_hints"]


@runtime_checkable
class Method(Protocol):
    """The contract every method meets (see the module docstring)."""

    name: str

    def feature_request(self) -> FeatureRequest: ...

    def segment(
        self, features: Features, output_size: int, hints: dict[str, Any] | None = None
    ) -> Tensor: ...

    def describe(self) -> dict[str, Any]: ...
