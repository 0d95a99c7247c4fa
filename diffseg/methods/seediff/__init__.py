"""SeeDiff: synthetic segmentation data (an image and its class mask) from Stable Diffusion.

- :class:`SeeDiff`: settings, ``soft_mask``, ``mask`` and ``generate`` (one image + mask);
- :mod:`.algorithm`: the mask from recorded attention (Otsu seeds, expansion 16 -> 32 -> 64);
- the attention it needs is a :class:`~diffseg.features.TrajectoryRequest` served by
  :mod:`diffseg.attention` (:func:`.generator.trajectory_request`);
- :mod:`.tokens`: prompts and the class token's position;
- a :class:`~diffseg.methods.base.GenerationMethod`: :mod:`diffseg.tasks.generate`
  (``python generate.py``) builds it from ``method._target_`` and writes its pairs with
  :mod:`diffseg.data.voc_writer` (class-list presets: :mod:`diffseg.data.class_lists`).
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
from .generator import CROSS_LAYERS, SELF_LAYERS, SeeDiff, as_pipeline, sd_scheduler
from .tokens import class_token_positions, format_prompt

__all__ = [
    "CROSS_LAYERS",
    "SELF_LAYERS",
    "SeeDiff",
    "as_pipeline",
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
]
