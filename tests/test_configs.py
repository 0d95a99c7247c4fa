"""Every config file composes into the real config, and what it names can be built offline.

Walks ``configs/``: each dataset, method, backbone, logger and experiment file (and Hydra's own
settings) is composed with ``configs/config.yaml`` as ``python run.py <group>=<name>`` would.
Methods are instantiated and checked against the method contract on synthetic features; datasets
are built on fixture data; backbones with hub weights fail with the offline message.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_object

from diffseg.backbones import BACKBONES, WeightsNotFoundError
from diffseg.engine.config import check_config, plain
from diffseg.engine.settings import instantiate_method, with_defaults
from diffseg.errors import ConfigError
from diffseg.features import FeatureRequest, Features
from diffseg.methods import Method, MethodContext
from diffseg.tasks.build import (
    build_backbone_from_config,
    build_dataset_from_config,
    is_random_config,
    native_image_size,
)
from diffseg.testing import fakedata, fakedata_diffcut, synthetic_attention

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
GROUPS = ("dataset", "method", "protocol", "backbone", "logger", "experiment", "hydra/launcher")


def names(group: str) -> list[str]:
    folder = CONFIGS / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def compose_cfg(*overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra)


@contextmanager
def hydra_config(cfg):
    """Hydra's global config set as during a run (``${hydra:...}`` resolves)."""
    HydraConfig.instance().set_config(cfg)
    try:
        yield
    finally:
        HydraConfig.instance().cfg = None


ALL_CHOICES = [(g, n) for g in GROUPS for n in names(g)]


def test_the_walk_sees_every_group():
    found = {g for g, _ in ALL_CHOICES}
    assert {"dataset", "method", "protocol", "backbone", "logger", "experiment"} <= found
    top = {p.name for p in CONFIGS.iterdir() if p.is_dir()}
    groups = {"dataset", "method", "protocol", "backbone", "logger", "experiment", "hydra"}
    assert top <= groups, top


@pytest.mark.parametrize(("group", "name"), ALL_CHOICES, ids=[f"{g}={n}" for g, n in ALL_CHOICES])
def test_every_config_composes(group, name):
    override = f"hydra/launcher={name}" if group == "hydra/launcher" else f"{group}={name}"
    cfg = compose_cfg(override, hydra=True)
    assert cfg.hydra.runtime.choices[group] == name
    with hydra_config(cfg):  # every interpolation resolves, the run and sweep dirs included
        for key in cfg:
            if key != "hydra":
                plain(cfg[key])
        run_dir, sweep_dir = str(cfg.hydra.run.dir), str(cfg.hydra.sweep.dir)
    assert run_dir.startswith(f"outputs/{cfg.dataset.name}/") and sweep_dir.startswith("multirun/")
    for key in ("dataset", "method", "backbone"):
        get_object(cfg[key]["_target_"])  # the class or function exists


def test_main_config_and_hydra_settings_resolve():
    cfg = compose_cfg("method=kmeans_c", "resolution=320", hydra=True)
    assert cfg.hydra.job.chdir is False
    assert "dataset.root" in cfg.hydra.job.config.override_dirname.exclude_keys
    with hydra_config(cfg):
        run_dir = str(cfg.hydra.run.dir)
    assert run_dir.startswith("outputs/coco_stuff27/kmeans_c_320/")
    knobs = check_config(compose_cfg("dataset=folder", "dataset.path=/x", "device=cpu"))
    assert knobs.resolution == 512 and knobs.limit is None


# ---- methods ---------------------------------------------------------------------------------

METHODS = names("method")


@pytest.fixture(scope="module")
def synthetic_batch():
    """Two images of block regions as self-attention on three grids, plus the model input."""
    labels = torch.stack(
        [synthetic_attention.block_labels(2, 3, 32), synthetic_attention.block_labels(3, 2, 32)]
    )
    maps = synthetic_attention.make_maps(labels, 6.0, resolutions=(32, 16, 8), noise=0.1)
    return labels, maps


def synthetic_features(request: FeatureRequest, labels: torch.Tensor, maps) -> Features:
    """Features shaped as a backbone returns them, holding what ``request`` asks for."""
    batch, size = labels.shape[0], labels.shape[-1]
    grids = sorted(maps, reverse=True)
    sa = request.self_attention
    if sa is not None and sa != "all":
        grids = [g for g in grids if g in sa] or grids
    self_attention = {g: maps[g] for g in grids} if sa is not None else {}
    g = torch.Generator().manual_seed(0)
    onehot = torch.nn.functional.one_hot(labels.reshape(batch, -1), 8).float()
    modules = {
        name: torch.cat([onehot * 4, torch.randn(batch, size * size, 24, generator=g)], -1)
        for name in request.modules
    }
    tokens = tuple(request.cross_attention)
    cross = {r: torch.rand(batch, r * r, len(tokens), generator=g) for r in (32, 16)}
    # MM-DiT requests: image -> text probabilities of the blocks, image tokens on a 16 x 16 grid
    joint = {k: torch.rand(batch, 256, len(request.joint_tokens), generator=g) / 500
             for k in request.joint_blocks}  # fmt: skip
    blocks = {k: torch.rand(batch, 256, 256, generator=g) / 300 for k in request.joint_blocks}
    return Features(
        self_attention=self_attention,
        cross_attention=cross if tokens else {},
        tokens=tokens,
        modules=modules,
        images=torch.rand(batch, 3, 128, 128, generator=g) * 2 - 1,
        timestep=request.timestep,
        noise_seed=request.noise_seed,
        prompt=request.prompt,
        joint_text=joint,
        joint_image=blocks if request.joint_image else {},
        joint_tokens=request.joint_tokens,
    )


@pytest.mark.parametrize("name", METHODS)
def test_every_method_meets_the_contract(name, synthetic_batch):
    labels, maps = synthetic_batch
    params = with_defaults(plain(compose_cfg(f"method={name}").method), MethodContext())
    method = instantiate_method(params)
    assert isinstance(method, Method)
    request = method.feature_request()
    assert isinstance(request, FeatureRequest) and not request.is_empty()
    assert isinstance(method.name, str) and method.name
    desc = method.describe()
    assert isinstance(desc, dict) and desc["name"] == method.name
    features = synthetic_features(request, labels, maps)
    hints = {"num_classes": [6, 6]} if "num_classes" in method.hints else None
    out = method.segment(features, 32, hints)
    assert out.shape == (2, 32, 32) and out.dtype == torch.int64
    assert int(out.min()) >= 0
    with pytest.raises(ValueError, match="bogus"):
        method.segment(features, 32, {**(hints or {}), "bogus": 1})


def test_methods_include_the_registered_ones():
    assert {"diffseg", "kmeans_c", "kmeans_s"} <= set(METHODS)


def test_bad_method_parameters_are_config_errors():
    params = with_defaults(plain(compose_cfg("method=diffseg").method), MethodContext())
    with pytest.raises(ConfigError, match="num_points=0 is invalid: it must be an integer >= 1"):
        instantiate_method({**params, "num_points": 0})
    with pytest.raises(ConfigError, match="_target_"):
        instantiate_method({k: v for k, v in params.items() if k != "_target_"})


# ---- backbones -------------------------------------------------------------------------------

BACKBONE_CONFIGS = names("backbone")
OFFLINE_MESSAGE = "the Hugging Face Hub cannot be reached (HF_HUB_OFFLINE or no network)"


@pytest.mark.parametrize("name", BACKBONE_CONFIGS)
def test_backbone_configs_name_registered_backbones(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bb = plain(compose_cfg(f"backbone={name}").backbone)
    assert bb["name"] in BACKBONES, bb["name"]
    spec = BACKBONES[bb["name"]]
    if not bb.get("random_config"):
        assert native_image_size(bb) == spec.image_size
    if is_random_config(bb):
        assert spec.model_id is None or bb.get("random_config")
        return  # random weights: built in the engine tests (tiny), too big to build here (sd14)
    knobs = check_config(compose_cfg(f"backbone={name}", "device=cpu"))
    with pytest.raises(ConfigError) as info:
        build_backbone_from_config(bb, knobs)
    cause = info.value.__cause__
    assert isinstance(cause, WeightsNotFoundError), repr(cause)
    assert spec.model_id in str(info.value) and OFFLINE_MESSAGE in str(info.value)
    assert "backbone=tiny" in str(info.value)  # the offline alternative is named


# ---- datasets --------------------------------------------------------------------------------


def _coco(tmp: Path) -> list[str]:
    fakedata.write_cocostuff(tmp, n=2, size=(24, 32))
    return [f"dataset.root={tmp}", "dataset.curated=false"]


def _cityscapes(tmp: Path) -> list[str]:
    fakedata.write_cityscapes(tmp, n=2, size=(16, 32))
    return [f"dataset.root={tmp}"]


def _folder(tmp: Path) -> list[str]:
    fakedata.write_image_folder(tmp, size=(20, 28))
    return [f"dataset.path={tmp}"]


def _voc(tmp: Path) -> list[str]:
    fakedata_diffcut.write_voc(tmp / "VOCdevkit")
    return [f"dataset.root={tmp / 'VOCdevkit'}"]


def _context(tmp: Path) -> list[str]:
    fakedata_diffcut.write_context(tmp / "VOCdevkit")
    return [f"dataset.root={tmp}"]


def _ade20k(tmp: Path) -> list[str]:
    fakedata_diffcut.write_ade20k(tmp / "ADEChallengeData2016")
    return [f"dataset.root={tmp}"]


def _coco_object(tmp: Path) -> list[str]:
    fakedata_diffcut.write_coco_object(tmp)
    return [f"dataset.root={tmp}", "dataset.curated=false"]


FIXTURES = {
    "coco_stuff27": _coco,
    "cityscapes": _cityscapes,
    "folder": _folder,
    "voc": _voc,
    "context": _context,
    "ade20k": _ade20k,
    "coco_object": _coco_object,
}


@pytest.mark.parametrize("name", names("dataset"))
def test_dataset_configs_build_on_fixture_data(name, tmp_path):
    if name not in FIXTURES:
        pytest.skip(f"no fixture writer for dataset={name} (it composes: see above)")
    overrides = FIXTURES[name](tmp_path)
    cfg = compose_cfg(f"dataset={name}", *overrides)
    ds = build_dataset_from_config(plain(cfg.dataset), 64, 32, "diffseg")
    assert len(ds) > 0 and ds.name == cfg.dataset.name
    item = ds[0]
    assert item["image"].shape == (3, 64, 64) and item["id"] == ds.ids[0]
    if ds.has_labels:
        assert item["label"].shape == (32, 32) and item["label"].dtype == torch.int64
        assert len(ds.class_names) == ds.num_classes > 0
        assert int(item["label"].max()) < ds.num_classes


def test_every_dataset_config_has_a_fixture():
    """A new dataset config should get a fixture writer above."""
    assert set(names("dataset")) <= set(FIXTURES)
