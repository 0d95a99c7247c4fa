"""Segmentation methods, one contract (:class:`~diffseg.methods.base.Method`, ``base.py``).

- :mod:`.diffseg`: DiffSeg (its merging numerics in :mod:`.merging`);
- :mod:`.kmeans`: the K-Means baselines (K-Means-C, K-Means-S);
- :mod:`.diffcut`: DiffCut and its AutoSC ablation (the cut and AutoSC in :mod:`.ncut`);
- :mod:`.seediff`: SeeDiff, a generation method (:class:`~diffseg.methods.base.GenerationMethod`).

Numerical parts several methods share (attention aggregation, K-Means, PAMR) live in
:mod:`diffseg.ops`. A new method is one module here and one config in ``configs/method/`` with its
``_target_`` (docs/architecture.md, "How to add a method").
"""

from __future__ import annotations

from .base import (
    GenerationMethod,
    Method,
    MethodContext,
    ParameterError,
    RefiningMethod,
    check_hints,
)

__all__ = [
    "GenerationMethod",
    "Method",
    "MethodContext",
    "ParameterError",
    "RefiningMethod",
    "check_hints",
]
