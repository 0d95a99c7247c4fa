"""SeeDiff: synthetic segmentation data (an image and its class mask) from Stable Diffusion.

- :class:`SeeDiff`: settings, ``soft_mask``, ``mask`` and ``generate`` (one image + mask);
- :mod:`.algorithm`: the mask from recorded attention (Otsu seeds, expansion 16 -> 32 -> 64);
- the attention it needs is a :class:`~diffseg.features.TrajectoryRequest` served by
  :mod:`diffseg.attention` (:func:`.generator.trajectory_request`);
- :mod:`.tokens`: prompts and the class token's position;
- :mod:`.writer`: the Pascal-VOC-layout output dataset; :mod:`diffseg.tasks.generate`:
  ``python generate.py``.
"""

from __future__ import annotations

from .algorithm import (
    combine_cross_attention,
    expand,
    expansion_step,
    foreground_map,
    minmax,
    otsu_pass,
    refine_mask,
    soft_mask,
)
from .classes import CLASS_LISTS, class_list
from .generator import CROSS_LAYERS, SELF_LAYERS, SeeDiff, as_pipeline, sd_scheduler
from .tokens import class_token_positions, format_prompt
from .writer import VOCWriter, voc_palette

__all__ = [
    "CLASS_LISTS",
    "CROSS_LAYERS",
    "SELF_LAYERS",
    "SeeDiff",
    "VOCWriter",
    "as_pipeline",
    "class_list",
    "class_token_positions",
    "combine_cross_attention",
    "expand",
    "expansion_step",
    "foreground_map",
    "format_prompt",
    "minmax",
    "otsu_pass",
    "refine_mask",
    "sd_scheduler",
    "soft_mask",
    "voc_palette",
]
