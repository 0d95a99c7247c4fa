"""DiffSeg in PyTorch: unsupervised zero-shot segmentation from Stable Diffusion self-attention.

The public API, one name per stage (see README.md):

- :class:`StableDiffusionBackbone`: images -> per-resolution self-attention maps;
- :class:`DiffSeg`: attention maps -> segment ids (the paper's method);
- :class:`KMeansSegmentor` (``kmeans_c``, ``kmeans_s``): the paper's K-Means baselines;
- ``diffseg.data``: the benchmark datasets and image folders; ``eval.metrics``: the protocol.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from .baselines import KMeansSegmentor, kmeans_c, kmeans_s
from .segmentor import DiffSeg, aggregate_attention, proposals_to_labels, symmetric_kl

if TYPE_CHECKING:  # pragma: no cover
    from .backbone import StableDiffusionBackbone

try:
    __version__ = version("diffseg")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0+unknown"

__all__ = [
    "DiffSeg",
    "KMeansSegmentor",
    "StableDiffusionBackbone",
    "aggregate_attention",
    "kmeans_c",
    "kmeans_s",
    "proposals_to_labels",
    "symmetric_kl",
]


def __getattr__(name: str) -> Any:
    # The backbone imports diffusers and transformers (seconds); load it only when asked for,
    # so `import diffseg` stays cheap for users of the segmentor or the data alone.
    if name == "StableDiffusionBackbone":
        from .backbone import StableDiffusionBackbone

        return StableDiffusionBackbone
    raise AttributeError(f"module 'diffseg' has no attribute {name!r}")
