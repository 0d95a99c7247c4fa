"""Where weights come from: a hub id or a local folder in the diffusers layout, checked before
any long work, with one message naming the id and the fixes when they cannot be had."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = [
    "SUBFOLDERS",
    "WeightsNotFoundError",
    "fix_message",
    "load_vae_unet",
    "loading",
    "move_modules",
    "resolve_weights",
]


class WeightsNotFoundError(FileNotFoundError):
    """Model weights cannot be had: missing local folder, offline, gated or unknown id."""


def _offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", "")
    if value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - very old huggingface_hub
        return False


#: Subfolders (and the config file each must hold) of a model folder, per family.
SUBFOLDERS = {
    "sd": {
        "vae": "config.json",
        "unet": "config.json",
        "text_encoder": "config.json",
        "tokenizer": None,
    },
    "sdxl": {
        "vae": "config.json",
        "unet": "config.json",
        "text_encoder": "config.json",
        "text_encoder_2": "config.json",
        "tokenizer": None,
        "tokenizer_2": None,
    },
}
#: MM-DiTs need the same subfolders: SD3 / SD3.5 load without T5, FLUX with T5 as text_encoder_2.
_MMDIT_SUBFOLDERS = {
    "vae": "config.json",
    "transformer": "config.json",
    "scheduler": "scheduler_config.json",
    "text_encoder": "config.json",
    "text_encoder_2": "config.json",
    "tokenizer": None,
    "tokenizer_2": None,
}
SUBFOLDERS.update(sd3=_MMDIT_SUBFOLDERS, flux=_MMDIT_SUBFOLDERS)


def fix_message(model_id: str, family: str = "sd") -> str:
    folders = ", ".join(f"{sub}/" for sub in SUBFOLDERS[family])
    return (
        "How to fix: (a) download from the Hugging Face Hub: be online with HF_HUB_OFFLINE unset, "
        f"accept the model's licence at https://huggingface.co/{model_id} and log in with "
        "`huggingface-cli login` (or `hf auth login`); or (b) point at a local copy in the "
        f"diffusers layout (a folder with {folders} subfolders), "
        "e.g. `python run.py backbone.path=/local/folder`."
    )


def _looks_like_path(source: str) -> bool:
    return (
        source.startswith(("/", "./", "../", "~", "\\"))
        or os.path.isabs(source)
        or source.count("/") > 1
        or (os.sep != "/" and os.sep in source)
    )


def _check_folder(path: Path, family: str) -> None:
    if not path.is_dir():
        raise WeightsNotFoundError(
            f"model weights: {path} is a file, not a folder. " + fix_message(str(path), family)
        )
    missing = [
        sub
        for sub, marker in SUBFOLDERS[family].items()
        if not (path / sub).is_dir() or (marker and not (path / sub / marker).is_file())
    ]
    if missing:
        raise WeightsNotFoundError(
            f"model weights folder {path} lacks {', '.join(m + '/' for m in missing)} "
            "(with config.json). It must use the diffusers layout, as saved by a pipeline's "
            "`save_pretrained` or downloaded from the hub. " + fix_message(str(path), family)
        )


def resolve_weights(model_id_or_path: str | os.PathLike, family: str = "sd") -> tuple[str, bool]:
    """Check, before any long work, that a model's weights can be loaded.

    Args:
        model_id_or_path: a hub id (``CompVis/stable-diffusion-v1-4``) or a local folder.
        family: ``"sd"`` (SD 1.x/2.x) or ``"sdxl"`` (SDXL, SSD-1B, Vega: two text encoders).

    Returns ``(source, local_files_only)`` for the diffusers/transformers loaders. A local folder
    must hold the family's subfolders with their configs; a hub id must be reachable (or cached
    when offline). Anything else raises :class:`WeightsNotFoundError` naming the id and the fixes.
    """
    source = os.fspath(model_id_or_path)
    path = Path(source).expanduser()
    if path.exists():
        _check_folder(path, family)
        return str(path), True
    if _looks_like_path(source):
        raise WeightsNotFoundError(
            f"model weights folder {path} does not exist. " + fix_message(source, family)
        )
    offline = _offline()
    if not offline:
        from ..hub import hub_reachable

        # No answer from the hub: use the local cache only, instead of 30 s of retries per file.
        offline = not hub_reachable()
    try:
        from huggingface_hub import hf_hub_download

        denoiser = "transformer" if "transformer" in SUBFOLDERS[family] else "unet"
        hf_hub_download(source, f"{denoiser}/config.json", local_files_only=offline)
    except Exception as err:  # offline miss, gated repo, unknown id, no network, bad id
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        where = (
            "the Hugging Face Hub cannot be reached (HF_HUB_OFFLINE or no network) and the "
            "weights are not in the local Hugging Face cache"
            if offline
            else "the Hugging Face Hub did not serve them"
        )
        raise WeightsNotFoundError(
            f"model weights '{source}' are not available: {where} ({reason}). "
            + fix_message(source, family)
        ) from None
    return source, offline


def move_modules(*modules: torch.nn.Module, device, dtype: torch.dtype) -> None:
    """Move modules to ``device`` and cast them to ``dtype`` only when they differ (diffusers
    warns on every dtype cast through ``.to``)."""
    for module in modules:
        module.to(device=device)
        if next(module.parameters()).dtype != dtype:
            module.to(dtype=dtype)


@contextlib.contextmanager
def loading(source: str, family: str) -> Iterator[None]:
    """Turn a loader's failure (a missing or damaged file in a model folder or cache) into one
    :class:`WeightsNotFoundError` naming ``source`` and the fixes."""
    try:
        yield
    except (OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise WeightsNotFoundError(
            f"Could not load the {family} weights '{source}': {type(err).__name__}: {first}. "
            + fix_message(source, family)
        ) from err


def load_vae_unet(source: str, local_only: bool, dtype, vae_dtype, device):
    """The ``vae/`` and ``unet/`` of a model folder or hub id, each loaded in its precision and
    moved to ``device``: ``(vae, unet)``. Call inside :func:`loading`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    vae = AutoencoderKL.from_pretrained(
        source, subfolder="vae", torch_dtype=vae_dtype, local_files_only=local_only
    )
    unet = UNet2DConditionModel.from_pretrained(
        source, subfolder="unet", torch_dtype=dtype, local_files_only=local_only
    )
    move_modules(unet, device=device, dtype=dtype)
    move_modules(vae, device=device, dtype=vae_dtype)
    return vae, unet
