#!/usr/bin/env python
"""Put COCO-Stuff (images + stuffthingmaps labels) in the layout the COCO-Stuff-27 loader reads.

    <root>/images/val2017/<id>.jpg
    <root>/annotations/val2017/<id>.png     (value = COCO category id - 1, 255 = unlabelled)

Sources, in order of preference:
  * download (default): val2017.zip from cocodataset.org and stuffthingmaps_trainval2017.zip from
    the COCO-Stuff authors, kept in --download-dir so a rerun does not fetch them again;
  * --from-archives DIR: the same two archives, already downloaded;
  * --images-dir / --labels-dir: folders already extracted (<id>.jpg / <id>.png);
  * --from-json stuff_val2017.json --instances-json instances_val2017.json: render the label
    PNGs from the COCO-Stuff JSON annotations with pycocotools.

Only the 2175 curated ids of the benchmark are unpacked unless --all (the whole split) or
--ids-file is given. Files are written to a staging folder under <root> and moved into place
once every one is complete, so a failure leaves nothing half-written.

Examples:
    python datasets/prepare_cocostuff.py
    python datasets/prepare_cocostuff.py --root /data/cocostuff --from-archives ~/Downloads
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path, PurePosixPath

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _archives import PrepareError, download, file_md5  # noqa: E402  (one copy for every script)

CURATED_VAL_FILE = HERE / "coco_stuff27_val_curated.txt"

IMAGES_URL = "http://images.cocodataset.org/zips/{folder}.zip"
LABELS_URL = (
    "http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/"
    "stuffthingmaps_trainval2017.zip"
)
LABELS_ARCHIVE = "stuffthingmaps_trainval2017.zip"

# What is known of the official archives: byte size and md5 where published, and how many
# files each split folder holds. The stuffthingmaps archive has no published checksum: it is
# checked by its zip structure, the CRC-32 of every member read, and its member counts.
KNOWN_ARCHIVES: dict[str, dict] = {
    "val2017.zip": {
        "size": 815_585_330,
        "md5": "442b8da7639aecaf257c1dceb8ba8c80",
        "members": {"val2017": 5000},
    },
    "train2017.zip": {
        "size": None,
        "md5": "cced6f7f71b7629ddf16f17bbcfab6b2",
        "members": {"train2017": 118_287},
    },
    LABELS_ARCHIVE: {"size": None, "md5": None, "members": {"val2017": 5000, "train2017": 118_287}},
}

# COCO-Stuff category ids: things 1..91, stuff 92..182, 183 = "other" (unlabelled in the PNGs).
MAX_CATEGORY_ID = 182
UNLABELLED = 255


def default_root() -> Path:
    env = os.environ.get("DIFFSEG_DATA", "").strip()
    return (Path(env).expanduser() if env else HERE) / "cocostuff"


# ----------------------------------------------------------------------------- download


def offline_message(url: str, reason: object, archives_hint: str) -> str:
    return (
        f"could not download {url} ({reason}).\n"
        "This machine looks offline, or the server is unreachable. Download the archives on a "
        f"machine with internet access:\n{archives_hint}\n"
        "put them in one folder, then run:\n"
        "  python datasets/prepare_cocostuff.py --root <root> --from-archives <that folder>"
    )


def verify_archive(path: Path, verify: bool, md5: str | None = None) -> zipfile.ZipFile:
    """Open a zip archive after checking what is known of it (size, md5, member counts).

    ``md5`` is the digest if already computed (just downloaded). With ``verify`` False, only
    the zip structure is checked (the CRC of each member read is always checked on reading).
    """
    known = KNOWN_ARCHIVES.get(path.name, {})
    if verify and known.get("size") and path.stat().st_size != known["size"]:
        raise PrepareError(
            f"{path} is {path.stat().st_size} bytes; the official {path.name} is "
            f"{known['size']} bytes (incomplete or different download). Download it again, or "
            "pass --no-verify to use it anyway."
        )
    if verify and known.get("md5"):
        md5 = md5 or file_md5(path)
        if md5 != known["md5"]:
            raise PrepareError(
                f"{path} has md5 {md5}, the official {path.name} has {known['md5']}. Download it "
                "again, or pass --no-verify to use it anyway."
            )
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise PrepareError(
            f"{path} is not a readable zip archive ({err}); it is probably an incomplete download"
        ) from err
    if verify:
        counts: dict[str, int] = {}
        for name in zf.namelist():
            p = PurePosixPath(name)
            if not name.endswith("/"):
                counts[p.parent.name] = counts.get(p.parent.name, 0) + 1
        for folder, expected in known.get("members", {}).items():
            if counts.get(folder, 0) != expected:
                zf.close()
                raise PrepareError(
                    f"{path} has {counts.get(folder, 0)} files in {folder}/, the official archive "
                    f"has {expected}. Download it again, or pass --no-verify to use it anyway."
                )
    return zf


def index_members(zf: zipfile.ZipFile, folder: str, suffix: str) -> dict[str, str]:
    """id -> member name for the files ``.../<folder>/<id><suffix>`` of an archive."""
    index = {}
    for name in zf.namelist():
        p = PurePosixPath(name)
        if p.parent.name == folder and p.suffix.lower() == suffix:
            index[p.stem] = name
    return index


# ----------------------------------------------------------------------------- sources


class Source:
    """Where files ``<id><suffix>`` come from: a zip archive, a folder, or a renderer."""

    def __init__(
        self,
        description: str,
        available: Iterable[str],
        write: Callable[[str, Path], None],
        close: Callable[[], None] = lambda: None,
    ) -> None:
        self.description = description
        self.available = set(available)
        self.write = write
        self.close = close


def archive_source(zf: zipfile.ZipFile, folder: str, suffix: str) -> Source:
    index = index_members(zf, folder, suffix)

    def write(image_id: str, dest: Path) -> None:
        member = index[image_id]
        try:
            with zf.open(member) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise PrepareError(
                f"{zf.filename}: member {member} is damaged ({err}); download the archive again"
            ) from err

    return Source(f"{zf.filename} ({folder}/*{suffix})", index, write, zf.close)


def folder_source(folder: Path, suffix: str) -> Source:
    if not folder.is_dir():
        raise PrepareError(f"folder not found: {folder}")
    files = {p.stem: p for p in folder.iterdir() if p.suffix.lower() == suffix and p.is_file()}
    return Source(
        f"{folder} (*{suffix})",
        files,
        lambda image_id, dest: shutil.copyfile(files[image_id], dest),
    )


def json_source(stuff_json: Path, instances_json: Path) -> Source:
    """Render label PNGs from the COCO-Stuff stuff annotations and the COCO thing annotations.

    Every pixel starts unlabelled (255); stuff masks (categories 92..182) are painted with
    category id - 1, then thing masks (1..91) over them; "other" (183) stays unlabelled. This
    follows the stuffthingmaps convention; the official PNGs remain the reference.
    """
    import numpy as np
    from PIL import Image
    from pycocotools.coco import COCO

    coco = []
    for path in (stuff_json, instances_json):
        if not path.is_file():
            raise PrepareError(f"annotation file not found: {path}")
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
                coco.append(COCO(str(path)))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise PrepareError(f"{path} is not a COCO annotation file ({err})") from err
    stuff, things = coco
    by_stem = {PurePosixPath(im["file_name"]).stem: im for im in stuff.dataset.get("images", [])}

    def write(image_id: str, dest: Path) -> None:
        info = by_stem[image_id]
        label = np.full((info["height"], info["width"]), UNLABELLED, dtype=np.uint8)
        for api, lo, hi in ((stuff, 92, MAX_CATEGORY_ID), (things, 1, 91)):
            for ann in api.loadAnns(api.getAnnIds(imgIds=[info["id"]], iscrowd=None)):
                cat = int(ann["category_id"])
                if cat == MAX_CATEGORY_ID + 1 and api is stuff:
                    continue  # "other": unlabelled in the stuffthingmaps
                if not lo <= cat <= hi:
                    raise PrepareError(
                        f"annotation {ann.get('id')} of image {image_id} has category {cat}, "
                        f"outside {lo}..{hi} expected in that file"
                    )
                mask = api.annToMask(ann).astype(bool)
                if mask.shape != label.shape:
                    raise PrepareError(
                        f"annotation {ann.get('id')} of image {image_id} has a "
                        f"{mask.shape} mask for a {label.shape} image"
                    )
                label[mask] = cat - 1
        Image.fromarray(label).save(dest, format="PNG")

    return Source(f"{stuff_json} + {instances_json}", by_stem, write)


# ----------------------------------------------------------------------------- main


def read_ids(path: Path) -> list[str]:
    if not path.is_file():
        raise PrepareError(f"id list not found: {path}")
    ids = [s.strip() for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]
    if not ids:
        raise PrepareError(f"id list {path} is empty")
    return ids


def archive_path(
    args: argparse.Namespace, name: str, url: str, hint: str
) -> tuple[Path, str | None]:
    """Path of an official archive: from --from-archives, or downloaded into --download-dir
    (then also its md5 when it was downloaded now)."""
    if args.from_archives is not None:
        path = args.from_archives / name
        if not path.is_file():
            raise PrepareError(
                f"{path} not found: --from-archives must hold {name} (download: {url})"
            )
        return path, None
    path = args.download_dir / name
    if path.is_file():
        print(f"using {path} downloaded earlier")
        return path, None
    print(f"downloading {url}")
    known_md5 = KNOWN_ARCHIVES.get(name, {}).get("md5") if url_is_official(url, name) else None
    md5 = download(
        url,
        path,
        lambda reason: offline_message(url, reason, hint),
        known_md5 if args.verify else None,
    )
    return path, md5


def url_is_official(url: str, name: str) -> bool:
    return url.rstrip("/").endswith("/" + name) and (
        "cocodataset.org" in url or "calvin.inf.ed.ac.uk" in url
    )


def stage_and_move(
    ids: Sequence[str], jobs: Sequence[tuple[Source, Path, str]], root: Path
) -> None:
    """Write every (source, final dir, suffix) file of every id into a staging folder under
    ``root``, then move them all into place; on any failure the staging folder is removed."""
    from tqdm import tqdm

    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".prepare-", dir=root))
    try:
        staged = []
        for source, final_dir, suffix in jobs:
            tmp_dir = staging / final_dir.relative_to(root)
            tmp_dir.mkdir(parents=True, exist_ok=True)
            for image_id in tqdm(ids, desc=f"{final_dir.relative_to(root)}", unit="file"):
                tmp = tmp_dir / f"{image_id}{suffix}"
                source.write(image_id, tmp)
                staged.append((tmp, final_dir / tmp.name))
        for _, final in staged:
            final.parent.mkdir(parents=True, exist_ok=True)
        for tmp, final in staged:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--root",
        type=Path,
        default=None,
        help="dataset folder (default: $DIFFSEG_DATA/cocostuff or datasets/cocostuff)",
    )
    p.add_argument("--split", default="val", choices=["val", "train"])
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--all", action="store_true", help="the whole split, not only the curated ids"
    )
    which.add_argument("--ids-file", type=Path, help="a list of ids to prepare, one per line")
    p.add_argument(
        "--from-archives", type=Path, help=f"folder holding <split>2017.zip and {LABELS_ARCHIVE}"
    )
    p.add_argument("--images-dir", type=Path, help="folder of extracted <id>.jpg images")
    p.add_argument("--labels-dir", type=Path, help="folder of extracted stuffthingmaps <id>.png")
    p.add_argument(
        "--from-json",
        type=Path,
        metavar="STUFF_JSON",
        help="render labels from stuff_<split>2017.json",
    )
    p.add_argument(
        "--instances-json", type=Path, help="instances_<split>2017.json (with --from-json)"
    )
    p.add_argument(
        "--download-dir", type=Path, help="where downloads are kept (default: <root>/downloads)"
    )
    p.add_argument(
        "--remove-archives", action="store_true", help="delete downloaded archives afterwards"
    )
    p.add_argument(
        "--no-verify", dest="verify", action="store_false", help="skip size/md5/member-count checks"
    )
    p.add_argument("--force", action="store_true", help="rewrite files that are already in place")
    p.add_argument("--images-url", help="mirror of the images archive (default: cocodataset.org)")
    p.add_argument("--labels-url", default=LABELS_URL, help="mirror of the stuffthingmaps archive")
    args = p.parse_args(argv)
    if args.from_json is not None and args.labels_dir is not None:
        p.error("--from-json and --labels-dir both give labels: pick one")
    if (args.from_json is None) != (args.instances_json is None):
        p.error(
            "--from-json needs --instances-json too (stuff and thing annotations), and vice versa"
        )
    args.root = (args.root or default_root()).expanduser()
    args.download_dir = (args.download_dir or args.root / "downloads").expanduser()
    return args


def run(args: argparse.Namespace) -> int:
    folder = f"{args.split}2017"
    images_url = args.images_url or IMAGES_URL.format(folder=folder)
    hint = f"  {images_url}\n  {args.labels_url}"
    image_dir, label_dir = args.root / "images" / folder, args.root / "annotations" / folder

    if args.ids_file is not None:
        wanted = read_ids(args.ids_file)
    elif args.all:
        wanted = None
    elif args.split == "val":
        wanted = read_ids(CURATED_VAL_FILE)
    else:
        raise PrepareError("the curated list covers val only: use --all or --ids-file for train")

    if wanted is not None and not args.force:
        todo = [
            i
            for i in wanted
            if not ((image_dir / f"{i}.jpg").is_file() and (label_dir / f"{i}.png").is_file())
        ]
        if not todo:
            print(f"all {len(wanted)} images and labels are already in {args.root}; nothing to do")
            return 0

    downloaded: list[Path] = []  # archives in --download-dir (ours to remove), not the user's
    sources: list[Source] = []
    try:
        if args.images_dir is not None:
            images = folder_source(args.images_dir, ".jpg")
        else:
            path, md5 = archive_path(args, f"{folder}.zip", images_url, hint)
            downloaded += [path] if args.from_archives is None else []
            images = archive_source(verify_archive(path, args.verify, md5), folder, ".jpg")
        sources.append(images)
        if args.from_json is not None:
            labels = json_source(args.from_json, args.instances_json)
        elif args.labels_dir is not None:
            labels = folder_source(args.labels_dir, ".png")
        else:
            path, md5 = archive_path(args, LABELS_ARCHIVE, args.labels_url, hint)
            downloaded += [path] if args.from_archives is None else []
            labels = archive_source(verify_archive(path, args.verify, md5), folder, ".png")
        sources.append(labels)

        ids = sorted(images.available) if wanted is None else list(wanted)
        if not ids:
            raise PrepareError(f"no {folder} images found in {images.description}")
        for source, what in ((images, "images"), (labels, "labels")):
            missing = [i for i in ids if i not in source.available]
            if missing:
                raise PrepareError(
                    f"{len(missing)} of {len(ids)} {what} are not in {source.description}, "
                    f"first: {', '.join(missing[:5])}"
                )
        if not args.force:
            ids = [
                i
                for i in ids
                if not ((image_dir / f"{i}.jpg").is_file() and (label_dir / f"{i}.png").is_file())
            ]
        stage_and_move(ids, [(images, image_dir, ".jpg"), (labels, label_dir, ".png")], args.root)
    finally:
        for source in sources:
            source.close()
    if args.remove_archives:
        for path in downloaded:
            path.unlink(missing_ok=True)
    total = len(wanted) if wanted is not None else len(ids)
    print(
        f"COCO-Stuff {folder} ready in {args.root}: {total} images and labels "
        f"({len(ids)} written now)\n  {image_dir}\n  {label_dir}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except PrepareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
