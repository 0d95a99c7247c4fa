"""Every method validates its parameters when built, and owns its per-dataset / per-backbone
defaults (issue 20 item 2; issue 17 item 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from diffseg import DiffCut, DiffSeg, KMeansSegmentor
from diffseg.engine.settings import build_settings
from diffseg.errors import ConfigError
from diffseg.methods import Method, MethodContext, ParameterError
from diffseg.methods.diffcut import DiffCutAutoSC

REPO = Path(__file__).resolve().parents[2]


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: DiffCut(tau=-1), "tau=-1 is invalid: it must be a number >= 0"),
        (lambda: DiffCut(alpha=-5), "alpha=-5 is invalid: it must be a number > 0"),
        (lambda: DiffCut(mask_size=0), "mask_size=0 is invalid: it must be an integer >= 1"),
        (lambda: DiffCut(num_thresholds=2.5), "num_thresholds=2.5 is invalid: it must be an int"),
        (lambda: DiffCut(pamr_dilations=[]), r"pamr_dilations=\[\] is invalid: it needs at least"),
        (lambda: DiffCut(pamr_dilations=[1, 0]), "pamr_dilations=0 is invalid: it must be an int"),
        (lambda: DiffCut(timestep=5000), "timestep=5000 is invalid: it must be an integer >= 0"),
        (lambda: DiffCutAutoSC(alphas=[1, -2]), "alphas=-2 is invalid: it must be a number > 0"),
        (lambda: DiffSeg(kl_threshold="abc"), "kl_threshold='abc' is invalid: it must be a num"),
        (lambda: DiffSeg(kl_threshold=[1.1, "x"]), "kl_threshold='x' is invalid"),
        (lambda: DiffSeg(num_iterations=0), "num_iterations=0 is invalid"),
        (lambda: DiffSeg(min_prob=2.0), "min_prob=2.0 is invalid: it must be a number > 0 and < 1"),
        (lambda: KMeansSegmentor(num_clusters=0), "num_clusters=0 is invalid"),
        (lambda: KMeansSegmentor(tol=-1.0), "tol=-1.0 is invalid: it must be a number >= 0"),
    ],
)
def test_bad_parameters_name_key_value_and_range(build, message):
    with pytest.raises(ParameterError, match=message):
        build()


def test_every_method_is_a_method_and_takes_valid_values():
    for method in (DiffSeg(kl_threshold=1), DiffCut(tau=0, alpha=0.5), KMeansSegmentor(1)):
        assert isinstance(method, Method)
    assert DiffSeg(kl_threshold=1).thresholds == [1.0, 1.0, 1.0]


def test_methods_own_their_defaults_per_dataset_and_backbone(tmp_path):
    sd = MethodContext(dataset="coco_stuff27", backbone="sd14", backbone_family="sd")
    xl = MethodContext(dataset="cityscapes", backbone="ssd1b", backbone_family="sdxl")
    assert DiffSeg.defaults(sd) == {"kl_threshold": 1.1}
    assert DiffSeg.defaults(xl) == {"kl_threshold": 0.9}
    assert DiffCut.defaults(sd) == {"tau": 0.2} and DiffCut.defaults(xl) == {"tau": 0.5}
    # through the configs: null in the method config = the method's default for the context
    diffseg_cfg = dict(compose_cfg("dataset=cityscapes").method)
    assert diffseg_cfg["kl_threshold"] is None
    (setting,) = build_settings(diffseg_cfg, {}, [], tmp_path, xl)
    assert setting.method.thresholds == [0.9] * 3
    (setting,) = build_settings(diffseg_cfg, {}, [], tmp_path, sd)
    assert setting.method.thresholds == [1.1] * 3
    # an explicit value always wins, and so does a sweep value
    explicit = {**diffseg_cfg, "kl_threshold": 1.0}
    assert build_settings(explicit, {}, [], tmp_path, xl)[0].method.thresholds == [1.0] * 3
    diffcut_cfg = dict(compose_cfg("method=diffcut").method)
    swept = build_settings(diffcut_cfg, {"tau": [0.3, 0.7]}, [], tmp_path, sd)
    assert [s.method.tau for s in swept] == [0.3, 0.7]
    assert build_settings(diffcut_cfg, {}, [], tmp_path, sd)[0].method.tau == 0.2
    assert build_settings(diffcut_cfg, {}, [], tmp_path, xl)[0].method.tau == 0.5


def test_a_bad_value_in_a_config_is_a_config_error(tmp_path):
    cfg = dict(compose_cfg("method=diffcut", "method.alpha=-5").method)
    with pytest.raises(ConfigError, match="alpha=-5 is invalid: it must be a number > 0"):
        build_settings(cfg, {}, [], tmp_path, MethodContext())
    cfg = dict(compose_cfg("method.kl_threshold=abc").method)
    with pytest.raises(ConfigError, match="kl_threshold='abc' is invalid"):
        build_settings(cfg, {}, [], tmp_path, MethodContext())


def test_protocol_group_follows_the_method_and_can_be_swapped():
    cfg = compose_cfg("method=diffcut", "dataset=voc")
    assert (cfg.resolution, cfg.image_size, cfg.preprocessing, cfg.dtype) == (
        128, 1024, "diffcut", "auto")  # fmt: skip
    assert cfg.backbone.name == "ssd1b" and "resolution" not in cfg.method
    cfg = compose_cfg("protocol=diffseg", "method=diffcut")
    assert (cfg.resolution, cfg.image_size, cfg.preprocessing, cfg.backbone.name) == (
        512, None, "diffseg", "sd14")  # fmt: skip
    cfg = compose_cfg("method=diffcut", "resolution=64", "backbone=sd14")  # the user wins
    assert cfg.resolution == 64 and cfg.backbone.name == "sd14" and cfg.image_size == 1024
    cfg = compose_cfg("experiment=diffcut_sd14")
    assert cfg.backbone.name == "sd14" and cfg.method.tau == 0.2 and cfg.resolution == 128


def test_cli_bad_method_value_is_one_error_line_and_exit_2(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(REPO / "run.py"), "method=diffcut", "backbone=tiny", "logger=none",
         "dataset=folder", f"dataset.path={tmp_path}", "method.tau=-1",
         f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "tau=-1" in errors[0] and ">= 0" in errors[0]
    assert not run_dir.exists()  # refused before the run dir was claimed
