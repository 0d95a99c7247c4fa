"""Former home of the Stable Diffusion backbone; the backbones now live in
:mod:`diffseg.backbones` (one module per family). These names stay importable from here for
scripts written against them."""

from .backbones import (  # noqa: F401
    DEFAULT_MODEL_ID,
    DEFAULT_TIMESTEP,
    StableDiffusionBackbone,
    WeightsNotFoundError,
    config_names,
    model_configs,
    tiny_clip_tokenizer,
    validate_images,
)
from .backbones.weights import resolve_weights  # noqa: F401
