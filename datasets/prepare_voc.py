#!/usr/bin/env python
"""Put Pascal VOC 2012 segmentation in the layout the PascalVOC loader reads.

    <root>/VOC2012/JPEGImages/<id>.jpg
    <root>/VOC2012/SegmentationClass/<id>.png     (palette PNG: 0 background, 1..20, 255 void)
    <root>/VOC2012/ImageSets/Segmentation/{train,val,trainval}.txt

<root> is the VOCdevkit folder (default: $DIFFSEG_DATA/VOCdevkit or datasets/VOCdevkit). The
official archive VOCtrainval_11-May-2012.tar (2 GB) is downloaded from the Oxford server into
<root>/downloads (kept for reruns), or taken from --from-archives DIR. Only the images and
labels of the segmentation split are unpacked (val: 1449 of each).

Examples:
    python datasets/prepare_voc.py
    python datasets/prepare_voc.py --root /data/VOCdevkit --from-archives ~/Downloads
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _archives import (  # noqa: E402
    Archive,
    PrepareError,
    add_common_options,
    check_counts,
    cli,
    get_archive,
    offline_message,
    read_list,
    resolve_paths,
    stage_and_move,
)

ARCHIVE = "VOCtrainval_11-May-2012.tar"
URL = f"http://host.robots.ox.ac.uk/pascal/VOC/voc2012/{ARCHIVE}"
MD5 = "6cd6e144f989b92b3379bac3b3de84fd"
# Files of the official archive, and the size of each segmentation split.
COUNTS = {("JPEGImages", ".jpg"): 17125, ("SegmentationClass", ".png"): 2913}
SPLIT_SIZES = {"train": 1464, "val": 1449, "trainval": 2913}
LISTS = "ImageSets/Segmentation"
COMMAND = "python datasets/prepare_voc.py --root <root>"


def voc_jobs(archive: Archive, ids: Sequence[str]):
    """(relative path, writer) of every file to unpack: the lists, then image and label per id."""
    names = [f"{LISTS}/{s}.txt" for s in SPLIT_SIZES if f"{LISTS}/{s}.txt" in archive.names]
    names += [f"JPEGImages/{i}.jpg" for i in ids] + [f"SegmentationClass/{i}.png" for i in ids]
    for name in names:
        yield f"VOC2012/{name}", lambda tmp, name=name: tmp.write_bytes(archive.read(name))


def run(args: argparse.Namespace) -> int:
    folder = args.root / "VOC2012"
    list_file = folder / LISTS / f"{args.split}.txt"
    if list_file.is_file() and not args.force:
        ids = read_list(list_file.read_text())
        done = all(
            (folder / "JPEGImages" / f"{i}.jpg").is_file()
            and (folder / "SegmentationClass" / f"{i}.png").is_file()
            for i in ids
        )
        if done:
            print(
                f"all {len(ids)} {args.split} images and labels are already in {folder}; nothing to do"
            )
            return 0
    hint = lambda url, reason: offline_message(url, reason, [args.url], COMMAND)  # noqa: E731
    path, fetched = get_archive(
        ARCHIVE, args.url, MD5, args.from_archives, args.download_dir, args.verify, hint
    )
    archive = Archive(path, strip="VOCdevkit/VOC2012/")
    try:
        check_counts(archive, COUNTS, args.verify)
        member = f"{LISTS}/{args.split}.txt"
        if member not in archive.names:
            raise PrepareError(
                f"{path} has no {archive.strip}{member}: not the VOC 2012 trainval archive"
            )
        ids = read_list(archive.read(member).decode())
        if args.verify and len(ids) != SPLIT_SIZES[args.split]:
            raise PrepareError(
                f"{path}: {member} lists {len(ids)} ids, the official one {SPLIT_SIZES[args.split]}"
                " (pass --no-verify for a modified archive)"
            )
        absent = [
            n
            for i in ids
            for n in (f"JPEGImages/{i}.jpg", f"SegmentationClass/{i}.png")
            if n not in archive.names
        ]
        if absent:
            raise PrepareError(
                f"{path} lacks {len(absent)} files of the {args.split} split, first: {absent[0]}"
            )
        stage_and_move(args.root, voc_jobs(archive, ids), total=2 * len(ids) + len(SPLIT_SIZES))
    finally:
        archive.close()
    if args.remove_archives and fetched:
        path.unlink(missing_ok=True)
    print(f"Pascal VOC 2012 {args.split} ready in {folder}: {len(ids)} images and labels")
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_options(
        p,
        "the VOCdevkit folder (default: <data root>/VOCdevkit)",
        f"folder holding {ARCHIVE}",
        "unpack again even if the split is in place",
    )
    p.add_argument("--split", default="val", choices=sorted(SPLIT_SIZES))
    p.add_argument("--url", default=URL, help="a mirror of the archive")
    return resolve_paths(p.parse_args(argv), "VOCdevkit")


def main(argv: Sequence[str] | None = None) -> int:
    return cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
