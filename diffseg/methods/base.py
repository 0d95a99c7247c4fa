"""The method contract: every stage the engine may call, declared once with its default.

A method is a subclass of :class:`Method`. The engine (``diffseg/engine``) calls these members and
nothing else:

======================  ==========================================================================
``name``                short name for results and logs
``hints``               per-image inputs the engine provides (e.g. ``"num_classes"`` for K-Means-S);
                        default none
``defaults(context)``   (class method) parameter values that depend on the dataset or the backbone,
                        used where the config leaves the parameter ``null``; default none
``feature_request()``   what the method needs from the UNet pass (:mod:`diffseg.features`)
``check_backbone(bb)``  raise ``ValueError`` when the method's settings do not fit the loaded
                        backbone (checked before the run starts); default: fits
``segment(...)``        labels ``(B, S, S)`` of a batch (the public API); ``(B, h, w)`` for an
                        ``(h, w)`` size when ``any_output_shape`` is True (default False)
``predict(...)``        what the engine records: :meth:`segment`, then the dataset's background
                        merge; a method with a label refinement overrides the order
``check_inputs``        the engine sets it False after the first batch (skip checks that wait for
                        the device)
``describe()``          JSON-able settings (written to results.json; part of a run's fingerprint)
======================  ==========================================================================

Generation methods (image + mask pairs, ``python generate.py``) subclass
:class:`GenerationMethod`; the generation task calls its stages only:

======================  ==========================================================================
``name``                short name for logs and tags
``backbone_families``   the backbone families whose UNet it can record (``("sd",)``: SD 1.x/2.x)
``from_config(values)`` (class method) the method from a config's parameters (unknown key, bad
                        value: :class:`ParameterError`); ``parameters()`` lists the keys
``pipeline(model)``     the runnable generation pipeline over a backbone (or a pipeline)
``feature_request(...)``the :class:`~diffseg.features.TrajectoryRequest` of one prompt
``generate(...)``       ``(image, mask, info)`` of one class and seed
``settings()``          JSON-able parameters (written with every image; the dataset's fingerprint)
``describe()``          ``{"name": ..., **settings()}``
======================  ==========================================================================

Parameters are validated when the method is built (:func:`check_number`, :func:`check_int`,
:func:`check_list`): a bad value raises :class:`ParameterError` naming the key, the value and
the valid range, before a run directory is claimed.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..features import FeatureRequest, Features, TrajectoryRequest

__all__ = [
    "GenerationMethod",
    "MergeBackground",
    "Method",
    "MethodContext",
    "ParameterError",
    "RefiningMethod",
    "check_hints",
    "check_int",
    "check_list",
    "check_number",
]

#: ``labels (B, S, S) -> labels (B, S, S)`` on the CPU: the segments no object class claims become
#: one background segment (built by the engine for datasets with a background class).
MergeBackground = Callable[[Tensor], Tensor]


class ParameterError(ValueError):
    """A method parameter out of its range (the message names key, value and range)."""


@dataclass(frozen=True)
class MethodContext:
    """What a method's per-run defaults may depend on.

    Attributes:
        dataset: the dataset config's name (``coco_stuff27``, ``cityscapes``, ``folder``, ...).
        backbone: the backbone's registered name (``sd14``, ``ssd1b``, ``tiny``, ...).
        backbone_family: its family (``sd`` for SD 1.x/2.x, ``sdxl`` for SDXL, SSD-1B, Vega).
    """

    dataset: str = ""
    backbone: str = ""
    backbone_family: str = ""


class Method:
    """Base class of every segmentation method (see the module docstring for the stages)."""

    name: str = "method"
    #: Per-image inputs :meth:`segment` takes through ``hints``.
    hints: tuple[str, ...] = ()
    #: False after the first batch of a run: skip input checks that wait for the device.
    check_inputs: bool = True
    #: Whether :meth:`segment` takes an ``(h, w)`` output size as well as a side ``S``: the
    #: per-image evaluation sizes of ``preprocessing=seg4diff`` need it.
    any_output_shape: bool = False

    @classmethod
    def defaults(cls, context: MethodContext) -> dict[str, Any]:
        """Parameter values for this dataset / backbone, taken where the config gives null."""
        return {}

    def feature_request(self) -> FeatureRequest:
        """What the method needs from the UNet pass."""
        raise NotImplementedError

    def check_backbone(self, backbone: Any) -> None:
        """Raise ``ValueError`` (one sentence naming the setting and the fix) when the settings
        do not fit ``backbone``; the engine calls it once, after the backbone loaded and before
        it checks the feature request against the backbone."""

    def segment(
        self, features: Features, output_size: int, hints: Mapping[str, Any] | None = None
    ) -> Tensor:
        """Labels of a batch: int64 ``(B, S, S)``, ``S = output_size``."""
        raise NotImplementedError

    def predict(
        self,
        features: Features,
        output_size: int,
        hints: Mapping[str, Any] | None = None,
        merge_background: MergeBackground | None = None,
    ) -> Tensor:
        """What the engine scores: :meth:`segment`, then ``merge_background`` (datasets with a
        background class) -> int64 ``(B, S, S)`` on the CPU."""
        labels = self.segment(features, output_size, hints).cpu()
        return labels if merge_background is None else merge_background(labels)

    def describe(self) -> dict[str, Any]:
        """JSON-able settings."""
        return {"name": self.name}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "name")
        return f"{type(self).__name__}({args})"


class RefiningMethod(Method):
    """A method whose labels end with a refinement (PAMR): :meth:`segment_unrefined`, then the
    background merge, then :meth:`refine_labels` (DiffCut's release order, docs/diffcut.md)."""

    def refines(self) -> bool:
        """Whether the refinement is on."""
        return False

    def segment_unrefined(
        self, features: Features, output_size: int, hints: Mapping[str, Any] | None = None
    ) -> Tensor:
        """Labels before the refinement, int64 ``(B, S, S)``."""
        raise NotImplementedError

    def refine_labels(self, labels: Tensor, features: Features) -> Tensor:
        """The refinement of ``labels`` ``(B, S, S)`` against the features' input images."""
        raise NotImplementedError

    def segment(
        self, features: Features, output_size: int, hints: Mapping[str, Any] | None = None
    ) -> Tensor:
        labels = self.segment_unrefined(features, output_size, hints)
        return self.refine_labels(labels, features) if self.refines() else labels

    def predict(
        self,
        features: Features,
        output_size: int,
        hints: Mapping[str, Any] | None = None,
        merge_background: MergeBackground | None = None,
    ) -> Tensor:
        if merge_background is None:
            return self.segment(features, output_size, hints).cpu()
        raw = self.segment_unrefined(features, output_size, hints)
        merged = merge_background(raw.cpu())
        if self.refines():
            merged = self.refine_labels(merged.to(raw.device), features)
        return merged.cpu()


class GenerationMethod:
    """Base class of every generation method (see the module docstring for the stages)."""

    name: str = "generation"
    #: Backbone families (``diffseg.backbones`` registry) whose UNet the method can record.
    backbone_families: tuple[str, ...] = ("sd",)

    @classmethod
    def parameters(cls) -> tuple[str, ...]:
        """The keys a config may set: the constructor's keyword arguments."""
        signature = inspect.signature(cls.__init__)
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return tuple(n for n, p in signature.parameters.items() if n != "self" and p.kind in kinds)

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> GenerationMethod:
        """The method from a config's parameters; null values keep the defaults.

        Raises :class:`ParameterError` for an unknown key or a value out of range."""
        known = cls.parameters()
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ParameterError(f"unknown keys {unknown}; known: {', '.join(known)}")
        kwargs = {k: values[k] for k in known if values.get(k) is not None}
        try:
            return cls(**kwargs)
        except TypeError as err:
            raise ParameterError(str(err)) from None

    def pipeline(self, model: Any) -> Any:
        """The pipeline :meth:`generate` runs for ``model`` (a backbone or a pipeline)."""
        return model

    def feature_request(self, model: Any, class_name: str) -> TrajectoryRequest:
        """What the method records during the generation of ``class_name``."""
        raise NotImplementedError

    def generate(self, model: Any, class_name: str, seed: int) -> tuple[Any, Tensor, dict]:
        """``(image, mask, info)``: uint8 ``(H, W, 3)`` RGB, bool ``(H, W)`` on the CPU, and a
        JSON-able dict (at least prompt, seed, mask_area, token_positions, tokens, unet_calls,
        seconds)."""
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """The parameters as a JSON-able dict (the generated dataset's fingerprint)."""
        return {k: getattr(self, k) for k in self.parameters()}

    def describe(self) -> dict[str, Any]:
        """JSON-able name and settings."""
        return {"name": self.name, **self.settings()}


def check_hints(method: Method, hints: Mapping[str, Any] | None) -> dict[str, Any]:
    """``hints`` as a dict, or ``ValueError`` for a key ``method.hints`` does not list."""
    hints = dict(hints or {})
    unknown = sorted(set(hints) - set(method.hints))
    if unknown:
        takes = ", ".join(method.hints) or "none"
        raise ValueError(f"{type(method).__name__} takes no hint {unknown} (it takes: {takes})")
    return hints


def _range(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi:g}")
    return " and ".join(parts)


def check_number(
    key: str,
    value: Any,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    """``value`` as a finite float in the range, else :class:`ParameterError` naming ``key``."""
    bounds = _range(lo, hi, lo_open, hi_open)
    want = "a number" + (f" {bounds}" if bounds else "")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ParameterError(f"{key}={value!r} is invalid: it must be {want}")
    number = float(value)
    bad = not math.isfinite(number)
    bad |= lo is not None and (number <= lo if lo_open else number < lo)
    bad |= hi is not None and (number >= hi if hi_open else number > hi)
    if bad:
        raise ParameterError(f"{key}={value!r} is invalid: it must be {want}")
    return number


def check_int(key: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int in ``[lo, hi]``, else :class:`ParameterError` naming ``key``."""
    bounds = _range(lo, hi, False, False)
    want = "an integer" + (f" {bounds}" if bounds else "")
    if isinstance(value, bool) or not isinstance(value, int):
        if not (isinstance(value, float) and value.is_integer()):
            raise ParameterError(f"{key}={value!r} is invalid: it must be {want}")
    number = int(value)
    if (lo is not None and number < lo) or (hi is not None and number > hi):
        raise ParameterError(f"{key}={value!r} is invalid: it must be {want}")
    return number


def check_list(
    key: str, value: Any, item: Callable[[str, Any], Any], min_len: int = 1
) -> list[Any]:
    """``value`` as a list of at least ``min_len`` items, each checked by ``item(key, v)``."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ParameterError(f"{key}={value!r} is invalid: it must be a list")
    if len(value) < min_len:
        raise ParameterError(
            f"{key}={list(value)!r} is invalid: it needs at least {min_len} item(s)"
        )
    return [item(key, v) for v in value]
