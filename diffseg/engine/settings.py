"""The method settings of a run: the method config, swept or varied, each instantiated once.

A run evaluates one or more settings ("variants" of the method config from ``sweep`` and
``variants``) on the same images; every setting declares a feature request, and the engine serves
the union of the requests with one UNet pass per batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..methods.base import Method, MethodContext

__all__ = ["Setting", "build_settings", "format_value", "instantiate_method", "method_class"]


def format_value(value: Any) -> str:
    """A value as it appears in a setting's name: floats keep a decimal point (``1.0``)."""
    if isinstance(value, (list, tuple)):
        return "-".join(format_value(v) for v in value)
    if isinstance(value, float):
        text = f"{value:g}"
        return text if any(c in text for c in ".en") else f"{text}.0"
    return str(value)


@dataclass
class Setting:
    """One method setting: its name (None for a run's single setting), the method config it was
    built from, the sweep/variant overrides applied, the method object and its output folder."""

    name: str | None
    params: dict[str, Any]
    overrides: dict[str, Any] = field(default_factory=dict)
    method: Method | None = None
    out_dir: Path | None = None

    @property
    def method_name(self) -> str:
        return self.method.name

    def describe(self) -> dict[str, Any]:
        """JSON-able settings: the method's own description."""
        return self.method.describe()


def method_class(params: Mapping[str, Any]) -> type[Method]:
    """The :class:`Method` subclass a method config's ``_target_`` names."""
    from hydra.utils import get_class

    target = params.get("_target_")
    if not target:
        raise ConfigError("the method config has no _target_ (the method class to build)")
    try:
        cls = get_class(str(target))
    except Exception:  # ImportError, AttributeError, or not a class: Hydra wraps them
        raise ConfigError(
            f"method._target_={target!r} is not a class that can be imported (a run dir written "
            "by an older version of diffseg names old module paths: re-run it in a new run dir)"
        ) from None
    if not issubclass(cls, Method):
        raise ConfigError(
            f"method._target_={target!r} is not a method: subclass diffseg.methods.Method"
        )
    return cls


def instantiate_method(params: Mapping[str, Any]) -> Method:
    """The method object of a config with ``_target_`` (a :class:`Method` subclass). Unknown or
    bad parameters raise :class:`ConfigError` naming the key and the value."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    method_class(params)
    try:
        return instantiate(dict(params), _convert_="all")
    except InstantiationException as err:
        cause = err.__cause__ or err
        raise ConfigError(f"method {params['_target_']}: {cause}") from None


def with_defaults(params: Mapping[str, Any], context: MethodContext) -> dict[str, Any]:
    """The method config with its class's per-dataset / per-backbone defaults where it says
    null (an explicit value always wins)."""
    out = dict(params)
    for key, value in method_class(params).defaults(context).items():
        if out.get(key) is None:
            out[key] = value
    return out


def _check_keys(keys: Sequence[str], params: Mapping[str, Any], where: str) -> None:
    known = [k for k in params if not k.startswith("_")]
    for key in keys:
        if key not in known:
            raise ConfigError(
                f"{where}: the method has no parameter {key!r} (its parameters: "
                f"{', '.join(known) or 'none'})"
            )


def _overrides(sweep: Mapping[str, Any], variants: Sequence[Mapping[str, Any]], params) -> list:
    sweep = {k: v for k, v in (sweep or {}).items() if v is not None}
    _check_keys(list(sweep), params, "sweep")
    for key, values in sweep.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(
                f"sweep.{key} must be a non-empty list of values, e.g. sweep.{key}=[0.9,1.1]; "
                f"got {values!r}"
            )
    out = [dict(zip(sweep, combo, strict=True)) for combo in itertools.product(*sweep.values())]
    out = out if sweep else []
    for entry in variants or []:
        if not isinstance(entry, Mapping) or not entry:
            raise ConfigError(f"each entry of variants must be a mapping of method keys: {entry!r}")
        _check_keys(list(entry), params, "variants")
        out.append(dict(entry))
    return out


def build_settings(
    method_cfg: Mapping[str, Any],
    sweep: Mapping[str, Any] | None,
    variants: Sequence[Mapping[str, Any]] | None,
    run_dir: Path,
    context: MethodContext | None = None,
) -> list[Setting]:
    """The settings of a run: the cartesian product of the non-null ``sweep`` lists, then each
    ``variants`` entry, every one applied over the method config (with the method's defaults for
    ``context`` where it says null); none of them: the method alone (outputs in the run dir
    itself; otherwise one subfolder per setting)."""
    params = with_defaults(method_cfg, context or MethodContext())
    overrides = _overrides(sweep or {}, variants or [], params)
    if not overrides:
        return [Setting(None, params, {}, instantiate_method(params), run_dir)]
    settings, seen = [], set()
    for over in overrides:
        name = ",".join(f"{k}={format_value(v)}" for k, v in over.items())
        if name in seen:
            raise ConfigError(f"the setting {name} appears twice in sweep/variants")
        seen.add(name)
        merged = {**params, **over}
        settings.append(Setting(name, merged, over, instantiate_method(merged), run_dir / name))
    return settings
