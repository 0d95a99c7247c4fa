"""Where datasets and their metadata live on disk."""

from __future__ import annotations

import os
from pathlib import Path

#: Environment variable naming the data root (the folder holding ``cocostuff/``, ``cityscapes/``).
DATA_ENV_VAR = "DIFFSEG_DATA"


def repo_root() -> Path:
    """The repository checkout holding the ``diffseg`` package (editable install)."""
    return Path(__file__).resolve().parents[2]


def metadata_dir() -> Path:
    """``<repo>/datasets``: the shipped benchmark metadata (curated ids, class mapping)."""
    return repo_root() / "datasets"


def default_data_root() -> Path:
    """The data root: ``$DIFFSEG_DATA`` when set and non-empty, else ``<repo>/datasets``.

    Each benchmark lives in its own folder under it (``cocostuff/``, ``cityscapes/``).
    """
    env = os.environ.get(DATA_ENV_VAR, "").strip()
    if env:
        return Path(env).expanduser()
    return metadata_dir()


def metadata_file(name: str) -> Path:
    """Path of a shipped metadata file, with a clear error when the checkout lacks it."""
    path = metadata_dir() / name
    if not path.is_file():
        raise FileNotFoundError(
            f"benchmark metadata file {path} is missing; it ships with the repository in "
            f"datasets/{name}. Use an editable install of a full checkout (pip install -e .)."
        )
    return path
