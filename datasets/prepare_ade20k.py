#!/usr/bin/env python
"""Put ADE20K (the ADEChallengeData2016 scene parsing benchmark) in the layout the ADE20K loader reads.

    <root>/images/validation/ADE_val_<n>.jpg
    <root>/annotations/validation/ADE_val_<n>.png     (0 other, 1..150 the classes)

<root> is the ADEChallengeData2016 folder (default: $DIFFSEG_DATA/ADEChallengeData2016 or
datasets/ADEChallengeData2016). The official ADEChallengeData2016.zip (about 0.9 GB) is downloaded
from MIT into <root>/downloads (kept for reruns), or taken from --from-archives DIR. Only the
split asked for is unpacked (validation: 2000 images and annotations).

Examples:
    python datasets/prepare_ade20k.py
    python datasets/prepare_ade20k.py --root /data/ADEChallengeData2016 --from-archives ~/Downloads
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _archives import (  # noqa: E402
    Archive,
    PrepareError,
    add_common_options,
    check_counts,
    cli,
    get_archive,
    offline_message,
    resolve_paths,
    stage_and_move,
)

ARCHIVE = "ADEChallengeData2016.zip"
URL = f"http://data.csail.mit.edu/places/ADEchallenge/{ARCHIVE}"
MD5 = "7328b3957e407ddae1d3cbf487f149ef"
SPLIT_SIZES = {"validation": 2000, "training": 20210}
EXTRA_FILES = ("objectInfo150.txt", "sceneCategories.txt")  # small; kept when present
COMMAND = "python datasets/prepare_ade20k.py --root <root>"


def split_ids(archive: Archive, folder: str) -> list[str]:
    """Ids of the split's images, sorted; each must have its annotation in the archive."""
    names = set(archive.names)
    ids = sorted(
        PurePosixPath(n).stem
        for n in names
        if n.startswith(f"images/{folder}/") and n.endswith(".jpg")
    )
    if not ids:
        raise PrepareError(
            f"{archive.path} has no {archive.strip}images/{folder}/*.jpg: not the ADE20K archive"
        )
    absent = [i for i in ids if f"annotations/{folder}/{i}.png" not in names]
    if absent:
        raise PrepareError(
            f"{archive.path} lacks {len(absent)} annotations of images/{folder}, first: "
            f"annotations/{folder}/{absent[0]}.png"
        )
    return ids


def ade_jobs(archive: Archive, folder: str, ids: Sequence[str]):
    """(relative path, writer) of every file to unpack."""
    names = [n for n in EXTRA_FILES if n in archive.names]
    names += [f"images/{folder}/{i}.jpg" for i in ids] + [
        f"annotations/{folder}/{i}.png" for i in ids
    ]
    for name in names:
        yield name, lambda tmp, name=name: tmp.write_bytes(archive.read(name))


def run(args: argparse.Namespace) -> int:
    folder = {"val": "validation", "train": "training"}[args.split]
    image_dir, label_dir = args.root / "images" / folder, args.root / "annotations" / folder
    if image_dir.is_dir() and not args.force:
        ids = sorted(p.stem for p in image_dir.glob("*.jpg"))
        if len(ids) == SPLIT_SIZES[folder] and all((label_dir / f"{i}.png").is_file() for i in ids):
            print(
                f"all {len(ids)} {folder} images and annotations are already in {args.root}; nothing to do"
            )
            return 0
    hint = lambda url, reason: offline_message(url, reason, [args.url], COMMAND)  # noqa: E731
    path, fetched = get_archive(
        ARCHIVE, args.url, MD5, args.from_archives, args.download_dir, args.verify, hint
    )
    archive = Archive(path, strip="ADEChallengeData2016/")
    try:
        counts = {
            (f"{kind}/{s}", ext): n
            for s, n in SPLIT_SIZES.items()
            for kind, ext in (("images", ".jpg"), ("annotations", ".png"))
        }
        check_counts(archive, counts, args.verify)
        ids = split_ids(archive, folder)
        total = len(ids) * 2 + len(EXTRA_FILES)
        stage_and_move(args.root, ade_jobs(archive, folder, ids), total=total)
    finally:
        archive.close()
    if args.remove_archives and fetched:
        path.unlink(missing_ok=True)
    print(
        f"ADE20K {folder} ready in {args.root}: {len(ids)} images and annotations\n  {image_dir}\n  {label_dir}"
    )
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_options(
        p,
        "the ADEChallengeData2016 folder (default: under the data root)",
        f"folder holding {ARCHIVE}",
        "unpack again even if the split is in place",
    )
    p.add_argument("--split", default="val", choices=["val", "train"])
    p.add_argument("--url", default=URL, help="a mirror of the archive")
    return resolve_paths(p.parse_args(argv), "ADEChallengeData2016")


def main(argv: Sequence[str] | None = None) -> int:
    return cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
