#!/usr/bin/env python
"""Put Pascal Context (59 classes + background) in the layout the PascalContext loader reads.

    <root>/VOC2010/JPEGImages/<id>.jpg
    <root>/VOC2010/SegmentationClassContext/<id>.png   (0 background, 1..59 the classes)
    <root>/VOC2010/ImageSets/SegmentationContext/<split>.txt

<root> is the VOCdevkit folder (default: $DIFFSEG_DATA/VOCdevkit or datasets/VOCdevkit). Two
archives are needed, downloaded into <root>/downloads (kept for reruns) or taken from
--from-archives DIR:
  * VOCtrainval_03-May-2010.tar (1.3 GB, the VOC2010 images and split lists, Oxford);
  * trainval.tar.gz (31 MB, the Pascal Context annotation, Stanford): one trainval/<id>.mat
    per image whose LabelMap holds the full 459-category labelling (0 = unlabelled).
The labels are converted once: the 59 benchmark categories (in the order of their 459-ids,
read from datasets/pascal_context59_classes.json) become 1..59, every other pixel 0. The split
is VOC2010's ImageSets/Main/<split>.txt (val: 5105 images, train: 4998).

Examples:
    python datasets/prepare_context.py
    python datasets/prepare_context.py --root /data/VOCdevkit --from-archives ~/Downloads
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _archives import (  # noqa: E402
    HERE,
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

VOC_ARCHIVE = "VOCtrainval_03-May-2010.tar"
VOC_URL = f"http://host.robots.ox.ac.uk/pascal/VOC/voc2010/{VOC_ARCHIVE}"
VOC_MD5 = "da459979d0c395079b5c75ee67908abb"
CONTEXT_ARCHIVE = "trainval.tar.gz"
CONTEXT_URL = f"https://www.cs.stanford.edu/~roozbeh/pascal-context/{CONTEXT_ARCHIVE}"
CLASSES_FILE = HERE / "pascal_context59_classes.json"
NUM_CATEGORIES = 459  # of the full annotation; LabelMap values are 0..459
SPLIT_SIZES = {"train": 4998, "val": 5105}
VOC_COUNTS = {("JPEGImages", ".jpg"): 10103}
CONTEXT_COUNTS = {("trainval", ".mat"): 10103}
LABEL_DIR, LIST_DIR = "SegmentationClassContext", "ImageSets/SegmentationContext"
COMMAND = "python datasets/prepare_context.py --root <root>"


def category_lut(classes_file: Path = CLASSES_FILE):
    """(460,) uint8: full-annotation category id -> 1..59 for the benchmark classes, else 0."""
    import numpy as np

    ids = json.loads(classes_file.read_text(encoding="utf-8"))["context459_ids"]
    lut = np.zeros(NUM_CATEGORIES + 1, dtype=np.uint8)
    lut[np.asarray(ids)] = np.arange(1, len(ids) + 1)
    return lut


def convert_mat(data: bytes, name: str, lut) -> bytes:
    """One annotation .mat (its bytes) to the PNG bytes of its 60-label map."""
    import numpy as np
    import scipy.io
    from PIL import Image

    try:
        label_map = np.asarray(scipy.io.loadmat(io.BytesIO(data))["LabelMap"])
    except (ValueError, KeyError, TypeError, OSError) as err:
        raise PrepareError(f"{name} is not a Pascal Context annotation ({err})") from err
    if label_map.ndim != 2 or label_map.dtype.kind not in "iu":
        raise PrepareError(
            f"{name}: LabelMap is {label_map.dtype} {label_map.shape}, not a label map"
        )
    top = int(label_map.max(initial=0))
    if top > NUM_CATEGORIES or int(label_map.min(initial=0)) < 0:
        raise PrepareError(f"{name} holds category {top}, outside 0..{NUM_CATEGORIES}")
    out = io.BytesIO()
    Image.fromarray(lut[label_map]).save(out, format="PNG")
    return out.getvalue()


def context_jobs(voc: Archive, ctx: Archive, ids: Sequence[str], split: str):
    """(relative path, writer): the id list, the images, then the labels in archive order (a
    .tar.gz is read front to back: any other order decompresses it again and again)."""
    lut = category_lut()
    text = "".join(f"{i}\n" for i in ids)
    yield f"VOC2010/{LIST_DIR}/{split}.txt", lambda tmp: tmp.write_text(text)
    for i in ids:
        name = f"JPEGImages/{i}.jpg"
        yield f"VOC2010/{name}", lambda tmp, name=name: tmp.write_bytes(voc.read(name))
    wanted = set(ids)
    for name in ctx.names:
        stem = Path(name).stem
        if name.startswith("trainval/") and name.endswith(".mat") and stem in wanted:
            yield (
                f"VOC2010/{LABEL_DIR}/{stem}.png",
                lambda tmp, name=name: tmp.write_bytes(convert_mat(ctx.read(name), name, lut)),
            )


def run(args: argparse.Namespace) -> int:
    folder = args.root / "VOC2010"
    list_file = folder / LIST_DIR / f"{args.split}.txt"
    if list_file.is_file() and not args.force:
        ids = read_list(list_file.read_text())
        if all(
            (folder / "JPEGImages" / f"{i}.jpg").is_file()
            and (folder / LABEL_DIR / f"{i}.png").is_file()
            for i in ids
        ):
            print(
                f"all {len(ids)} {args.split} images and labels are already in {folder}; nothing to do"
            )
            return 0
    urls = [args.voc_url, args.context_url]
    hint = lambda url, reason: offline_message(url, reason, urls, COMMAND)  # noqa: E731
    got = [
        get_archive(name, url, md5, args.from_archives, args.download_dir, args.verify, hint)
        for name, url, md5 in (
            (VOC_ARCHIVE, args.voc_url, VOC_MD5),
            (CONTEXT_ARCHIVE, args.context_url, None),
        )
    ]
    voc = Archive(got[0][0], strip="VOCdevkit/VOC2010/")
    ctx = Archive(got[1][0])
    try:
        check_counts(voc, VOC_COUNTS, args.verify)
        check_counts(ctx, CONTEXT_COUNTS, args.verify)
        member = f"ImageSets/Main/{args.split}.txt"
        if member not in voc.names:
            raise PrepareError(
                f"{voc.path} has no {voc.strip}{member}: not the VOC2010 trainval archive"
            )
        ids = read_list(voc.read(member).decode())
        if args.verify and len(ids) != SPLIT_SIZES[args.split]:
            raise PrepareError(
                f"{voc.path}: {member} lists {len(ids)} ids, the official one "
                f"{SPLIT_SIZES[args.split]} (pass --no-verify for a modified archive)"
            )
        names = set(voc.names) | set(ctx.names)
        absent = [
            n for i in ids for n in (f"JPEGImages/{i}.jpg", f"trainval/{i}.mat") if n not in names
        ]
        if absent:
            raise PrepareError(
                f"the archives lack {len(absent)} files of the {args.split} split, first: {absent[0]}"
            )
        stage_and_move(args.root, context_jobs(voc, ctx, ids, args.split), total=2 * len(ids) + 1)
    finally:
        voc.close()
        ctx.close()
    if args.remove_archives:
        for path, fetched in got:
            if fetched:
                path.unlink(missing_ok=True)
    print(f"Pascal Context {args.split} ready in {folder}: {len(ids)} images and 60-label PNGs")
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_options(
        p,
        "the VOCdevkit folder (default: <data root>/VOCdevkit)",
        f"folder holding {VOC_ARCHIVE} and {CONTEXT_ARCHIVE}",
        "convert again even if the split is in place",
    )
    p.add_argument("--split", default="val", choices=sorted(SPLIT_SIZES))
    p.add_argument("--voc-url", default=VOC_URL, help="a mirror of the VOC2010 archive")
    p.add_argument("--context-url", default=CONTEXT_URL, help="a mirror of the annotation archive")
    return resolve_paths(p.parse_args(argv), "VOCdevkit")


def main(argv: Sequence[str] | None = None) -> int:
    return cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
