"""Datasets: the benchmarks (COCO-Stuff-27, Cityscapes-27, Pascal VOC, Pascal Context,
COCO-Object, ADE20K), a folder of images, and SeeDiff's generated datasets.

Every dataset item is a dict: ``image`` float32 (3, image_size, image_size) in [-1, 1],
``label`` int64 (label_size, label_size) with -1 = ignore (benchmarks only), ``id`` str and
``orig_size`` int64 tensor [H, W]. The default ``DataLoader`` collate batches them.
"""

from __future__ import annotations

from typing import Any

from diffseg.data.ade20k import ADE20K
from diffseg.data.base import IGNORE_INDEX, ImageDataset, LabelledDataset
from diffseg.data.cityscapes import CITYSCAPES27_CLASSES, Cityscapes27
from diffseg.data.coco_object import CocoObject
from diffseg.data.cocostuff import CocoStuff27, load_coco_stuff27_metadata, read_id_list
from diffseg.data.context import PascalContext
from diffseg.data.folder import ImageFolder
from diffseg.data.io import read_image_rgb, read_label
from diffseg.data.paths import DATA_ENV_VAR, default_data_root, metadata_dir
from diffseg.data.synthetic import SyntheticVOC
from diffseg.data.transforms import (
    center_crop_square,
    from_model_range,
    resize_image,
    resize_label,
    to_model_range,
)
from diffseg.data.voc import PascalVOC

#: Dataset names accepted by :func:`build_dataset` (and the runner's ``dataset=`` configs).
DATASETS: dict[str, type[ImageDataset]] = {
    "coco_stuff27": CocoStuff27,
    "cityscapes": Cityscapes27,
    "folder": ImageFolder,
    "voc": PascalVOC,
    "context": PascalContext,
    "coco_object": CocoObject,
    "ade20k": ADE20K,
    "synthetic_voc": SyntheticVOC,
}
_ALIASES = {
    "cocostuff27": "coco_stuff27",
    "coco_stuff": "coco_stuff27",
    "cityscapes27": "cityscapes",
    "pascal_voc": "voc",
    "pascal_context": "context",
    "ade": "ade20k",
}


def build_dataset(name: str, **kwargs: Any) -> ImageDataset:
    """Build a dataset by name: "coco_stuff27", "cityscapes" or "folder".

    ``kwargs`` go to the class (``root``, ``split``, ``image_size``, ``label_size``, ...);
    for "folder", ``root`` is accepted as another name for ``path``.
    """
    key = _ALIASES.get(name, name)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if key == "folder" and "root" in kwargs:
        if kwargs.get("path") is not None:
            raise ValueError("pass path= or root= for the folder dataset, not both")
        kwargs["path"] = kwargs.pop("root")
    return DATASETS[key](**kwargs)


__all__ = [
    "ADE20K",
    "CITYSCAPES27_CLASSES",
    "CocoObject",
    "PascalContext",
    "PascalVOC",
    "SyntheticVOC",
    "DATASETS",
    "DATA_ENV_VAR",
    "IGNORE_INDEX",
    "Cityscapes27",
    "CocoStuff27",
    "ImageDataset",
    "ImageFolder",
    "LabelledDataset",
    "build_dataset",
    "center_crop_square",
    "default_data_root",
    "from_model_range",
    "load_coco_stuff27_metadata",
    "metadata_dir",
    "read_id_list",
    "read_image_rgb",
    "read_label",
    "resize_image",
    "resize_label",
    "to_model_range",
]
