"""The dataset catalog: one :class:`DatasetInfo` per dataset, registered by the dataset's module.

A dataset module declares what the rest of the house needs to know about it once, beside its
loader class::

    @register(DatasetInfo(name="cityscapes", title="Cityscapes-27", official_sizes={"val": 500},
                          folder="cityscapes", prepare="python datasets/prepare_cityscapes.py ..."))
    class Cityscapes27(LabelledDataset): ...

``run.py`` builds datasets from ``configs/dataset/<name>.yaml`` (whose ``_target_`` is the loader
and whose ``name`` is the catalog name), ``python -m eval.score --dataset`` offers the labelled
entries, the docs and ``datasets/README.md`` list them, and every run compares the images it found
with ``official_sizes`` to say whether it covers the whole benchmark
(:meth:`diffseg.data.base.ImageDataset.benchmark_coverage`). Adding a dataset is one module that
registers itself here, plus its config (docs/architecture.md ("How to add a dataset")).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = [
    "CATALOG",
    "DatasetInfo",
    "catalog_table",
    "dataset_info",
    "dataset_names",
    "load_all",
    "register",
]

#: Label value meaning "not labelled" (also ``diffseg.data.base.IGNORE_INDEX``).
IGNORE = -1


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is, independent of any copy on disk.

    Attributes:
        name: the catalog name (``dataset=<name>`` in run.py, ``--dataset`` in eval.score).
        title: the name printed in tables and docs ("Cityscapes-27").
        aliases: other accepted names ("cityscapes27").
        labelled: whether items carry labels (benchmarks) or not (a folder of photos).
        class_names: the class names in index order, or a function returning them (read
            lazily: some come from JSON files shipped in ``datasets/``).
        ignore_index: the label value that the metric ignores (-1).
        background_index: the class that DiffCut's many-to-one matching merges segments into,
            or None (no background class).
        official_sizes: split -> number of images of the benchmark on that split (the
            evaluation split's count is what a run must find to be the full benchmark).
        folder: the default folder under the data root (``$DIFFSEG_DATA``), or None.
        layout: ``layout(root, split) -> str``: the sentences telling a user which files are
            expected where and how to prepare them (error messages and docs).
        prepare: the command that prepares the data (``{root}`` is filled in), or None.
        class_counts: the values of the loader's ``classes`` option, the default first
            (Cityscapes: 27 or 19); empty when the dataset has one class list. ``class_names``
            and ``background_index`` describe the default.
        options: constructor options besides the common ones (root, split, image_size,
            label_size, ids, ids_file, preprocessing) that command lines may pass on.
        protocol: the defaults of the dataset's config (``configs/dataset/<name>.yaml``), e.g.
            the evaluation split; a test keeps the two in agreement.
        loader: the dataset class (set by :func:`register`).
    """

    name: str
    title: str = ""
    aliases: tuple[str, ...] = ()
    labelled: bool = True
    class_names: Sequence[str] | Callable[[], Sequence[str]] = ()
    ignore_index: int = IGNORE
    background_index: int | None = None
    official_sizes: Mapping[str, int] = field(default_factory=dict)
    folder: str | None = None
    layout: Callable[[Path, str], str] | None = None
    prepare: str | None = None
    class_counts: tuple[int, ...] = ()
    options: tuple[str, ...] = ()
    protocol: Mapping[str, Any] = field(default_factory=dict)
    loader: type | None = None

    def classes(self) -> list[str]:
        """The class names (read from their file when the entry names a function)."""
        names = self.class_names() if callable(self.class_names) else self.class_names
        return list(names)

    def official_size(self, split: str | None) -> int | None:
        """How many images the benchmark has on ``split`` (None: not a benchmark split)."""
        return None if split is None else self.official_sizes.get(split)

    def layout_help(self, root: str | Path, split: str = "val") -> str:
        """The expected layout under ``root`` and how to prepare it ("" when not declared)."""
        return self.layout(Path(root), split) if self.layout is not None else ""

    def prepare_command(self, root: str | Path = "<root>") -> str | None:
        """The prepare command for ``root``, or None."""
        return None if self.prepare is None else self.prepare.format(root=root)


#: name -> entry, in registration order.
CATALOG: dict[str, DatasetInfo] = {}
_ALIASES: dict[str, str] = {}


def register(info: DatasetInfo) -> Callable[[type], type]:
    """Class decorator: record ``info`` (with ``loader`` = the class) and set ``cls.info``.

    Raises:
        ValueError: a name or alias that another dataset already uses.
    """

    def wrap(cls: type) -> type:
        entry = replace(info, loader=cls, title=info.title or info.name)
        for key in (entry.name, *entry.aliases):
            owner = _ALIASES.get(key, key if key in CATALOG else None)
            if owner is not None and owner != entry.name:
                raise ValueError(f"dataset name {key!r} is already used by {owner!r}")
        CATALOG[entry.name] = entry
        _ALIASES.update(dict.fromkeys(entry.aliases, entry.name))
        cls.info = entry
        return cls

    return wrap


def load_all() -> dict[str, DatasetInfo]:
    """Import every module of the ``diffseg.data`` package, so that each registers its
    dataset: a new module there needs no import line anywhere. Returns :data:`CATALOG`."""
    import diffseg.data as package

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")
    return CATALOG


def dataset_info(name: str) -> DatasetInfo:
    """The entry of ``name`` or one of its aliases.

    Raises:
        ValueError: an unknown name, listing the known ones.
    """
    if _ALIASES.get(name, name) not in CATALOG:
        load_all()
    key = _ALIASES.get(name, name)
    if key not in CATALOG:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(CATALOG)}")
    return CATALOG[key]


def dataset_names(labelled: bool | None = None, benchmark: bool = False) -> list[str]:
    """Catalog names; ``labelled`` filters on labels, ``benchmark`` keeps those with an
    official size (the benchmarks that ``eval.score`` scores)."""
    load_all()
    return [
        n
        for n, info in CATALOG.items()
        if (labelled is None or info.labelled == labelled)
        and (not benchmark or info.official_sizes)
    ]


def catalog_table() -> str:
    """The Markdown table of the catalog that datasets/README.md shows (a test keeps the two
    equal): name, aliases, loader, official sizes, classes (the other choices of the
    ``classes`` option in brackets), background class, prepare script."""
    rows = [
        "| dataset | aliases | loader | official images | classes | background | prepared by |",
        "|---|---|---|---|---|---|---|",
    ]
    for info in load_all().values():
        sizes = ", ".join(f"{split} {n}" for split, n in info.official_sizes.items()) or "-"
        classes = len(info.classes()) if info.labelled and info.class_names else "-"
        if info.class_counts[1:]:
            classes = f"{classes} (or {', '.join(str(n) for n in info.class_counts[1:])})"
        background = "-" if info.background_index is None else str(info.background_index)
        script = info.prepare.split()[1] if info.prepare else "-"
        aliases = ", ".join(f"`{a}`" for a in info.aliases) or "-"
        rows.append(
            f"| `{info.name}` | {aliases} | `{info.loader.__name__}` | {sizes} | {classes} "
            f"| {background} | `{script}` |".replace("`-`", "-")
        )
    return "\n".join(rows) + "\n"
