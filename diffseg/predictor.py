"""One call from a photo to segments: :class:`Segmenter`.

::

    from diffseg import Segmenter
    seg = Segmenter("diffseg", backbone="sd14")      # any configs/method/<name>.yaml
    result = seg("photo.jpg", kl_threshold=1.0)      # path, PIL image, array or tensor
    result.labels                                    # (H, W) int64 at the photo's own size
    result.overlay()                                 # PIL image: photo | segments | edges
    seg.batch(["a.jpg", "b.jpg"])                    # one feature pass for the batch

A :class:`Segmenter` composes the same Hydra config as ``python run.py method=<name>
backbone=<name> dataset=folder`` (so a method added to ``configs/method/`` works here without
editing this file), loads the backbone once and keeps it, and builds the method again only for
per-call parameters it has not seen. Images are prepared as a folder run prepares them (EXIF
orientation applied, ``crop`` = center / pad / resize, the method's input size), segmented at the
method's evaluation size and mapped back onto the photo, so a call's labels equal the label PNG
that ``run.py dataset=folder`` writes for the same photo and settings.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from .errors import ConfigError, DataError

__all__ = [
    "CONFIG_DIR",
    "Protocol",
    "SegmentationResult",
    "Segmenter",
    "available_methods",
    "compose_config",
    "load_photo",
    "read_protocol",
    "segment_together",
]

#: Hydra's composition is process-global: one composition at a time (a page's threads).
_COMPOSE_LOCK = threading.Lock()
#: The repository's Hydra configs (the same ones ``run.py`` composes).
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def _config_dir(config_dir: str | Path | None) -> Path:
    path = Path(config_dir) if config_dir is not None else CONFIG_DIR
    if not (path / "config.yaml").is_file():
        raise ConfigError(
            f"no Hydra configs at {path} (configs/config.yaml): install diffseg from its source "
            "tree (pip install -e .) or pass config_dir=/path/to/diffseg/configs"
        )
    return path


def available_methods(config_dir: str | Path | None = None) -> list[str]:
    """The method names ``Segmenter`` accepts: one per ``configs/method/*.yaml``."""
    return sorted(p.stem for p in (_config_dir(config_dir) / "method").glob("*.yaml"))


def available_backbones(config_dir: str | Path | None = None) -> list[str]:
    """The backbone names: one per ``configs/backbone/*.yaml``."""
    return sorted(p.stem for p in (_config_dir(config_dir) / "backbone").glob("*.yaml"))


def compose_config(
    method: str,
    backbone: str | None = None,
    overrides: Sequence[str] = (),
    config_dir: str | Path | None = None,
) -> DictConfig:
    """The config of ``python run.py method=<method> [backbone=<backbone>] dataset=folder
    <overrides>`` (the folder's path is a placeholder: a predictor reads no dataset)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    folder = _config_dir(config_dir)
    methods = available_methods(folder)
    if method not in methods:
        raise ConfigError(f"method={method!r} is unknown; choose one of {', '.join(methods)}")
    if backbone is not None and backbone not in available_backbones(folder):
        raise ConfigError(
            f"backbone={backbone!r} is unknown; choose one of "
            f"{', '.join(available_backbones(folder))}"
        )
    args = ["dataset=folder", "dataset.path=.", "logger=none", f"method={method}"]
    args += [f"backbone={backbone}"] if backbone else []
    try:
        with _COMPOSE_LOCK:
            GlobalHydra.instance().clear()  # a caller's own Hydra context must not break us
            with initialize_config_dir(config_dir=str(folder), version_base="1.3"):
                return compose(config_name="config", overrides=[*args, *overrides])
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"{' '.join(overrides)}: {str(err).splitlines()[0]}") from None


@dataclass(frozen=True)
class Protocol:
    """How a method sees an image: the model's input side (None = the backbone's native size),
    the evaluation size of its predictions, the benchmark preprocessing and the UNet dtype."""

    image_size: int | None
    resolution: int
    preprocessing: str
    dtype: str


def method_params(cfg: DictConfig) -> dict[str, Any]:
    """The method config of a composed config with the method's own defaults for a folder of
    photos on the config's backbone filled in where it says null (as ``run.py`` does)."""
    from .engine.config import plain
    from .engine.settings import with_defaults
    from .methods.base import MethodContext
    from .tasks.build import backbone_family

    backbone = plain(cfg.backbone)
    context = MethodContext(
        dataset="folder",
        backbone=str(backbone.get("name", "")),
        backbone_family=backbone_family(backbone),
    )
    return with_defaults(plain(cfg.method), context)


def read_protocol(cfg: DictConfig) -> Protocol:
    """The method's protocol from a composed config: the one place that knows where its keys
    live (top level today)."""
    return Protocol(
        image_size=cfg.get("image_size"),
        resolution=int(cfg.resolution),
        preprocessing=str(cfg.get("preprocessing", "diffseg")),
        dtype=str(cfg.get("dtype", "float32")),
    )


# ----------------------------------------------------------------------------- images


def _pil_to_rgb(img) -> np.ndarray:
    """A PIL image (EXIF orientation applied) as uint8 (H, W, 3), modes as ``read_image_rgb``."""
    from PIL import ImageOps

    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        gray = (np.clip(np.asarray(img).astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if img.mode != "RGB":
        img = img.convert("RGBA").convert("RGB") if img.mode in ("P", "PA") else img.convert("RGB")
    return np.asarray(img, dtype=np.uint8).copy()


def _read_file(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return _pil_to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(
            f"cannot decode image {path} ({type(err).__name__}: {err}); the file is corrupt, "
            "truncated or not an image"
        ) from None


def load_photo(source: Any) -> tuple[np.ndarray, np.ndarray]:
    """A photo as the model's pixels and as shown.

    Args:
        source: a path (str or Path), a PIL image (EXIF orientation applied to both), an
            (H, W, 3) uint8 array, or a (3, H, W) float tensor in [-1, 1].

    Returns:
        ``(pixels, rgb)``: float32 (H, W, 3) in 0..255 (unrounded for a tensor) and the uint8
        (H, W, 3) picture.
    """
    from PIL import Image

    if isinstance(source, str | Path):
        rgb = _read_file(Path(source).expanduser())
        return rgb.astype(np.float32), rgb
    if isinstance(source, Image.Image):
        rgb = _pil_to_rgb(source)
        return rgb.astype(np.float32), rgb
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim != 3 or source.shape[2] != 3:
            raise DataError(
                f"an image array must be (H, W, 3) uint8, got {source.shape} {source.dtype}"
            )
        rgb = np.ascontiguousarray(source)
        return rgb.astype(np.float32), rgb
    if isinstance(source, torch.Tensor):
        if source.ndim != 3 or source.shape[0] != 3 or not source.is_floating_point():
            raise DataError(
                f"an image tensor must be float (3, H, W) in [-1, 1], got "
                f"{tuple(source.shape)} {source.dtype}"
            )
        x = source.detach().to("cpu", torch.float32)
        if x.min() < -1.01 or x.max() > 1.01:
            raise DataError(
                f"an image tensor must hold values in [-1, 1], got [{x.min():.3g}, {x.max():.3g}]"
            )
        pixels = ((x.clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).contiguous().numpy()
        return pixels, pixels.round().clip(0, 255).astype(np.uint8)
    raise DataError(
        f"cannot segment a {type(source).__name__}: give a path, a PIL image, an (H, W, 3) "
        "uint8 array or a (3, H, W) tensor in [-1, 1]"
    )


# ----------------------------------------------------------------------------- results


@dataclass
class SegmentationResult:
    """One photo's segmentation.

    Attributes:
        labels: int64 (H, W) segment ids at the photo's own size; -1 = not segmented (the
            borders outside the centre square with ``crop="center"``).
        image: uint8 (H, W, 3), the photo as segmented (EXIF orientation applied).
        method: the method's name; ``params`` the per-call parameters applied.
        backbone: the backbone's name; ``random_weights`` True when its weights are random
            (the segments are then meaningless).
        timings: seconds per stage (``load``, ``features``, ``method``, ``to_photo``); the
            feature pass of a batch or of several settings is shared, so it is the whole
            pass's time.
        settings: the method's full description (its ``describe()``).
    """

    labels: np.ndarray
    image: np.ndarray
    method: str
    backbone: str
    random_weights: bool
    crop: str
    params: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def num_segments(self) -> int:
        """Distinct segment ids on the photo (-1, not segmented, is not one)."""
        return int(np.unique(self.labels[self.labels >= 0]).size)

    def overlay(self, max_side: int | None = 1024):
        """PIL image: photo | segments | photo with segments and edges (the drawing of a run's
        overlays, captioned when the weights are random), long side at most ``max_side``."""
        from PIL import Image

        from .overlay import RANDOM_WEIGHTS_CAPTION, make_overlay

        caption = RANDOM_WEIGHTS_CAPTION if self.random_weights else None
        picture = make_overlay(self.image, self.labels, caption=caption, max_side=max_side)
        return Image.fromarray(picture)

    def metadata(self) -> dict[str, Any]:
        """PNG text entries of the saved files (see :func:`diffseg.overlay.png_metadata`)."""
        params = ",".join(f"{k}={v}" for k, v in self.params.items()) or None
        return {"method": self.method, "backbone": self.backbone, "params": params}

    def save(self, folder: str | Path, name: str = "image") -> dict[str, Path]:
        """Write ``<folder>/<name>.png`` (the label map, as a run's predictions) and
        ``<folder>/<name>_overlay.png``; returns both paths."""
        from .overlay import save_png, save_segments_png

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        labels = save_segments_png(
            folder / f"{name}.png", self.labels, self.metadata(), self.random_weights
        )
        picture = np.asarray(self.overlay())
        meta = {**self.metadata(), "random_weights": self.random_weights}
        overlay = save_png(folder / f"{name}_overlay.png", picture, meta)
        return {"labels": labels, "overlay": overlay}


# ----------------------------------------------------------------------------- the predictor


def _key(params: Mapping[str, Any]) -> str:
    return repr(sorted(params.items()))


class Segmenter:
    """A method with its backbone, ready to segment photos.

    Args:
        method: a name of :func:`available_methods` (``diffseg``, ``diffcut``, ``kmeans_c``,
            ``kmeans_s``, ``diffcut_autosc``, ...).
        backbone: a name of ``configs/backbone`` (``sd14``, ``ssd1b``, ``tiny``, ...); None =
            the method's own (DiffSeg: sd14, DiffCut: ssd1b).
        crop: how a photo is made square: ``center`` (the paper's crop), ``pad`` (grey
            padding, nothing lost) or ``resize`` (squashed); for every method, Seg4Diff
            included (its benchmark chain, ``run.py``'s ``preprocessing=seg4diff``, is not used
            here: ``resolution`` is the side of the square prediction).
        device: ``auto``, ``cpu``, ``cuda``, ...; dtype: None = the method's protocol.
        overrides: more ``run.py`` overrides (``image_size=256``, ``resolution=128``,
            ``method.num_points=8``, ``backbone.path=/models/sd14``).
        model: an already loaded backbone to use instead of loading ``backbone`` (to share one
            model between segmenters; it must be the backbone the config names).
        config_dir: the Hydra configs (default: the repository's ``configs/``).

    Raises:
        ConfigError: an unknown method, backbone, key or value; weights that cannot be had
            (offline, not downloaded), with the fix, as ``run.py`` says it.
    """

    def __init__(
        self,
        method: str = "diffseg",
        backbone: str | None = None,
        *,
        crop: str = "center",
        device: str = "auto",
        dtype: str | None = None,
        overrides: Sequence[str] = (),
        model: Any = None,
        config_dir: str | Path | None = None,
    ) -> None:
        from .data.transforms import CROP_MODES
        from .engine.config import check_config, plain
        from .engine.settings import instantiate_method
        from .tasks.build import build_backbone_from_config, native_image_size

        if crop not in CROP_MODES:
            raise ConfigError(f"crop={crop!r} is unknown; choose one of {', '.join(CROP_MODES)}")
        self.crop = crop
        extra = [f"device={device}"] + ([f"dtype={dtype}"] if dtype else [])
        self.cfg = compose_config(method, backbone, [*extra, *overrides], config_dir)
        self.name = method
        self.protocol = read_protocol(self.cfg)
        self.knobs = check_config(self.cfg)
        self.backbone_name = str(self.cfg.backbone.name)
        self.image_size = self.protocol.image_size or native_image_size(plain(self.cfg.backbone))
        self.resolution = self.protocol.resolution
        self.params: dict[str, Any] = method_params(self.cfg)
        self._methods: dict[str, Any] = {_key({}): instantiate_method(self.params)}
        self.model = model or build_backbone_from_config(plain(self.cfg.backbone), self.knobs)
        self._check(self._methods[_key({})])

    # -- configuration ------------------------------------------------------------------

    @property
    def random_weights(self) -> bool:
        return bool(self.model.is_random)

    @property
    def hints(self) -> tuple[str, ...]:
        """Per-image inputs the method needs (K-Means-S: ``num_classes``), given per call."""
        return tuple(getattr(self._methods[_key({})], "hints", ()))

    def parameters(self) -> dict[str, Any]:
        """The method's parameters (its config) that a call may change."""
        return {k: v for k, v in self.params.items() if not k.startswith("_")}

    def _check(self, method: Any) -> None:
        try:
            method.check_backbone(self.model)
            self.model.check_request(method.feature_request(), self.image_size)
        except ValueError as err:
            raise ConfigError(f"method {self.name}: {err}") from None

    def method(self, **params: Any) -> Any:
        """The method object for ``params`` (the config's values for the others), built once."""
        from .engine.settings import instantiate_method

        key = _key(params)
        if key not in self._methods:
            known = self.parameters()
            for name in params:
                if name not in known:
                    raise ConfigError(
                        f"{self.name} has no parameter {name!r} (its parameters: "
                        f"{', '.join(known) or 'none'})"
                    )
            built = instantiate_method({**self.params, **params})
            self._check(built)
            self._methods[key] = built
        return self._methods[key]

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "backbone": self.backbone_name,
            "random_weights": self.random_weights,
            "image_size": self.image_size,
            "resolution": self.resolution,
            "crop": self.crop,
            "protocol": self.protocol.__dict__,
        }

    def __repr__(self) -> str:
        return f"Segmenter({self.name!r}, backbone={self.backbone_name!r}, crop={self.crop!r})"

    # -- segmenting -----------------------------------------------------------------------

    def prepare(self, images: Sequence[Any]) -> tuple[torch.Tensor, list[np.ndarray]]:
        """Photos -> the model input ``(B, 3, S, S)`` in [-1, 1] (``S`` = the input size) and
        the uint8 pictures as shown."""
        from .data.transforms import preprocess_image_crop

        tensors, shown = [], []
        for source in images:
            pixels, rgb = load_photo(source)
            tensors.append(preprocess_image_crop(pixels, self.image_size, self.crop))
            shown.append(rgb)
        return torch.stack(tensors), shown

    def __call__(self, image: Any, **params: Any) -> SegmentationResult:
        """Segment one photo with the method's parameters ``params`` (e.g. ``kl_threshold=1.0``;
        K-Means-S also takes ``num_classes``)."""
        return self.batch([image], **params)[0]

    def batch(self, images: Sequence[Any], **params: Any) -> list[SegmentationResult]:
        """Segment several photos with one feature pass; one result per photo, in order."""
        return segment_together(images, [(self, params)])[0]

    def sweep(self, image: Any, settings: Sequence[Mapping[str, Any]]) -> list[SegmentationResult]:
        """One photo under several parameter settings (``[{"kl_threshold": 0.9}, ...]``), from
        one feature pass; one result per setting."""
        results = segment_together([image], [(self, dict(s)) for s in settings])
        return [r[0] for r in results]


def _hints(params: dict[str, Any], hints: tuple[str, ...], n: int) -> dict[str, Any] | None:
    """Take the per-image inputs a method needs out of ``params`` (one value or one per image)."""
    out = {}
    for name in hints:
        if name not in params:
            raise ConfigError(
                f"this method needs {name}= per call (e.g. {name}=5): a folder photo has no "
                "ground truth to count it from"
            )
        value = params.pop(name)
        out[name] = list(value) if isinstance(value, list | tuple) else [int(value)] * n
    return out or None


def segment_together(
    images: Sequence[Any], jobs: Sequence[tuple[Segmenter, Mapping[str, Any]]]
) -> list[list[SegmentationResult]]:
    """Segment ``images`` for every ``(segmenter, params)`` job, sharing what can be shared:
    jobs on the same loaded model, input size and crop get one preprocessing and one feature
    pass per distinct pass key (the union of their requests, as a sweep in ``run.py``).

    Returns:
        per job, one :class:`SegmentationResult` per image.
    """
    from .data.transforms import to_original_size
    from .features import merge_requests

    images = list(images)
    if not images:
        return [[] for _ in jobs]
    out: list[list[SegmentationResult] | None] = [None] * len(jobs)
    groups: dict[tuple, list[int]] = {}
    for k, (seg, _) in enumerate(jobs):
        groups.setdefault((id(seg.model), seg.image_size, seg.crop), []).append(k)
    for members in groups.values():
        first = jobs[members[0]][0]
        t0 = time.perf_counter()
        batch, shown = first.prepare(images)
        t_load = time.perf_counter() - t0
        built = []
        for k in members:
            seg, params = jobs[k][0], dict(jobs[k][1])
            hints = _hints(params, seg.hints, len(images))
            built.append((k, seg, params, hints, seg.method(**params)))
        requests = [m.feature_request() for *_, m in built]
        t0 = time.perf_counter()
        batch = batch.to(first.model.device)  # a shared model may live elsewhere
        features = {p.pass_key: first.model.extract(batch, p) for p in merge_requests(requests)}
        t_features = time.perf_counter() - t0
        for (k, seg, _params, hints, method), req in zip(built, requests, strict=True):
            t0 = time.perf_counter()
            preds = method.segment(features[req.pass_key], seg.resolution, hints).cpu()
            t_method = time.perf_counter() - t0
            results = []
            for pred, rgb in zip(preds, shown, strict=True):
                t1 = time.perf_counter()
                labels = to_original_size(pred.numpy(), rgb.shape[:2], seg.crop)
                timings = {
                    "load": t_load,
                    "features": t_features,
                    "method": t_method,
                    "to_photo": time.perf_counter() - t1,
                }
                results.append(
                    SegmentationResult(
                        labels=labels,
                        image=rgb,
                        method=seg.name,
                        backbone=seg.backbone_name,
                        random_weights=seg.random_weights,
                        crop=seg.crop,
                        params=dict(jobs[k][1]),
                        timings={key: round(v, 4) for key, v in timings.items()},
                        settings=method.describe() if hasattr(method, "describe") else {},
                    )
                )
            out[k] = results
    return out  # type: ignore[return-value]
