"""Small fixture datasets in the real on-disk formats, for the tests of every module.

``write_cocostuff`` and ``write_cityscapes`` write the layouts the loaders (and the prepare
scripts' outputs) use: JPEG / PNG images and single-channel PNG label maps holding the
datasets' real stored values (COCO-Stuff: 0..181 = category id - 1, 255 unlabelled;
Cityscapes: labelIds 0..33). Labels are a few rectangles; each image colours its regions
after their label, plus noise, so that a segmentation has something to find.

Fixture ids are not curated ids: pass them to the loader (``CocoStuff27(root, ids=ids)``) or
write them to a list with ``write_id_list`` and pass ``ids_file=``.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

COCO_UNLABELLED = 255
CITYSCAPES_CITIES = ("frankfurt", "lindau", "munster")


def _blocky_label(
    rng: np.random.Generator, size: tuple[int, int], values: Sequence[int]
) -> np.ndarray:
    """(H, W) uint8: a background value with 3 to 5 rectangles of other values drawn on it."""
    h, w = size
    label = np.full((h, w), rng.choice(values), dtype=np.uint8)
    for _ in range(int(rng.integers(3, 6))):
        y0, x0 = int(rng.integers(0, h - 1)), int(rng.integers(0, w - 1))
        y1, x1 = int(rng.integers(y0 + 1, h + 1)), int(rng.integers(x0 + 1, w + 1))
        label[y0:y1, x0:x1] = rng.choice(values)
    return label


def _image_for(label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8 whose colour follows the label (one colour per value) plus noise."""
    colours = np.random.default_rng(12345).integers(20, 236, size=(256, 3))
    noise = rng.normal(0.0, 8.0, size=(*label.shape, 3))
    return np.clip(colours[label] + noise, 0, 255).astype(np.uint8)


def _sizes(n: int, size: tuple[int, int], sizes: Sequence[tuple[int, int]] | None) -> list:
    if sizes is None:
        return [tuple(size)] * n
    if len(sizes) != n:
        raise ValueError(f"{len(sizes)} sizes for {n} images")
    return [tuple(s) for s in sizes]


def write_id_list(path: str | Path, ids: Sequence[str]) -> Path:
    """A curated-style id list (one id per line) for ``CocoStuff27(ids_file=...)``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
    return path


def write_cocostuff(
    root: str | Path,
    n: int = 4,
    size: tuple[int, int] = (48, 64),
    seed: int = 0,
    split: str = "val",
    sizes: Sequence[tuple[int, int]] | None = None,
    ids: Sequence[str] | None = None,
) -> list[str]:
    """Write ``root/images/<split>2017/<id>.jpg`` and ``root/annotations/<split>2017/<id>.png``.

    Args:
        size: (H, W) of every image, or ``sizes`` one per image.
        ids: file ids (default: 12-digit zero-padded numbers, like COCO's).

    Returns:
        the ids written, in order.
    """
    root, rng = Path(root), np.random.default_rng(seed)
    folder = f"{split}2017"
    (root / "images" / folder).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / folder).mkdir(parents=True, exist_ok=True)
    ids = list(ids) if ids is not None else [f"{900000 + 1000 * seed + k:012d}" for k in range(n)]
    values = [*range(182), COCO_UNLABELLED]
    for image_id, hw in zip(ids, _sizes(len(ids), size, sizes), strict=True):
        label = _blocky_label(rng, hw, values)
        Image.fromarray(_image_for(label, rng)).save(
            root / "images" / folder / f"{image_id}.jpg", quality=95
        )
        Image.fromarray(label).save(root / "annotations" / folder / f"{image_id}.png")
    return ids


def write_cityscapes(
    root: str | Path,
    n: int = 2,
    size: tuple[int, int] = (32, 64),
    seed: int = 0,
    split: str = "val",
    cities: Sequence[str] = CITYSCAPES_CITIES[:2],
    extras: bool = True,
) -> list[str]:
    """Write ``root/leftImg8bit/<split>/<city>/<id>_leftImg8bit.png`` and
    ``root/gtFine/<split>/<city>/<id>_gtFine_labelIds.png`` (8-bit, labelIds 0..33), images
    spread over ``cities`` in turn. With ``extras``, also the official ``_gtFine_color.png``
    (RGB) and ``_gtFine_instanceIds.png`` (16-bit) files a loader must not pick.

    Returns:
        the ids (``<city>_<seq:06d>_<frame:06d>``), in the loader's order (city, then name).
    """
    root, rng = Path(root), np.random.default_rng(seed)
    ids = []
    for k in range(n):
        city = cities[k % len(cities)]
        image_id = f"{city}_{k:06d}_{19 + seed:06d}"
        img_dir = root / "leftImg8bit" / split / city
        gt_dir = root / "gtFine" / split / city
        img_dir.mkdir(parents=True, exist_ok=True)
        gt_dir.mkdir(parents=True, exist_ok=True)
        label = _blocky_label(rng, tuple(size), list(range(34)))
        Image.fromarray(_image_for(label, rng)).save(img_dir / f"{image_id}_leftImg8bit.png")
        Image.fromarray(label).save(gt_dir / f"{image_id}_gtFine_labelIds.png")
        if extras:
            colour = _image_for(label, np.random.default_rng(0))
            Image.fromarray(colour).save(gt_dir / f"{image_id}_gtFine_color.png")
            inst = label.astype(np.uint16) * 1000
            Image.fromarray(inst).save(gt_dir / f"{image_id}_gtFine_instanceIds.png")
        ids.append(image_id)
    return sorted(ids, key=lambda i: (i.split("_")[0], i))


def write_image_folder(
    root: str | Path, size: tuple[int, int] = (40, 56), seed: int = 0
) -> list[str]:
    """A nested folder of 4 images with mixed extensions and case, plus files to be ignored.

    Returns:
        the ids ImageFolder should find (relative paths without extension), sorted.
    """
    root, rng = Path(root), np.random.default_rng(seed)
    names = ["a.jpg", "b.PNG", "sub/c.jpeg", "sub/deeper/d.webp"]
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        label = _blocky_label(rng, size, list(range(10)))
        fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}[path.suffix.lower()]
        Image.fromarray(_image_for(label, rng)).save(path, format=fmt)
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir(exist_ok=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / ".hidden" / "x.png")
    return sorted(str(Path(n).with_suffix("").as_posix()) for n in names)


def _zip_tree(archive: Path, base: Path, members: Sequence[Path], extra: dict[str, str]) -> Path:
    archive.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zf:
        dirs = sorted({p.parent.relative_to(base).as_posix() + "/" for p in members})
        for d in dirs:  # real archives list their folders as members too
            zf.writestr(d, "")
        for p in sorted(members):
            zf.write(p, p.relative_to(base).as_posix())
        for name, text in extra.items():
            zf.writestr(name, text)
    return archive


def write_coco_archives(
    src_root: str | Path, out_dir: str | Path, split: str = "val"
) -> tuple[Path, Path]:
    """Pack a ``write_cocostuff`` dataset as the official archives: ``<split>2017.zip``
    (members ``<split>2017/<id>.jpg``) and ``stuffthingmaps_trainval2017.zip`` (members
    ``<split>2017/<id>.png``).

    Returns:
        (images archive, labels archive).
    """
    src_root, out_dir, folder = Path(src_root), Path(out_dir), f"{split}2017"
    images = sorted((src_root / "images" / folder).glob("*.jpg"))
    labels = sorted((src_root / "annotations" / folder).glob("*.png"))
    return (
        _zip_tree(out_dir / f"{folder}.zip", src_root / "images", images, {}),
        _zip_tree(
            out_dir / "stuffthingmaps_trainval2017.zip", src_root / "annotations", labels, {}
        ),
    )


def write_cityscapes_archives(src_root: str | Path, out_dir: str | Path) -> tuple[Path, Path]:
    """Pack a ``write_cityscapes`` dataset as ``leftImg8bit_trainvaltest.zip`` (members
    ``leftImg8bit/<split>/<city>/...``) and ``gtFine_trainvaltest.zip`` (``gtFine/...``), each
    with the README and license.txt members of the real archives.

    Returns:
        (images archive, labels archive).
    """
    src_root, out_dir = Path(src_root), Path(out_dir)
    extra = {"README": "fixture", "license.txt": "fixture"}
    return (
        _zip_tree(
            out_dir / "leftImg8bit_trainvaltest.zip",
            src_root,
            sorted((src_root / "leftImg8bit").rglob("*.png")),
            extra,
        ),
        _zip_tree(
            out_dir / "gtFine_trainvaltest.zip",
            src_root,
            sorted((src_root / "gtFine").rglob("*.png")),
            extra,
        ),
    )
