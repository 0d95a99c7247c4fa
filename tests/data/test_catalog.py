"""The dataset catalog: one entry per dataset, in agreement with its config, its prepare script
and its loader; the shared id and file logic of the base class."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from diffseg.data import CATALOG, DATASETS, Cityscapes27, build_dataset, dataset_info
from diffseg.data.base import choose_ids, read_id_list, require_files
from diffseg.data.catalog import DatasetInfo, register
from diffseg.data.paths import metadata_file
from diffseg.testing import fakedata

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "dataset"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "datasets" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _target(path: str):
    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_each_config_is_a_catalog_entry(config):
    cfg = yaml.safe_load(config.read_text())
    info = dataset_info(cfg["name"])
    assert info.name == cfg["name"] == config.stem
    assert _target(cfg["_target_"]) is info.loader
    for key, value in info.protocol.items():  # the config holds the catalog's defaults
        assert cfg.get(key) == value, (config.name, key)


def test_every_dataset_but_the_generated_one_has_a_config():
    configs = {p.stem for p in CONFIGS.glob("*.yaml")}
    assert set(CATALOG) - configs == {"synthetic_voc"}
    assert DATASETS == {name: info.loader for name, info in CATALOG.items()}


def test_official_sizes_agree_with_the_prepare_scripts():
    city = _script("prepare_cityscapes").EXPECTED
    assert dict(dataset_info("cityscapes").official_sizes) == {
        split: sizes["total"] for split, sizes in city.items()
    }
    assert dict(dataset_info("voc").official_sizes) == _script("prepare_voc").SPLIT_SIZES
    assert dict(dataset_info("context").official_sizes) == _script("prepare_context").SPLIT_SIZES
    assert dict(dataset_info("ade20k").official_sizes) == _script("prepare_ade20k").SPLIT_SIZES
    curated = len(read_id_list(metadata_file("coco_stuff27_val_curated.txt")))
    for name in ("coco_stuff27", "coco_object"):
        assert dict(dataset_info(name).official_sizes) == {"val": curated}


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_entries_describe_their_dataset(name, tmp_path):
    info = CATALOG[name]
    assert info.loader.info is info and dataset_info(info.name) is info
    for alias in info.aliases:
        assert dataset_info(alias) is info
    if info.labelled and info.official_sizes:
        classes = info.classes()
        assert len(classes) == len(set(classes)) > 1
        if info.background_index is not None:
            assert info.background_index == len(classes) - 1
    help_text = info.layout_help(tmp_path / "data")
    assert str(tmp_path / "data") in help_text
    if info.prepare:
        assert "{root}" not in info.prepare_command("/d") and "/d" in info.prepare_command("/d")


def test_a_name_cannot_be_registered_twice():
    with pytest.raises(ValueError, match="'cityscapes27' is already used by 'cityscapes'"):
        register(DatasetInfo(name="other", aliases=("cityscapes27",)))(type("X", (), {}))
    assert "other" not in CATALOG
    with pytest.raises(ValueError, match="unknown dataset 'nope'; choose one of"):
        dataset_info("nope")


def test_choose_ids_and_require_files(tmp_path):
    listed = fakedata.write_id_list(tmp_path / "ids.txt", ["b", "a"])
    assert choose_ids(None, None, lambda: ["x", "y"]) == (["x", "y"], False)
    assert choose_ids(["1", 2], None, lambda: pytest.fail("not called")) == (["1", "2"], True)
    assert choose_ids(None, listed, lambda: []) == (["b", "a"], True)
    with pytest.raises(ValueError, match="pass ids= or ids_file=, not both"):
        choose_ids(["a"], listed, list)
    with pytest.raises(ValueError, match="no image ids given"):
        choose_ids([], None, list)
    (tmp_path / "here.png").touch()
    require_files([tmp_path / "here.png"], "files", "fix it.")
    with pytest.raises(FileNotFoundError, match=r"1 of the 2 files are missing, .* skipped: fix"):
        require_files([tmp_path / "here.png", tmp_path / "gone.png"], "files", "fix it.")


def test_default_root_comes_from_the_catalog_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFSEG_DATA", str(tmp_path))
    fakedata.write_cityscapes(tmp_path / "cityscapes", n=2)
    ds = build_dataset("cityscapes")
    assert ds.root == tmp_path / "cityscapes" and isinstance(ds, Cityscapes27)
    assert ds.benchmark_coverage()["images_expected"] == 500


def test_the_datasets_readme_shows_the_catalog():
    from diffseg.data.catalog import catalog_table

    assert catalog_table() in (REPO / "datasets" / "README.md").read_text(encoding="utf-8")
