"""Devices and precisions by name: the ONE table of dtype names and the ONE device resolver that
``run.py``, ``generate.py``, the backbones and the benchmarks share.

    resolve_device("auto")                       # cuda if available, else cpu
    resolve_dtype("fp16", torch.device("cuda"))  # torch.float16
    dtype_name(torch.bfloat16)                   # "bfloat16"

A name that is not a device or a precision raises :class:`~diffseg.errors.ConfigError` naming the
key, the value and the accepted values.
"""

from __future__ import annotations

import logging

import torch

from .errors import ConfigError

__all__ = ["DTYPES", "dtype_name", "resolve_device", "resolve_dtype"]

log = logging.getLogger(__name__)

#: Every accepted precision name (lower case) and its torch dtype.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def dtype_name(dtype: torch.dtype) -> str:
    """The canonical name of a dtype: ``float32``, ``float16`` or ``bfloat16``."""
    return str(dtype).removeprefix("torch.")


def resolve_device(name: str, key: str = "device") -> torch.device:
    """``auto`` -> cuda if available else cpu; otherwise a torch device that must exist here."""
    name = str(name).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(
            f"{key}={name!r} is not a device; use auto, cpu, cuda, cuda:<index> or mps"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}={name} but CUDA is not available here; use {key}=auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"{key}={name} but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ConfigError(f"{key}=mps but MPS is not available here; use {key}=auto or cpu")
    elif device.type != "cpu":
        raise ConfigError(f"{key}={name!r} is not supported; use auto, cpu, cuda[:N] or mps")
    return device


def resolve_dtype(name: str, device: torch.device, key: str = "dtype") -> torch.dtype:
    """``float32`` (the faithful default), ``float16``, ``bfloat16`` (or an alias of
    :data:`DTYPES`), or ``auto``: float16 on CUDA (DiffCut's release runs its UNet under float16
    autocast) and float32 elsewhere."""
    text = str(name).strip().lower()
    if text == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if text not in DTYPES:
        raise ConfigError(
            f"{key}={name!r} is not supported; use float32, float16, bfloat16 or auto"
        )
    dtype = DTYPES[text]
    if dtype == torch.float16 and device.type == "cpu":
        log.warning("%s=float16 on the CPU is slow and not faithful; float32 is recommended", key)
    return dtype
