"""prepare_voc.py, prepare_context.py and prepare_ade20k.py on fixture archives in the official
layouts, and offline."""

from __future__ import annotations

import functools
import http.server
import importlib.util
import json
import socket
import subprocess
import sys
import threading
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

import diffseg
from diffseg.data.ade20k import ADE20K
from diffseg.data.context import PascalContext
from diffseg.data.voc import PascalVOC
from diffseg.testing import fakedata_diffcut as fx

REPO = Path(diffseg.__file__).resolve().parents[1]


def load_script(name: str):
    path = REPO / "datasets" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def files_under(root: Path) -> list[str]:
    """Every file and leftover staging folder under root, relative."""
    if not root.exists():
        return []
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() or p.name.startswith(".prepare-")
    )


def no_network(url, timeout=None):
    raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


# ----------------------------------------------------------------------------- VOC


@pytest.fixture(scope="module")
def voc_archive(tmp_path_factory):
    base = tmp_path_factory.mktemp("vocsrc")
    ids = fx.write_voc(base / "src" / "VOCdevkit")
    archive = fx.pack_tar(
        base / "archives" / "VOCtrainval_11-May-2012.tar", base / "src", ["VOCdevkit"]
    )
    return {"src": base / "src" / "VOCdevkit" / "VOC2012", "dir": archive.parent, "ids": ids}


def test_voc_from_archives(voc_archive, tmp_path, capsys):
    script = load_script("prepare_voc")
    root = tmp_path / "VOCdevkit"
    argv = ["--root", str(root), "--from-archives", str(voc_archive["dir"])]
    assert script.main([*argv, "--no-verify"]) == 0
    assert "ready in" in capsys.readouterr().out
    ids = voc_archive["ids"]
    expected = [
        "VOC2012/ImageSets/Segmentation/" + s for s in ("train.txt", "trainval.txt", "val.txt")
    ]
    expected += [f"VOC2012/JPEGImages/{i}.jpg" for i in ids]
    expected += [f"VOC2012/SegmentationClass/{i}.png" for i in ids]
    assert files_under(root) == sorted(expected)  # the split only: no stray image
    for name in expected:
        assert (root / name).read_bytes() == (voc_archive["src"].parent / name).read_bytes()
    assert PascalVOC(root, label_size=8).ids == ids
    assert script.main([*argv, "--no-verify"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    # Verified: the fixture is not the official archive, and the message says so.
    assert script.main([*argv, "--force"]) == 1
    err = capsys.readouterr().err
    assert "the official VOCtrainval_11-May-2012.tar has 6cd6e144" in err and "--no-verify" in err


def test_voc_damaged_archive_writes_nothing(voc_archive, tmp_path, capsys):
    script = load_script("prepare_voc")
    broken = tmp_path / "archives" / "VOCtrainval_11-May-2012.tar"
    broken.parent.mkdir()
    data = (voc_archive["dir"] / broken.name).read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    root = tmp_path / "VOCdevkit"
    code = script.main(["--root", str(root), "--from-archives", str(broken.parent), "--no-verify"])
    assert code == 1
    assert "error:" in capsys.readouterr().err
    assert files_under(root) == []


def test_voc_offline_message(tmp_path, monkeypatch, capsys):
    script = load_script("prepare_voc")
    monkeypatch.setattr("urllib.request.urlopen", no_network)
    root = tmp_path / "VOCdevkit"
    assert script.main(["--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert (
        "could not download http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
        in err
    )
    assert "looks offline" in err and "name resolution" in err
    assert "python datasets/prepare_voc.py --root <root> --from-archives <that folder>" in err
    assert files_under(root) == []


# ----------------------------------------------------------------------------- Pascal Context


@pytest.fixture(scope="module")
def context_archives(tmp_path_factory):
    base = tmp_path_factory.mktemp("ctxsrc")
    maps = fx.write_context_sources(base / "src")
    out = base / "archives"
    fx.pack_tar(out / "VOCtrainval_03-May-2010.tar", base / "src", ["VOCdevkit"])
    fx.pack_tar(out / "trainval.tar.gz", base / "src", ["trainval", "labels.txt"], gzip=True)
    return {"dir": out, "maps": maps, "src": base / "src"}


def test_context_conversion(context_archives, tmp_path, capsys):
    script = load_script("prepare_context")
    root = tmp_path / "VOCdevkit"
    argv = ["--root", str(root), "--from-archives", str(context_archives["dir"]), "--no-verify"]
    assert script.main(argv) == 0
    assert "ready in" in capsys.readouterr().out
    ids = list(context_archives["maps"])[:-1]  # the val list
    folder = root / "VOC2010"
    assert (folder / "ImageSets" / "SegmentationContext" / "val.txt").read_text().split() == ids
    table = json.loads((REPO / "datasets" / "pascal_context59_classes.json").read_text())
    benchmark = table["context459_ids"]
    for image_id in ids:
        full = context_archives["maps"][image_id]
        want = np.zeros(full.shape, np.uint8)
        for k, category in enumerate(benchmark):
            want[full == category] = k + 1
        with Image.open(folder / "SegmentationClassContext" / f"{image_id}.png") as img:
            got = np.array(img)
        np.testing.assert_array_equal(got, want)
        assert {0, benchmark.index(284) + 1} <= set(np.unique(got).tolist())
    ds = PascalContext(root, label_size=8)
    assert ds.ids == ids and ds.load_label(0).max() <= 59
    assert not (folder / "JPEGImages" / f"{list(context_archives['maps'])[-1]}.jpg").exists()


def test_context_bad_category_is_named(context_archives, tmp_path, capsys):
    script = load_script("prepare_context")
    src = tmp_path / "src"
    first = next(iter(context_archives["maps"]))
    (src / "trainval").mkdir(parents=True)
    for image_id, label in context_archives["maps"].items():
        label = label.copy()
        if image_id == first:
            label[2, 2] = 460
        scipy.io.savemat(src / "trainval" / f"{image_id}.mat", {"LabelMap": label})
    out = tmp_path / "archives"
    fx.pack_tar(out / "trainval.tar.gz", src, ["trainval"], gzip=True)
    (out / "VOCtrainval_03-May-2010.tar").symlink_to(
        context_archives["dir"] / "VOCtrainval_03-May-2010.tar"
    )
    root = tmp_path / "VOCdevkit"
    assert script.main(["--root", str(root), "--from-archives", str(out), "--no-verify"]) == 1
    err = capsys.readouterr().err
    assert f"trainval/{first}.mat holds category 460, outside 0..459" in err
    assert files_under(root) == []


def test_context_missing_archive_and_offline(context_archives, tmp_path, monkeypatch, capsys):
    script = load_script("prepare_context")
    only_voc = tmp_path / "only_voc"
    only_voc.mkdir()
    (only_voc / "VOCtrainval_03-May-2010.tar").symlink_to(
        context_archives["dir"] / "VOCtrainval_03-May-2010.tar"
    )
    root = tmp_path / "VOCdevkit"
    assert script.main(["--root", str(root), "--from-archives", str(only_voc), "--no-verify"]) == 1
    err = capsys.readouterr().err
    assert "trainval.tar.gz not found: --from-archives must hold trainval.tar.gz" in err
    assert "https://www.cs.stanford.edu/~roozbeh/pascal-context/trainval.tar.gz" in err
    monkeypatch.setattr("urllib.request.urlopen", no_network)
    assert script.main(["--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert "could not download http://host.robots.ox.ac.uk/pascal/VOC/voc2010/" in err
    assert "pascal-context/trainval.tar.gz" in err and "--from-archives <that folder>" in err
    assert files_under(root) == []


# ----------------------------------------------------------------------------- ADE20K


@pytest.fixture(scope="module")
def ade_archive(tmp_path_factory):
    base = tmp_path_factory.mktemp("adesrc")
    ids = fx.write_ade20k(base / "src" / "ADEChallengeData2016")
    fx.write_ade20k(base / "src" / "ADEChallengeData2016", sizes=[(20, 20)], folder="training")
    archive = fx.pack_zip(
        base / "archives" / "ADEChallengeData2016.zip", base / "src", "ADEChallengeData2016"
    )
    return {"dir": archive.parent, "ids": ids, "src": base / "src" / "ADEChallengeData2016"}


def test_ade20k_download_from_a_server(ade_archive, tmp_path, capsys):
    script = load_script("prepare_ade20k")
    handler = functools.partial(_Quiet, directory=str(ade_archive["dir"]))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/ADEChallengeData2016.zip"
    try:
        root = tmp_path / "ADEChallengeData2016"
        argv = ["--root", str(root), "--url", url, "--no-verify"]
        assert script.main(argv) == 0
        out = capsys.readouterr()
        assert f"downloading {url}" in out.out and "ADEChallengeData2016.zip" in out.err  # progress
        ids = ade_archive["ids"]
        assert sorted(p.stem for p in (root / "images" / "validation").iterdir()) == ids
        assert not (root / "images" / "training").exists()
        for i in ids:
            name = f"annotations/validation/{i}.png"
            assert (root / name).read_bytes() == (ade_archive["src"] / name).read_bytes()
        assert (root / "objectInfo150.txt").is_file()
        assert ADE20K(root, label_size=8).ids == ids
        assert script.main([*argv, "--force", "--remove-archives"]) == 0
        assert "downloaded earlier" in capsys.readouterr().out
        assert list((root / "downloads").iterdir()) == []
    finally:
        server.shutdown()


def test_ade20k_counts_checked_and_offline(ade_archive, tmp_path, monkeypatch, capsys):
    script = load_script("prepare_ade20k")
    monkeypatch.setattr(script, "MD5", None)  # reach the member counts
    root = tmp_path / "ADEChallengeData2016"
    assert script.main(["--root", str(root), "--from-archives", str(ade_archive["dir"])]) == 1
    err = capsys.readouterr().err
    assert (
        "has 3 .jpg files in ADEChallengeData2016/images/validation/, the official archive has 2000"
        in err
    )
    monkeypatch.setattr("urllib.request.urlopen", no_network)
    assert script.main(["--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert (
        "could not download http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
        in err
    )
    assert files_under(root) == []


def test_scripts_run_from_the_command_line():
    for name in ("prepare_voc", "prepare_context", "prepare_ade20k"):
        result = subprocess.run(
            [sys.executable, str(REPO / "datasets" / f"{name}.py"), "--help"],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0 and "--from-archives" in result.stdout, result.stderr
