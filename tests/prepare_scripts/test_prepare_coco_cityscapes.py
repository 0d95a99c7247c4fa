"""The dataset preparation scripts in datasets/, on fixture archives in the official layouts."""

from __future__ import annotations

import functools
import hashlib
import http.server
import importlib.util
import json
import socket
import struct
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

import diffseg
from diffseg.data import Cityscapes27, CocoStuff27
from diffseg.testing import fakedata

REPO = Path(diffseg.__file__).resolve().parents[1]


def load_script(name: str):
    path = REPO / "datasets" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def coco_script():
    return load_script("prepare_cocostuff")


@pytest.fixture(scope="module")
def city_script():
    return load_script("prepare_cityscapes")


@pytest.fixture(scope="module")
def coco_src(tmp_path_factory):
    """A fixture COCO-Stuff dataset of 5 images, its two official-layout archives and a list
    of 3 of its ids."""
    base = tmp_path_factory.mktemp("cocosrc")
    ids = fakedata.write_cocostuff(
        base / "src", n=5, sizes=[(30, 40), (40, 30), (32, 32), (30, 40), (25, 50)]
    )
    fakedata.write_coco_archives(base / "src", base / "archives")
    return {
        "src": base / "src",
        "archives": base / "archives",
        "ids": ids,
        "ids_file": fakedata.write_id_list(base / "ids.txt", ids[:3]),
    }


def leftovers(root: Path) -> list[Path]:
    """Files under root, and any staging or partial download left behind."""
    return sorted(p for p in root.rglob("*") if p.is_file() or p.name.startswith(".prepare-"))


def same_files(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


# ----------------------------------------------------------------------------- COCO-Stuff


def test_coco_from_archives_unpacks_listed_ids(coco_script, coco_src, tmp_path, capsys):
    root = tmp_path / "cocostuff"
    argv = [
        "--root",
        str(root),
        "--from-archives",
        str(coco_src["archives"]),
        "--ids-file",
        str(coco_src["ids_file"]),
    ]
    assert coco_script.main([*argv, "--no-verify"]) == 0
    assert "ready in" in capsys.readouterr().out
    ids = coco_src["ids"][:3]
    assert sorted(p.stem for p in (root / "images" / "val2017").iterdir()) == ids
    assert sorted(p.stem for p in (root / "annotations" / "val2017").iterdir()) == ids
    for i in ids:
        assert same_files(
            root / "images" / "val2017" / f"{i}.jpg",
            coco_src["src"] / "images" / "val2017" / f"{i}.jpg",
        )
        assert same_files(
            root / "annotations" / "val2017" / f"{i}.png",
            coco_src["src"] / "annotations" / "val2017" / f"{i}.png",
        )
    assert not list(root.glob(".prepare-*"))
    ds = CocoStuff27(root, ids_file=coco_src["ids_file"], image_size=64, label_size=32)
    assert len(ds) == 3 and ds[2]["label"].shape == (32, 32)
    # A rerun finds everything in place.
    assert coco_script.main([*argv, "--no-verify"]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_coco_all_and_curated_default(coco_script, coco_src, tmp_path, capsys):
    root = tmp_path / "c"
    archives = ["--from-archives", str(coco_src["archives"]), "--no-verify"]
    assert coco_script.main(["--root", str(root), "--all", *archives]) == 0
    assert sorted(p.stem for p in (root / "images" / "val2017").iterdir()) == coco_src["ids"]
    assert CocoStuff27(root, curated=False).ids == coco_src["ids"]
    # By default the 2175 curated ids are wanted, and none is in the fixture archive.
    assert coco_script.main(["--root", str(tmp_path / "d"), *archives]) == 1
    err = capsys.readouterr().err
    assert "2175 of 2175 images are not in" in err and "000000000139" in err
    assert not (tmp_path / "d").exists() or not leftovers(tmp_path / "d")


def test_coco_archive_verification(coco_script, coco_src, tmp_path, monkeypatch, capsys):
    archives = coco_src["archives"]
    argv = [
        "--root",
        str(tmp_path / "c"),
        "--from-archives",
        str(archives),
        "--ids-file",
        str(coco_src["ids_file"]),
    ]
    # The real archive's size is known: a fixture archive is refused unless --no-verify.
    assert coco_script.main(argv) == 1
    assert "official val2017.zip is 815585330 bytes" in capsys.readouterr().err
    monkeypatch.setitem(coco_script.KNOWN_ARCHIVES, "stuffthingmaps_trainval2017.zip", {})
    md5 = hashlib.md5((archives / "val2017.zip").read_bytes()).hexdigest()
    size = (archives / "val2017.zip").stat().st_size
    monkeypatch.setitem(
        coco_script.KNOWN_ARCHIVES, "val2017.zip", {"size": size, "md5": "0" * 32, "members": {}}
    )
    assert coco_script.main(argv) == 1
    assert f"has md5 {md5}, the official val2017.zip has {'0' * 32}" in capsys.readouterr().err
    monkeypatch.setitem(
        coco_script.KNOWN_ARCHIVES,
        "val2017.zip",
        {"size": size, "md5": md5, "members": {"val2017": 5}},
    )
    assert coco_script.main(argv) == 0
    monkeypatch.setitem(
        coco_script.KNOWN_ARCHIVES,
        "val2017.zip",
        {"size": size, "md5": md5, "members": {"val2017": 5000}},
    )
    assert coco_script.main([*argv, "--force"]) == 1
    assert "has 5 files in val2017/, the official archive has 5000" in capsys.readouterr().err


def corrupt_member(archive: Path, member: str) -> None:
    """Flip one data byte of a stored member so that its CRC-32 no longer matches."""
    import zipfile

    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo(member)
    data = bytearray(archive.read_bytes())
    name_len, extra_len = struct.unpack(
        "<HH", data[info.header_offset + 26 : info.header_offset + 30]
    )
    data[info.header_offset + 30 + name_len + extra_len + 5] ^= 0xFF
    archive.write_bytes(bytes(data))


def test_coco_damaged_archive_leaves_nothing_half_written(coco_script, coco_src, tmp_path, capsys):
    archives = tmp_path / "archives"
    fakedata.write_coco_archives(coco_src["src"], archives)
    third = coco_src["ids"][2]
    corrupt_member(archives / "stuffthingmaps_trainval2017.zip", f"val2017/{third}.png")
    root = tmp_path / "c"
    argv = [
        "--root",
        str(root),
        "--from-archives",
        str(archives),
        "--ids-file",
        str(coco_src["ids_file"]),
        "--no-verify",
    ]
    assert coco_script.main(argv) == 1
    err = capsys.readouterr().err
    assert f"member val2017/{third}.png is damaged" in err and "Bad CRC-32" in err
    assert leftovers(root) == []  # the images staged before the failure are gone too
    (archives / "val2017.zip").write_bytes(b"PK\x03\x04 not really a zip")
    assert coco_script.main(argv) == 1
    assert "is not a readable zip archive" in capsys.readouterr().err
    missing = ["--root", str(root), "--from-archives", str(tmp_path / "empty"), "--no-verify"]
    assert coco_script.main(missing) == 1
    assert "--from-archives must hold val2017.zip" in capsys.readouterr().err


def test_coco_from_folders(coco_script, coco_src, tmp_path):
    root = tmp_path / "c"
    src = coco_src["src"]
    argv = [
        "--root",
        str(root),
        "--images-dir",
        str(src / "images" / "val2017"),
        "--labels-dir",
        str(src / "annotations" / "val2017"),
        "--ids-file",
        str(coco_src["ids_file"]),
    ]
    assert coco_script.main(argv) == 0
    assert CocoStuff27(root, ids_file=coco_src["ids_file"]).ids == coco_src["ids"][:3]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class _ShortHandler(http.server.BaseHTTPRequestHandler):
    """Promises 100000 bytes, sends 10, closes: a download cut off midway."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        self.wfile.write(b"0123456789")

    def log_message(self, *args):
        pass


def serve(handler):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_coco_download_from_a_server(coco_script, coco_src, tmp_path, capsys):
    server, url = serve(functools.partial(_QuietHandler, directory=str(coco_src["archives"])))
    try:
        root = tmp_path / "c"
        argv = [
            "--root",
            str(root),
            "--ids-file",
            str(coco_src["ids_file"]),
            "--images-url",
            f"{url}/val2017.zip",
            "--labels-url",
            f"{url}/stuffthingmaps_trainval2017.zip",
            "--no-verify",  # not the official files: their known sizes would not match
        ]
        assert coco_script.main(argv) == 0
        out = capsys.readouterr()
        assert (
            f"downloading {url}/val2017.zip" in out.out and "val2017.zip" in out.err
        )  # progress bar
        downloads = root / "downloads"
        assert sorted(p.name for p in downloads.iterdir()) == [
            "stuffthingmaps_trainval2017.zip",
            "val2017.zip",
        ]
        assert same_files(downloads / "val2017.zip", coco_src["archives"] / "val2017.zip")
        assert len(list((root / "images" / "val2017").iterdir())) == 3
        # A second run reuses the downloads; --remove-archives deletes them afterwards.
        assert coco_script.main([*argv, "--force", "--remove-archives"]) == 0
        assert "downloaded earlier" in capsys.readouterr().out
        assert list(downloads.iterdir()) == []
    finally:
        server.shutdown()


def test_coco_download_cut_off(coco_script, coco_src, tmp_path, capsys):
    server, url = serve(_ShortHandler)
    try:
        root = tmp_path / "c"
        argv = [
            "--root",
            str(root),
            "--ids-file",
            str(coco_src["ids_file"]),
            "--images-url",
            f"{url}/val2017.zip",
        ]
        assert coco_script.main(argv) == 1
        assert f"download of {url}/val2017.zip" in capsys.readouterr().err
        assert leftovers(root) == []  # no .part file, no archive
    finally:
        server.shutdown()


def test_coco_offline_message(coco_script, tmp_path, monkeypatch, capsys):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path / "c"
    assert (
        coco_script.main(
            ["--root", str(root), "--images-url", f"http://127.0.0.1:{port}/val2017.zip"]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "looks offline" in err and "--from-archives" in err
    assert leftovers(root) == []

    def no_network(url, timeout=None):
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(urllib.request, "urlopen", no_network)  # every script downloads with it
    assert coco_script.main(["--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert "could not download http://images.cocodataset.org/zips/val2017.zip" in err
    assert "name resolution" in err and coco_script.LABELS_URL in err
    assert "python datasets/prepare_cocostuff.py --root <root> --from-archives <that folder>" in err


def rle(mask: np.ndarray) -> dict:
    enc = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": enc["size"], "counts": enc["counts"].decode("ascii")}


def test_coco_labels_from_json(coco_script, coco_src, tmp_path):
    ids = coco_src["ids"][:2]
    shapes = {ids[0]: (30, 40), ids[1]: (40, 30)}
    images = [
        {"id": k + 1, "file_name": f"{i}.jpg", "height": shapes[i][0], "width": shapes[i][1]}
        for k, i in enumerate(ids)
    ]
    h, w = shapes[ids[0]]
    sky = np.zeros((h, w), bool)
    sky[:10] = True  # stuff 157 "sky-other"
    other = np.zeros((h, w), bool)
    other[20:, :5] = True  # stuff 183 "other": stays unlabelled
    person = np.zeros((h, w), bool)
    person[5:15, 10:20] = True  # thing 1, drawn over the sky
    crowd = np.zeros((h, w), bool)
    crowd[25:, 30:] = True  # thing 3 (car), crowd, uncompressed RLE
    runs, prev, n = [], 0, 0
    for v in crowd.flatten(order="F"):  # uncompressed RLE: alternating run lengths from 0s
        if v != prev:
            runs.append(n)
            prev, n = v, 0
        n += 1
    runs.append(n)
    assert np.array_equal(
        mask_utils.decode(mask_utils.frPyObjects({"size": [h, w], "counts": runs}, h, w)), crowd
    )
    stuff = {
        "images": images,
        "categories": [
            {"id": 157, "name": "sky-other"},
            {"id": 183, "name": "other"},
            {"id": 120, "name": "x"},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 157, "segmentation": rle(sky), "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 183, "segmentation": rle(other), "iscrowd": 0},
            # a polygon on the second image: the square 4..24 x 4..24
            {
                "id": 3,
                "image_id": 2,
                "category_id": 120,
                "segmentation": [[4, 4, 24, 4, 24, 24, 4, 24]],
                "iscrowd": 0,
            },
        ],
    }
    instances = {
        "images": images,
        "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "segmentation": rle(person), "iscrowd": 0},
            {
                "id": 11,
                "image_id": 1,
                "category_id": 3,
                "segmentation": {"size": [h, w], "counts": runs},
                "iscrowd": 1,
            },
        ],
    }
    (tmp_path / "stuff.json").write_text(json.dumps(stuff))
    (tmp_path / "inst.json").write_text(json.dumps(instances))
    root = tmp_path / "c"
    argv = [
        "--root",
        str(root),
        "--images-dir",
        str(coco_src["src"] / "images" / "val2017"),
        "--from-json",
        str(tmp_path / "stuff.json"),
        "--instances-json",
        str(tmp_path / "inst.json"),
        "--ids-file",
        str(fakedata.write_id_list(tmp_path / "ids.txt", ids)),
    ]
    assert coco_script.main(argv) == 0
    label = np.asarray(Image.open(root / "annotations" / "val2017" / f"{ids[0]}.png"))
    expected = np.full((h, w), 255, np.uint8)
    expected[sky] = 156
    expected[person] = 0
    expected[crowd] = 2
    np.testing.assert_array_equal(label, expected)
    second = np.asarray(Image.open(root / "annotations" / "val2017" / f"{ids[1]}.png"))
    assert (
        second.shape == (40, 30)
        and np.all(second[6:22, 6:22] == 119)
        and np.all(second[26:] == 255)
    )
    assert len(CocoStuff27(root, ids=ids)) == 2


def test_coco_json_bad_category(coco_script, coco_src, tmp_path, capsys):
    i = coco_src["ids"][0]
    img = [{"id": 1, "file_name": f"{i}.jpg", "height": 30, "width": 40}]
    bad = {
        "id": 5,
        "image_id": 1,
        "category_id": 7,
        "segmentation": rle(np.ones((30, 40), bool)),
        "iscrowd": 0,
    }
    (tmp_path / "stuff.json").write_text(
        json.dumps({"images": img, "categories": [], "annotations": [bad]})
    )
    (tmp_path / "inst.json").write_text(
        json.dumps({"images": img, "categories": [], "annotations": []})
    )
    argv = [
        "--root",
        str(tmp_path / "c"),
        "--images-dir",
        str(coco_src["src"] / "images" / "val2017"),
        "--from-json",
        str(tmp_path / "stuff.json"),
        "--instances-json",
        str(tmp_path / "inst.json"),
        "--ids-file",
        str(fakedata.write_id_list(tmp_path / "ids.txt", [i])),
    ]
    assert coco_script.main(argv) == 1
    assert "has category 7, outside 92..182" in capsys.readouterr().err
    assert leftovers(tmp_path / "c") == []


# ----------------------------------------------------------------------------- Cityscapes


@pytest.fixture(scope="module")
def city_archives(tmp_path_factory):
    base = tmp_path_factory.mktemp("citysrc")
    ids = fakedata.write_cityscapes(base / "src", n=4, cities=("frankfurt", "lindau", "munster"))
    fakedata.write_cityscapes(base / "src", n=1, split="train", cities=("aachen",))
    fakedata.write_cityscapes_archives(base / "src", base / "archives")
    return base / "archives", ids


def test_cityscapes_from_archives_and_report(
    city_script, city_archives, tmp_path, monkeypatch, capsys
):
    archives, ids = city_archives
    root = tmp_path / "cityscapes"
    # The official val split has 500 images: the fixture is reported incomplete.
    assert city_script.main(["--root", str(root), "--from-archives", str(archives)]) == 1
    out = capsys.readouterr().out
    assert "unpacked 8 files" in out
    assert (
        "frankfurt" in out
        and "(expected 267)" in out
        and "(expected 500)" in out
        and "INCOMPLETE" in out
    )
    assert sorted(p.name for p in (root / "gtFine" / "val").rglob("*") if p.is_file()) == sorted(
        f"{i}_gtFine_labelIds.png" for i in ids
    )  # only the labelIds files, only val
    assert not (root / "leftImg8bit" / "train").exists()
    assert Cityscapes27(root).ids == ids
    monkeypatch.setitem(
        city_script.EXPECTED,
        "val",
        {"total": 4, "cities": {"frankfurt": 2, "lindau": 1, "munster": 1}},
    )
    assert city_script.main(["--root", str(root)]) == 0
    assert "complete." in capsys.readouterr().out
    next((root / "gtFine").rglob("lindau*_labelIds.png")).unlink()
    assert city_script.main(["--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "lindau: 1 images without a label, first:" in out and "--from-archives" in out


def test_cityscapes_all_gt_and_damaged(city_script, city_archives, tmp_path, capsys):
    archives, ids = city_archives
    root = tmp_path / "c"
    city_script.main(["--root", str(root), "--from-archives", str(archives), "--all-gt"])
    assert len(list((root / "gtFine" / "val").rglob("*.png"))) == 3 * len(ids)
    capsys.readouterr()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "leftImg8bit_trainvaltest.zip").write_bytes(
        (archives / "leftImg8bit_trainvaltest.zip").read_bytes()
    )
    (bad / "gtFine_trainvaltest.zip").write_bytes(b"truncated")
    root2 = tmp_path / "c2"
    assert city_script.main(["--root", str(root2), "--from-archives", str(bad)]) == 1
    assert "gtFine_trainvaltest.zip is not a readable archive" in capsys.readouterr().err
    assert leftovers(root2) == []  # images unpacked before the failure are not left behind
    assert city_script.main(["--root", str(root2), "--from-archives", str(tmp_path / "none")]) == 1
    assert "must hold leftImg8bit_trainvaltest.zip" in capsys.readouterr().err


def test_cityscapes_download(city_script, city_archives, tmp_path, monkeypatch, capsys):
    archives, ids = city_archives
    monkeypatch.setattr(city_script.importlib.util, "find_spec", lambda name: None)
    assert city_script.main(["--root", str(tmp_path / "c"), "--download"]) == 1
    err = capsys.readouterr().err
    assert (
        "pip install cityscapesscripts" in err
        and "https://www.cityscapes-dataset.com/downloads/" in err
    )
    calls = []

    def fake_downloader(cmd, check=False):  # stands in for csDownload: writes the two archives
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        for name in ("leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip"):
            (dest / name).write_bytes((archives / name).read_bytes())
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(city_script.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(city_script.subprocess, "run", fake_downloader)
    assert city_script.main(["--root", str(tmp_path / "c"), "--download"]) == 1  # 4 of 500 images
    assert calls[0][1:4] == ["-m", "cityscapesscripts.download.downloader", "-d"]
    assert calls[0][-2:] == ["leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip"]
    assert Cityscapes27(tmp_path / "c").ids == ids


def test_scripts_run_from_the_command_line():
    for name in ("prepare_cocostuff", "prepare_cityscapes"):
        result = subprocess.run(
            [sys.executable, str(REPO / "datasets" / f"{name}.py"), "--help"],
            capture_output=True,
            text=True,
        )
        assert (
            result.returncode == 0
            and "--root" in result.stdout
            and "--from-archives" in result.stdout
        )
