#!/usr/bin/env python
"""Check (and, from the official archives, build) the Cityscapes layout the loader reads.

    <root>/leftImg8bit/val/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    <root>/gtFine/val/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

Cityscapes needs an account (https://www.cityscapes-dataset.com/login/), so nothing is
downloaded without one. Either:
  * download leftImg8bit_trainvaltest.zip (11 GB) and gtFine_trainvaltest.zip (241 MB) from
    https://www.cityscapes-dataset.com/downloads/ and run with --from-archives <folder>: only
    the split's images and *_labelIds.png labels are unpacked (--all-gt for every gtFine file);
  * or, with the optional ``cityscapesscripts`` package and your credentials, --download runs
    its downloader (csDownload) first;
  * or extract the archives yourself into <root> and run without options to check the result.

The script always ends by reporting what is there per city and what is missing (the val split
has 500 images: frankfurt 267, lindau 59, munster 174). Exit status 0 when complete.
Extraction goes through a staging folder, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _archives import Archive, PrepareError, cli, resolve_paths, stage_and_move  # noqa: E402

IMAGES_ARCHIVE = "leftImg8bit_trainvaltest.zip"
LABELS_ARCHIVE = "gtFine_trainvaltest.zip"
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
DOWNLOAD_PAGE = "https://www.cityscapes-dataset.com/downloads/"

#: The official split sizes (images per city where the benchmark uses the split).
EXPECTED: dict[str, dict] = {
    "val": {"total": 500, "cities": {"frankfurt": 267, "lindau": 59, "munster": 174}},
    "train": {"total": 2975, "cities": {}},
    "test": {"total": 1525, "cities": {}},
}


def download_with_cityscapesscripts(dest: Path) -> None:
    """Run cityscapesscripts' downloader (csDownload) for the two archives into ``dest``.

    It asks for the Cityscapes username and password (or uses the credentials it stored)."""
    if importlib.util.find_spec("cityscapesscripts") is None:
        raise PrepareError(
            "--download uses the optional package cityscapesscripts, which is not installed. "
            "Either `pip install cityscapesscripts` and run again (you need a Cityscapes "
            f"account), or download {IMAGES_ARCHIVE} and {LABELS_ARCHIVE} from {DOWNLOAD_PAGE} "
            "after logging in and run this script with --from-archives <folder>."
        )
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "cityscapesscripts.download.downloader",
        "-d",
        str(dest),
        IMAGES_ARCHIVE,
        LABELS_ARCHIVE,
    ]
    print("running:", " ".join(cmd))
    result = subprocess.run(cmd, check=False)
    if result.returncode != 0:
        raise PrepareError(
            f"the cityscapesscripts downloader failed (exit status {result.returncode}); check "
            f"your credentials, or download the archives from {DOWNLOAD_PAGE} by hand"
        )


def wanted_members(archive: Archive, top: str, split: str, suffix: str | None) -> list[str]:
    """Members ``<top>/<split>/<city>/<file>`` (ending in ``suffix`` when given)."""
    out = []
    for name in archive.names:
        parts = PurePosixPath(name).parts
        if len(parts) != 4 or parts[0] != top or parts[1] != split:
            continue
        if suffix is None or name.endswith(suffix):
            out.append(name)
    return sorted(out)


def extract_archives(archives: Path, root: Path, split: str, all_gt: bool) -> int:
    """Unpack the split's images and labels from the two official archives into ``root``
    through a staging folder (:func:`_archives.stage_and_move`). Returns the number of files
    written."""
    jobs = [
        (IMAGES_ARCHIVE, "leftImg8bit", IMAGE_SUFFIX),
        (LABELS_ARCHIVE, "gtFine", None if all_gt else LABEL_SUFFIX),
    ]
    for name, _, _ in jobs:
        if not (archives / name).is_file():
            raise PrepareError(
                f"{archives / name} not found: --from-archives must hold {IMAGES_ARCHIVE} and "
                f"{LABELS_ARCHIVE} (from {DOWNLOAD_PAGE}, login needed)"
            )
    opened = []
    try:
        members = []
        for name, top, suffix in jobs:  # both archives are checked before anything is written
            opened.append(Archive(archives / name))
            found = wanted_members(opened[-1], top, split, suffix)
            if not found:
                raise PrepareError(f"{archives / name} holds no {top}/{split}/<city>/ files")
            members += [(opened[-1], m) for m in found]

        def writers():
            for archive, member in members:
                yield member, lambda tmp, a=archive, m=member: tmp.write_bytes(a.read(m))

        return stage_and_move(root, writers(), total=len(members))
    finally:
        for archive in opened:
            archive.close()


def check_layout(root: Path, split: str) -> tuple[bool, list[str]]:
    """Count images and labels per city. Returns (complete, report lines)."""
    image_dir, label_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    lines = [f"Cityscapes {split} in {root}:"]
    problems = []
    if not image_dir.is_dir():
        problems.append(f"missing folder {image_dir}")
    if not label_dir.is_dir():
        problems.append(f"missing folder {label_dir}")
    expected = EXPECTED.get(split, {"total": None, "cities": {}})
    cities = sorted(p.name for p in image_dir.iterdir() if p.is_dir()) if image_dir.is_dir() else []
    total = 0
    for city in sorted(set(cities) | set(expected["cities"])):
        images = sorted((image_dir / city).glob(f"*{IMAGE_SUFFIX}"))
        missing = [
            label_dir / city / (p.name[: -len(IMAGE_SUFFIX)] + LABEL_SUFFIX)
            for p in images
            if not (label_dir / city / (p.name[: -len(IMAGE_SUFFIX)] + LABEL_SUFFIX)).is_file()
        ]
        total += len(images)
        want = expected["cities"].get(city)
        lines.append(
            f"  {city:<14}{len(images):>5} images {len(images) - len(missing):>5} labels"
            + (f"  (expected {want})" if want is not None else "")
        )
        if want is not None and len(images) != want:
            problems.append(f"{city}: {len(images)} images, expected {want}")
        if missing:
            problems.append(f"{city}: {len(missing)} images without a label, first: {missing[0]}")
    lines.append(
        f"  {'total':<14}{total:>5} images"
        + (f"  (expected {expected['total']})" if expected["total"] else "")
    )
    if expected["total"] and total != expected["total"]:
        problems.append(f"{total} images in total, expected {expected['total']}")
    if problems:
        lines.append("INCOMPLETE:")
        lines += [f"  - {p}" for p in problems]
        lines.append(
            f"Fix: download {IMAGES_ARCHIVE} and {LABELS_ARCHIVE} from {DOWNLOAD_PAGE} (login "
            f"needed), then: python datasets/prepare_cityscapes.py --root {root} --from-archives "
            "<folder with the zips>"
        )
    else:
        lines.append("complete.")
    return not problems, lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--root",
        type=Path,
        default=None,
        help="dataset folder (default: $DIFFSEG_DATA/cityscapes or datasets/cityscapes)",
    )
    p.add_argument("--split", default="val", choices=["val", "train", "test"])
    p.add_argument(
        "--from-archives", type=Path, help=f"folder holding {IMAGES_ARCHIVE} and {LABELS_ARCHIVE}"
    )
    p.add_argument(
        "--download",
        action="store_true",
        help="fetch the archives with cityscapesscripts (csDownload) first; needs an account",
    )
    p.add_argument(
        "--download-dir",
        type=Path,
        help="where --download puts the archives (default: <root>/downloads)",
    )
    p.add_argument(
        "--all-gt",
        action="store_true",
        help="unpack every gtFine file of the split, not only *_labelIds.png",
    )
    args = p.parse_args(argv)
    if args.download and args.from_archives is not None:
        p.error("--download and --from-archives both give the archives: pick one")
    return resolve_paths(args, "cityscapes")


def run(args: argparse.Namespace) -> int:
    archives = args.from_archives
    if args.download:
        download_with_cityscapesscripts(args.download_dir)
        archives = args.download_dir
    if archives is not None:
        n = extract_archives(archives, args.root, args.split, args.all_gt)
        print(f"unpacked {n} files into {args.root}")
    complete, lines = check_layout(args.root, args.split)
    print("\n".join(lines))
    return 0 if complete else 1


def main(argv: Sequence[str] | None = None) -> int:
    return cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
