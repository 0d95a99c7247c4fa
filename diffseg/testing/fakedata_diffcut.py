"""Small fixture datasets for the background benchmarks, in their official on-disk formats.

Pascal VOC 2012 (palette PNGs with void borders), Pascal Context (the prepared 60-label PNGs,
and the sources the prepare script converts: VOC2010 images and 459-category ``.mat``
annotations), ADE20K (8-bit PNGs, 0 = other) and COCO-Object (COCO-Stuff stuffthingmaps holding
only values that real files hold). Ids look like the real ones; every image's colours follow
its labels plus noise. ``pack_tar`` / ``pack_zip`` build the official archives from them.
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from diffseg.data.voc_writer import voc_palette  # the VOC devkit's colour map

VOC_VOID = 255
VOC_IDS = ("2007_000033", "2007_000042", "2007_000061", "2007_000123")
CONTEXT_IDS = ("2008_000002", "2008_000003", "2008_000007")
# Some of the 59 benchmark categories of the full Pascal Context annotation, and some others.
CONTEXT_BENCHMARK_IDS = (2, 9, 284, 458)
CONTEXT_OTHER_IDS = (1, 3, 400, 459)
# COCO thing values without a COCO-Object class (unused category ids - 1).
COCO_UNUSED_THING_VALUES = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)


def blocks(
    rng: np.random.Generator,
    size: tuple[int, int],
    values: Sequence[int],
    border: int | None = None,
) -> np.ndarray:
    """(H, W) integer map: a first value with 2 to 4 rectangles of other values, optionally
    outlined with ``border`` (VOC's void)."""
    h, w = size
    label = np.full((h, w), values[0], dtype=np.int64)
    for _ in range(int(rng.integers(2, 5))):
        y0, x0 = int(rng.integers(0, h - 2)), int(rng.integers(0, w - 2))
        y1, x1 = int(rng.integers(y0 + 2, h + 1)), int(rng.integers(x0 + 2, w + 1))
        if border is not None:
            label[y0:y1, x0:x1] = border
            y0, x0, y1, x1 = y0 + 1, x0 + 1, max(y0 + 1, y1 - 1), max(x0 + 1, x1 - 1)
        label[y0:y1, x0:x1] = rng.choice(values)
    return label


def _photo(label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    colours = np.random.default_rng(7).integers(20, 236, size=(int(label.max()) + 1, 3))
    return np.clip(colours[label] + rng.normal(0, 8, (*label.shape, 3)), 0, 255).astype(np.uint8)


def _save_image(path: Path, label: np.ndarray, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_photo(label, rng)).save(path, quality=95)


def _save_png(path: Path, label: np.ndarray, palette: list[int] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(label.astype(np.uint8))
    if palette is not None:
        img.putpalette(palette)  # an L image becomes P: the stored indices are the values
    img.save(path)


def _write_list(path: Path, ids: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids))


def write_voc(
    devkit: str | Path,
    sizes: Sequence[tuple[int, int]] = ((30, 40), (40, 28), (33, 33)),
    seed: int = 0,
) -> list[str]:
    """``devkit/VOC2012`` with one palette PNG (0 background, 1..20, 255 void borders) and one
    JPEG per id, the segmentation lists (val = these ids; train = one more id whose files exist
    too) and a stray JPEG outside every list.

    Returns:
        the val ids, in list order.
    """
    folder, rng = Path(devkit) / "VOC2012", np.random.default_rng(seed)
    ids = list(VOC_IDS[: len(sizes)])
    extra = VOC_IDS[len(sizes)]
    for image_id, size in zip([*ids, extra], [*sizes, (20, 20)], strict=True):
        label = blocks(
            rng, size, [0, *rng.choice(np.arange(1, 21), 3, replace=False)], border=VOC_VOID
        )
        _save_image(
            folder / "JPEGImages" / f"{image_id}.jpg", np.where(label == VOC_VOID, 21, label), rng
        )
        _save_png(folder / "SegmentationClass" / f"{image_id}.png", label, voc_palette())
    _save_image(folder / "JPEGImages" / "2012_004331.jpg", np.zeros((8, 8), np.int64), rng)
    lists = folder / "ImageSets" / "Segmentation"
    _write_list(lists / "val.txt", ids)
    _write_list(lists / "train.txt", [extra])
    _write_list(lists / "trainval.txt", sorted([*ids, extra]))
    return ids


def write_context(
    devkit: str | Path, sizes: Sequence[tuple[int, int]] = ((30, 40), (36, 24)), seed: int = 0
) -> list[str]:
    """``devkit/VOC2010`` as the prepare script leaves it: JPEGs, 60-label PNGs (0..59) and
    ``ImageSets/SegmentationContext/val.txt``. Returns the ids."""
    folder, rng = Path(devkit) / "VOC2010", np.random.default_rng(seed)
    ids = list(CONTEXT_IDS[: len(sizes)])
    for image_id, size in zip(ids, sizes, strict=True):
        label = blocks(rng, size, [0, *rng.choice(np.arange(1, 60), 3, replace=False), 59])
        _save_image(folder / "JPEGImages" / f"{image_id}.jpg", label, rng)
        _save_png(folder / "SegmentationClassContext" / f"{image_id}.png", label)
    _write_list(folder / "ImageSets" / "SegmentationContext" / "val.txt", ids)
    return ids


def write_context_sources(
    base: str | Path,
    sizes: Sequence[tuple[int, int]] = ((30, 40), (36, 24), (20, 20)),
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """What the official Pascal Context archives hold, unpacked under ``base``:
    ``VOCdevkit/VOC2010/{JPEGImages, ImageSets/Main/{train,val}.txt}`` (val = all ids but the
    last, train = the last) and ``trainval/<id>.mat`` (LabelMap, uint16, full 459-category
    ids: benchmark ones, others and 0) plus ``labels.txt``.

    Returns:
        id -> its LabelMap.
    """
    base, rng = Path(base), np.random.default_rng(seed)
    folder = base / "VOCdevkit" / "VOC2010"
    ids = list(CONTEXT_IDS[: len(sizes)])
    maps = {}
    for image_id, size in zip(ids, sizes, strict=True):
        values = [0, *CONTEXT_BENCHMARK_IDS, *CONTEXT_OTHER_IDS]
        label = blocks(rng, size, [int(v) for v in rng.permutation(values)[:5]]).astype(np.uint16)
        label[0, 0] = 284  # every map holds a benchmark class
        maps[image_id] = label
        _save_image(folder / "JPEGImages" / f"{image_id}.jpg", label.astype(np.int64) % 50, rng)
        (base / "trainval").mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(base / "trainval" / f"{image_id}.mat", {"LabelMap": label})
    _write_list(folder / "ImageSets" / "Main" / "val.txt", ids[:-1])
    _write_list(folder / "ImageSets" / "Main" / "train.txt", ids[-1:])
    (base / "labels.txt").write_text("1: accordion\n2: aeroplane\n")
    return maps


def write_ade20k(
    root: str | Path,
    sizes: Sequence[tuple[int, int]] = ((30, 40), (40, 30), (32, 32)),
    seed: int = 0,
    folder: str = "validation",
) -> list[str]:
    """``root/images/<folder>/ADE_val_<n>.jpg`` and ``root/annotations/<folder>/<id>.png``
    (8-bit, 0 other, 1..150). Returns the ids, sorted."""
    root, rng = Path(root), np.random.default_rng(seed)
    prefix = "ADE_val_" if folder == "validation" else "ADE_train_"
    ids = [f"{prefix}{k + 1:08d}" for k in range(len(sizes))]
    for image_id, size in zip(ids, sizes, strict=True):
        label = blocks(rng, size, [0, 1, 150, *rng.choice(np.arange(2, 150), 2, replace=False)])
        label[-3:, -3:] = 150  # the last class, in every map
        _save_image(root / "images" / folder / f"{image_id}.jpg", label, rng)
        _save_png(root / "annotations" / folder / f"{image_id}.png", label)
    (root / "objectInfo150.txt").write_text(
        "Idx\tRatio\tTrain\tVal\tName\n1\t0.1576\t11664\t1172\twall\n"
    )
    return ids


def write_coco_object(
    root: str | Path, sizes: Sequence[tuple[int, int]] = ((30, 40), (40, 30)), seed: int = 0
) -> list[str]:
    """The COCO-Stuff layout (``images/val2017``, ``annotations/val2017``) with labels that
    hold only real stuffthingmaps values: things with a class, stuff (91..181) and 255."""
    root, rng = Path(root), np.random.default_rng(seed)
    things = [v for v in range(91) if v not in COCO_UNUSED_THING_VALUES]
    ids = [f"{910000 + k:012d}" for k in range(len(sizes))]
    for image_id, size in zip(ids, sizes, strict=True):
        values = [255, 0, 89, 91, 181, *rng.choice(things, 2, replace=False)]
        label = blocks(rng, size, [int(v) for v in values])
        _save_image(root / "images" / "val2017" / f"{image_id}.jpg", label, rng)
        _save_png(root / "annotations" / "val2017" / f"{image_id}.png", label)
    return ids


def pack_tar(
    archive: str | Path, base: str | Path, members: Sequence[str | Path], gzip: bool = False
) -> Path:
    """A tar (``gzip``: .tar.gz) of the files ``members`` (relative to ``base``; folders are
    added with everything under them), named relative to ``base`` as the official ones."""
    archive, base = Path(archive), Path(base)
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz" if gzip else "w") as tf:
        for member in members:
            tf.add(base / member, arcname=str(member))
    return archive


def pack_zip(archive: str | Path, base: str | Path, folder: str) -> Path:
    """A zip of everything under ``base/folder``, folders listed as members as real archives
    do, names relative to ``base``."""
    archive, base = Path(archive), Path(base)
    archive.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zf:
        for path in sorted((base / folder).rglob("*")):
            name = path.relative_to(base).as_posix()
            zf.writestr(name + "/", "") if path.is_dir() else zf.write(path, name)
    return archive


def png_bytes(label: np.ndarray) -> bytes:
    """The bytes of an 8-bit PNG of ``label`` (to damage or compare archive members)."""
    out = io.BytesIO()
    Image.fromarray(label.astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()
