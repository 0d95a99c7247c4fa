"""A folder of one's own pictures, without labels."""

from __future__ import annotations

from pathlib import Path

from diffseg.data.base import ImageDataset
from diffseg.data.io import IMAGE_EXTENSIONS


def find_images(path: Path) -> list[Path]:
    """Image files (jpg, jpeg, png, webp; any case) under ``path``, nested or flat, sorted by
    relative path. Hidden files and folders (name starting with '.') are left out."""
    files = []
    for p in path.rglob("*"):
        rel = p.relative_to(path)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
            files.append(p)
    return sorted(files, key=lambda p: p.relative_to(path).as_posix())


class ImageFolder(ImageDataset):
    """Every image under a folder (or one image file), preprocessed as the benchmarks.

    Items have ``image`` float32 (3, image_size, image_size) in [-1, 1], ``id`` (the path
    relative to the folder without extension, with '/' separators) and ``orig_size``; no
    ``label``. ``class_names`` is empty and ``num_classes`` 0.

    Args:
        path: a folder (searched recursively) or a single image file.
        image_size: model input side (512).
        label_size: accepted for a uniform interface with the benchmarks; unused.
    """

    name = "folder"

    def __init__(
        self, path: str | Path, image_size: int = 512, label_size: int | None = None
    ) -> None:
        path = Path(path).expanduser()
        if path.is_file():
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise ValueError(f"{path} is not a supported image ({', '.join(IMAGE_EXTENSIONS)})")
            files, root, ids = [path], path.parent, [path.stem]
        elif path.is_dir():
            files, root = find_images(path), path
            if not files:
                raise FileNotFoundError(
                    f"no images ({', '.join(IMAGE_EXTENSIONS)}, any case) found under {path}"
                )
            ids = [f.relative_to(path).with_suffix("").as_posix() for f in files]
            seen: dict[str, Path] = {}
            for i, f in zip(ids, files, strict=True):
                if i in seen:
                    raise ValueError(
                        f"{seen[i]} and {f} would share the id {i!r} (outputs are named by "
                        "id); rename one of them"
                    )
                seen[i] = f
        else:
            raise FileNotFoundError(f"image folder not found: {path}")
        super().__init__(ids, files, image_size=image_size, root=root)
        self.label_size = label_size

    def load_label(self, index: int):
        raise TypeError(f"ImageFolder({self.root}) has no labels")
