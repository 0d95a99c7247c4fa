"""``diffseg.Segmenter`` on the tiny random backbone: every input type, the crop modes, per-call
parameters against ``run.py``'s label PNGs for the same photo, batches, shared feature passes,
methods picked up from configs/method, and the weights error of ``run.py``.

One tiny model serves every test (passed as ``model=``); inputs are 128 px, predictions 64 px.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from diffseg import Segmenter
from diffseg.errors import ConfigError, DataError
from diffseg.predictor import CONFIG_DIR, available_methods, load_photo, segment_together

SMALL = ["image_size=128", "resolution=64"]


@pytest.fixture(scope="module")
def seg(one_thread):
    return Segmenter("diffseg", backbone="tiny", overrides=SMALL)


@pytest.fixture(scope="module")
def kmeans(seg):
    return Segmenter("kmeans_c", backbone="tiny", overrides=SMALL, model=seg.model)


def _photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth colourful picture (blobs), uint8 (H, W, 3): several segments even at random."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    out = np.zeros((height, width, 3))
    for c in range(3):
        cy, cx = rng.random(2)
        out[..., c] = 127 + 120 * np.sin(6 * ((y - cy) ** 2 + (x - cx) ** 2) ** 0.5 + c)
    return out.round().clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def photo_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("photos") / "wide.png"
    Image.fromarray(_photo(60, 90)).save(path)
    return path


class Counting:
    """Counts the feature passes of a model (and forwards everything else)."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def extract(self, images, request):
        self.calls += 1
        return self.model.extract(images, request)


def test_every_input_type_gives_the_same_labels(seg, kmeans, photo_file):
    rgb = np.array(Image.open(photo_file).convert("RGB"))
    tensor = torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1
    with Image.open(photo_file) as pil:
        results = [seg(src, kl_threshold=1e-4) for src in (photo_file, str(photo_file), pil, rgb)]
    first = results[0]
    assert first.labels.shape == (60, 90) and first.labels.dtype == np.int64
    assert first.random_weights is True and first.num_segments > 1
    np.testing.assert_array_equal(first.image, rgb)
    for other in results[1:]:
        np.testing.assert_array_equal(other.labels, first.labels)
    # a tensor in [-1, 1] differs from the uint8 photo by float rounding (1e-5): compare it
    # with a method that such a difference does not move
    from_tensor = kmeans(tensor, num_clusters=4)
    np.testing.assert_array_equal(from_tensor.image, rgb)
    np.testing.assert_array_equal(from_tensor.labels, kmeans(rgb, num_clusters=4).labels)
    with pytest.raises(DataError, match="uint8"):
        seg(rgb.astype(np.float32))
    with pytest.raises(DataError, match=r"\[-1, 1\]"):
        seg(tensor * 255)
    with pytest.raises(DataError, match="not found"):
        seg(photo_file.with_name("missing.jpg"))


def test_a_corrupt_file_is_a_data_error(seg, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"bad\.jpg.*corrupt"):
        seg(bad)


def test_exif_orientation_is_applied(seg, tmp_path):
    """A phone photo stored sideways (orientation 6: rotate 90 degrees) is segmented upright."""
    stored = Image.fromarray(_photo(40, 70))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    stored.save(path, exif=exif)
    pixels, rgb = load_photo(path)
    assert rgb.shape == (70, 40, 3) and pixels.dtype == np.float32
    assert seg(path).labels.shape == (70, 40)


def test_crop_modes_map_labels_onto_the_whole_photo(seg, photo_file):
    center = seg(photo_file, kl_threshold=1e-4).labels
    assert (center[:, :15] == -1).all() and (center[:, -15:] == -1).all()  # outside the square
    assert (center[:, 15:75] >= 0).all()
    for crop in ("pad", "resize"):
        other = Segmenter("diffseg", "tiny", crop=crop, overrides=SMALL, model=seg.model)
        labels = other(photo_file, kl_threshold=1e-4).labels
        assert labels.shape == (60, 90) and (labels >= 0).all()
    with pytest.raises(
        ConfigError, match="crop='square' is unknown; choose one of center, pad, resize"
    ):
        Segmenter("diffseg", "tiny", crop="square", overrides=SMALL, model=seg.model)


def _run_py_predictions(folder: Path, run_dir: Path, model, *overrides: str) -> Path:
    """``python run.py dataset=folder ... save_predictions=true`` in process, on ``model``."""
    from diffseg.tasks.evaluate import evaluate

    args = ["backbone=tiny", "logger=none", "dataset=folder", f"dataset.path={folder}"]
    args += ["num_workers=0", "save_predictions=true", *SMALL, *overrides]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=args)
    evaluate(cfg, run_dir, backbone=model)
    return run_dir


def _png_labels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        values = np.asarray(img).astype(np.int64)
        fill = img.text.get("diffseg:unsegmented")
    return np.where(values == int(fill), -1, values) if fill else values


def test_per_call_parameters_equal_run_py_settings(seg, kmeans, photo_file, tmp_path):
    """Each per-call setting gives exactly the label PNG of the same run.py sweep setting."""
    folder = photo_file.parent
    run = _run_py_predictions(
        folder, tmp_path / "diffseg", seg.model, "+sweep.kl_threshold=[0.0001,1.1]"
    )
    for value in (0.0001, 1.1):
        ours = seg(photo_file, kl_threshold=value).labels
        theirs = _png_labels(run / f"kl_threshold={value:g}" / "predictions" / "wide.png")
        np.testing.assert_array_equal(ours, theirs)
    run = _run_py_predictions(
        folder, tmp_path / "km", seg.model, "method=kmeans_c", "method.num_clusters=4"
    )
    ours = kmeans(photo_file, num_clusters=4)
    np.testing.assert_array_equal(ours.labels, _png_labels(run / "predictions" / "wide.png"))
    assert ours.num_segments == 4


def test_batch_and_sweep_share_one_feature_pass(seg, kmeans, photo_file):
    """A batch is one pass and gives each photo its own labels. A batched UNet pass on a CPU
    sums in another order than a single one (the features differ by ~1e-8, checked here), and
    random-weight attention is so flat that this moves a few pixels: the labels must agree on
    99% of the photo with the same number of segments."""
    counting = Counting(seg.model)
    km_counted = Segmenter("kmeans_c", "tiny", overrides=SMALL, model=counting)
    others = [_photo(50, 50, seed=1), _photo(80, 40, seed=2)]
    batch = km_counted.batch([photo_file, *others], num_clusters=4)
    assert counting.calls == 1 and len(batch) == 3
    for one, source in zip(batch, [photo_file, *others], strict=True):
        alone = kmeans(source, num_clusters=4)
        assert one.labels.shape == alone.labels.shape == load_photo(source)[1].shape[:2]
        assert one.num_segments == alone.num_segments == 4
        assert (one.labels == alone.labels).mean() > 0.99
    images, _ = kmeans.prepare([photo_file, *others])
    request = kmeans.method().feature_request()
    together = kmeans.model.extract(images, request).self_attention
    single = kmeans.model.extract(images[2:], request).self_attention
    for grid, maps in together.items():
        torch.testing.assert_close(maps[2:], single[grid], atol=1e-6, rtol=0)
    counting.calls = 0
    shared = Segmenter("diffseg", "tiny", overrides=SMALL, model=counting)
    swept = shared.sweep(photo_file, [{"kl_threshold": 1e-4}, {"kl_threshold": 1.1}])
    assert counting.calls == 1 and swept[0].num_segments > swept[1].num_segments
    # two methods on one model and input size: one pass for both (their requests agree)
    km = Segmenter("kmeans_c", "tiny", overrides=SMALL, model=counting)
    both = segment_together([photo_file], [(shared, {}), (km, {"num_clusters": 3})])
    assert counting.calls == 2 and [r[0].method for r in both] == ["diffseg", "kmeans_c"]
    np.testing.assert_array_equal(both[1][0].labels, kmeans(photo_file, num_clusters=3).labels)


def test_results_save_and_overlay(seg, photo_file, tmp_path):
    result = seg(photo_file, kl_threshold=1e-4)
    paths = result.save(tmp_path / "out", "wide")
    with Image.open(paths["labels"]) as img:
        assert img.size == (90, 60) and img.text["diffseg:random_weights"] == "true"
        assert img.text["diffseg:method"] == "diffseg"
        np.testing.assert_array_equal(_png_labels(paths["labels"]), result.labels)
    with Image.open(paths["overlay"]) as img:
        assert img.text["diffseg:random_weights"] == "true"
        top = np.asarray(img.convert("RGB"))[:8]
    assert (top[..., 0] == 160).mean() > 0.5  # the red random-weights caption strip
    overlay = result.overlay()
    assert overlay.size[0] > 3 * 90 and set(result.timings) >= {"features", "method"}


def test_methods_come_from_the_configs(seg, tmp_path, photo_file):
    expected = sorted(p.stem for p in (CONFIG_DIR / "method").glob("*.yaml"))
    assert available_methods() == expected
    assert {"diffseg", "diffcut", "kmeans_c", "kmeans_s", "diffcut_autosc"} <= set(expected)
    configs = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, configs)
    (configs / "method" / "three_means.yaml").write_text(
        "_target_: diffseg.methods.kmeans.KMeansC\nnum_clusters: 3\nseed: ${seed}\n"
    )
    new = Segmenter("three_means", "tiny", overrides=SMALL, model=seg.model, config_dir=configs)
    assert new(photo_file).num_segments == 3
    with pytest.raises(ConfigError, match="method='nope' is unknown; choose one of diffcut"):
        Segmenter("nope", "tiny", model=seg.model)
    with pytest.raises(ConfigError, match="no parameter 'kl'.*kl_threshold"):
        seg(photo_file, kl=1.0)
    with pytest.raises(ConfigError, match="backbone='sd99' is unknown; choose one of"):
        Segmenter("diffseg", "sd99")
    with pytest.raises(ConfigError, match="no_such_key"):
        Segmenter("diffseg", "tiny", overrides=["no_such_key=1"], model=seg.model)


def test_diffcut_and_kmeans_s_run_with_their_protocols(seg, photo_file):
    cut = Segmenter("diffcut", "tiny", overrides=["image_size=128"], model=seg.model)
    assert cut.resolution == 128 and cut.protocol.preprocessing == "diffcut"
    assert cut(photo_file, tau=0.3, refine=False).labels.shape == (60, 90)
    ks = Segmenter("kmeans_s", "tiny", overrides=SMALL, model=seg.model)
    assert ks(photo_file, num_classes=2).num_segments == 2
    with pytest.raises(ConfigError, match="num_classes="):
        ks(photo_file)


def test_missing_weights_is_run_py_s_error(monkeypatch, tmp_path):
    """Offline without weights: the ConfigError that run.py prints, naming the fix."""
    from diffseg.engine.config import check_config, plain
    from diffseg.predictor import compose_config
    from diffseg.tasks.build import build_backbone_from_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ConfigError) as ours:
        Segmenter("diffseg", backbone="sd14")
    cfg = compose_config("diffseg", "sd14")
    with pytest.raises(ConfigError) as theirs:
        build_backbone_from_config(plain(cfg.backbone), check_config(cfg))
    assert str(ours.value) == str(theirs.value)
    assert "backbone=sd14" in str(ours.value) and "backbone=tiny" in str(ours.value)


def test_readme_first_screen_example_runs(seg, tmp_path, monkeypatch):
    """The README's first Python block, on the tiny model instead of SD v1.4."""
    import re

    text = (CONFIG_DIR.parent / "README.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "Segmenter" in b)
    real = 'Segmenter("diffseg")'
    assert real in code, "the README's first example changed; update this test"
    code = code.replace(real, "Segmenter('diffseg', 'tiny', overrides=SMALL, model=model)")
    code = code.replace('"assets/samples/', f'"{CONFIG_DIR.parent / "assets" / "samples"}/')
    monkeypatch.chdir(tmp_path)
    scope = {"SMALL": SMALL, "model": seg.model}
    exec(compile(code, "README.md", "exec"), scope)
    result = scope["result"]
    assert result.labels.shape == (400, 600) and result.random_weights is True
    with Image.open(tmp_path / "coffee_overlay.png") as img:
        assert img.size[0] == 3 * 600 + 8 and img.size[1] > 400  # with the caption strip
