"""Datasets: the benchmarks (COCO-Stuff-27, Cityscapes-27 or -19, Pascal VOC, Pascal Context,
COCO-Object, ADE20K), a folder of images, and SeeDiff's generated datasets (read by
:mod:`.synthetic`, written by :mod:`.voc_writer`; class-list presets in :mod:`.class_lists`).

Each dataset module registers a :class:`~diffseg.data.catalog.DatasetInfo` in the catalog
(:data:`CATALOG`): its names, classes, official size, layout and prepare command. Importing
this package registers the built-in ones; :func:`dataset_info` and :func:`dataset_names` also
import any other module of the package (docs/architecture.md ("How to add a dataset")).

Every dataset item is a dict: ``image`` float32 (3, image_size, image_size) in [-1, 1],
``label`` int64 (label_size, label_size) with -1 = ignore (benchmarks only), ``id`` str and
``orig_size`` int64 tensor [H, W]. With ``preprocessing="seg4diff"`` the label is (h', w'), each
image's own resized size, and ``eval_size`` int64 [h', w'] says it;
:func:`~diffseg.data.collate.collate_items` batches such items (the labels stay a list), and
equals the default ``DataLoader`` collate otherwise.
"""

from __future__ import annotations

from typing import Any

from diffseg.data.ade20k import ADE20K
from diffseg.data.base import IGNORE_INDEX, ImageDataset, LabelledDataset, read_id_list
from diffseg.data.catalog import (
    CATALOG,
    DatasetInfo,
    dataset_info,
    dataset_names,
    load_all,
    register,
)
from diffseg.data.cityscapes import CITYSCAPES19_CLASSES, CITYSCAPES27_CLASSES, Cityscapes27
from diffseg.data.coco_object import CocoObject
from diffseg.data.cocostuff import CocoStuff27, load_coco_stuff27_metadata
from diffseg.data.context import PascalContext
from diffseg.data.folder import ImageFolder
from diffseg.data.io import read_image_rgb, read_label, read_photo
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


def __getattr__(name: str) -> Any:
    # DATASETS is computed on access, so a dataset registered later (a user's own module,
    # docs/architecture.md ("How to add a dataset")) is listed too.
    if name == "DATASETS":
        return {n: info.loader for n, info in load_all().items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_dataset(name: str, **kwargs: Any) -> ImageDataset:
    """Build a dataset by its catalog name or alias ("coco_stuff27", "cityscapes", "folder", ...).

    ``kwargs`` go to the class (``root``, ``split``, ``image_size``, ``label_size``, ...).
    """
    return dataset_info(name).loader(**kwargs)


__all__ = [
    "ADE20K",
    "CATALOG",
    "CITYSCAPES19_CLASSES",
    "CITYSCAPES27_CLASSES",
    "DatasetInfo",
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
    "dataset_info",
    "dataset_names",
    "center_crop_square",
    "default_data_root",
    "from_model_range",
    "load_coco_stuff27_metadata",
    "metadata_dir",
    "read_id_list",
    "read_image_rgb",
    "read_label",
    "read_photo",
    "register",
    "resize_image",
    "resize_label",
    "to_model_range",
]
