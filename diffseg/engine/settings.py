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

__all__ = ["Setting", "build_settings", "format_value", "instantiate_method"]


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
    method: Any = None
    out_dir: Path | None = None

    @property
    def method_name(self) -> str:
        return str(getattr(self.method, "name", type(self.method).__name__))

    def describe(self) -> dict[str, Any]:
        """JSON-able settings: the method's own description, or its config."""
        if hasattr(self.method, "describe"):
            return self.method.describe()
        return {"name": self.method_name, **{k: v for k, v in self.params.items() if k[0] != "_"}}


def instantiate_method(params: Mapping[str, Any]) -> Any:
    """The method object of a config with ``_target_``; a method must have ``feature_request``
    and ``segment``. Unknown or bad parameters raise :class:`ConfigError`."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    if "_target_" not in params:
        raise ConfigError("the method config has no _target_ (the class or function to build)")
    try:
        method = instantiate(dict(params), _convert_="all")
    except InstantiationException as err:
        cause = err.__cause__ or err
        raise ConfigError(f"method {params['_target_']}: {cause}") from None
    for needed in ("feature_request", "segment"):
        if not callable(getattr(method, needed, None)):
            raise ConfigError(f"{params['_target_']} is not a method: it has no {needed}()")
    return method


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
) -> list[Setting]:
    """The settings of a run: the cartesian product of the non-null ``sweep`` lists, then each
    ``variants`` entry, every one applied over the method config; none of them: the method alone
    (outputs in the run dir itself; otherwise one subfolder per setting)."""
    params = dict(method_cfg)
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
