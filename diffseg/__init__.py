"""diffseg: zero-shot segmentation from diffusion models' attention, in PyTorch.

The public API (see README.md):

- backbones: :class:`StableDiffusionBackbone` (SD 1.x/2.x), :class:`SDXLBackbone` (SDXL, SSD-1B,
  Vega), :func:`build_backbone` (by registered name); images -> :class:`Features`;
- methods (``diffseg.methods``, one contract): :class:`DiffSeg`, the K-Means baselines
  (:class:`KMeansSegmentor`, ``kmeans_c``, ``kmeans_s``), :class:`DiffCut`; :func:`pamr`, the
  refinement several methods share (``diffseg.ops``);
- one call from a photo to segments: :class:`Segmenter` (``diffseg/predictor.py``);
- generation: :class:`SeeDiff` (image / mask pairs from Stable Diffusion);
- ``diffseg.data``: the benchmark datasets and image folders; ``eval.metrics``: the protocol.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from .features import FeatureRequest, Features
from .methods.diffseg import DiffSeg
from .methods.kmeans import KMeansSegmentor, kmeans_c, kmeans_s
from .methods.merging import proposals_to_labels, symmetric_kl
from .ops.aggregation import aggregate_attention
from .ops.pamr import pamr
from .quiet import silence_known_notices

silence_known_notices()  # drops transformers' torchvision notice only (see diffseg/quiet.py)

if TYPE_CHECKING:  # pragma: no cover
    from .backbones import SDXLBackbone, StableDiffusionBackbone, build_backbone
    from .methods.diffcut import DiffCut
    from .methods.seediff import SeeDiff
    from .methods.seg4diff import Seg4Diff
    from .predictor import Segmenter

try:
    __version__ = version("diffseg")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0+unknown"

__all__ = [
    "DiffCut",
    "DiffSeg",
    "FeatureRequest",
    "Features",
    "KMeansSegmentor",
    "SDXLBackbone",
    "SeeDiff",
    "Seg4Diff",
    "Segmenter",
    "StableDiffusionBackbone",
    "build_backbone",
    "pamr",
    "aggregate_attention",
    "kmeans_c",
    "kmeans_s",
    "proposals_to_labels",
    "symmetric_kl",
]


# name -> (module, attribute). The backbones import diffusers and transformers (seconds) and
# SeeDiff OpenCV: load them only when asked for, so `import diffseg` stays cheap.
_LAZY = {
    "StableDiffusionBackbone": (".backbones", "StableDiffusionBackbone"),
    "SDXLBackbone": (".backbones", "SDXLBackbone"),
    "build_backbone": (".backbones", "build_backbone"),
    "DiffCut": (".methods.diffcut", "DiffCut"),
    "SeeDiff": (".methods.seediff", "SeeDiff"),
    "Seg4Diff": (".methods.seg4diff", "Seg4Diff"),
    "Segmenter": (".predictor", "Segmenter"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        module, attribute = _LAZY[name]
        value = getattr(import_module(module, __name__), attribute)
        globals()[name] = value  # later lookups skip this function (and beat the submodule)
        return value
    raise AttributeError(f"module 'diffseg' has no attribute {name!r}")
