"""Score a folder of predicted segment maps against a benchmark's labels.

Usage::

    python -m eval.score --dataset coco_stuff27 --predictions DIR [--root R]
        [--resolution 512] [--curated | --no-curated] [--ids-file F] [--ignore-extra]
        [--output results.json] [--per-image per_image.jsonl] [--matching image|row]
    python -m eval.score --dataset voc --predictions DIR --resolution 128 [--preprocessing P]
        [--no-background-merge]
    python -m eval.score --dataset cityscapes --classes 19 --predictions DIR   # or context 59

Datasets: every benchmark of the dataset catalog (``diffseg.data.catalog``): coco_stuff27,
cityscapes, and DiffCut's voc, context, coco_object (background class: many-to-one matching
first, see below) and ade20k; a dataset registered there is offered here too.

``DIR`` holds one single-channel PNG per image, ``<id>.png`` (8- or 16-bit; values are segment
ids, any ids, any number of them), at the evaluation resolution (``--resolution``, 512 or 320 in
the paper). Labels come from the dataset loaders (``diffseg.data``), preprocessed as
docs/diffseg.md section 1, and each image is scored with the per-image Hungarian matching of
``eval.metrics``. Every check (missing, extra and wrongly sized files) runs before any scoring,
and outputs are written only once everything succeeded. As in run.py, a copy of the dataset
with fewer images than the benchmark's official count is reported as NOT the full benchmark.

A folder written by ``run.py`` also holds ``manifest.json`` (the run's backbone, method and
``random_weights``; never counted as a prediction). Predictions of a run with RANDOM weights
are scored, with one warning line and ``random_weights: true`` and a ``WARNING`` in the output
JSON: their numbers mean nothing. Folders without a manifest are checked by the PNG text entry
``diffseg:random_weights`` of their first prediction.

For datasets with a background class (``background_index`` of the loader: voc, context,
coco_object) each prediction first goes through ``eval.metrics.merge_background`` (DiffCut's
many-to-one rule: segments not matched to an object class of the image become one background
segment), then the usual matching over all classes; ``--no-background-merge`` skips it.

``--matching row`` matches every pixel row on its own, as the Seg4Diff release's evaluator does
(``eval.metrics``, a compatibility mode far more lenient than the protocol: never a headline
number; that release merges no background, so add ``--no-background-merge`` to reproduce it).
The output JSON always says its ``matching``, and the printed line flags a row matching.

``--classes`` picks a dataset's other class list: Cityscapes' official 19 trainIds (instead of
27), Pascal Context's 59 classes with the background ignored (instead of 60; no background
class, so no merge).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from eval.metrics import MATCHINGS, HungarianMetrics, json_safe, merge_background

PROTOCOL = "per-image Hungarian matching (docs/diffseg.md section 7; eval/README.md)"
_MERGE_FIRST = "many-to-one background merge (DiffCut), then "
BACKGROUND_PROTOCOL = _MERGE_FIRST + PROTOCOL
ROW_PROTOCOL = (
    "per-row Hungarian matching, the Seg4Diff release's evaluator (eval/README.md): a "
    "compatibility mode, NOT a headline number"
)
# Single-channel Pillow modes whose values are the stored integers.
_ID_MODES = ("L", "P", "1", "I;16", "I;16B", "I;16L", "I;16N", "I")
_SHOW = 5  # ids shown in error messages
#: The file that describes a prediction folder (written by the engine's PredictionWriter).
PREDICTION_MANIFEST = "manifest.json"
RANDOM_WEIGHTS_WARNING = (
    "these predictions come from a run with RANDOM weights ({source}): its scores mean nothing "
    "and must not be reported"
)


def read_prediction(path: str | Path) -> np.ndarray:
    """Read a predicted segment map PNG.

    Returns:
        (H, W) int64 segment ids as stored (palette PNGs give their indices).
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise OSError(f"cannot decode prediction {path} ({type(err).__name__}: {err}).") from err
    if img.mode not in _ID_MODES:
        raise ValueError(
            f"prediction {path} is a {img.mode} image; predictions must be single-channel PNGs "
            "(8- or 16-bit grayscale, or palette) whose values are segment ids."
        )
    arr = np.asarray(img).astype(np.int64)
    if arr.min(initial=0) < 0:
        raise ValueError(f"prediction {path} holds negative values; segment ids must be >= 0.")
    return arr


def _list_ids(ids: Sequence[str], more: int) -> str:
    shown = ", ".join(ids[:_SHOW])
    return shown + (f", ... ({more} more)" if more > 0 else "")


def find_predictions(
    pred_dir: str | Path, ids: Sequence[str], ignore_extra: bool = False
) -> list[Path]:
    """The prediction file of every id, in ``ids`` order, after checking the folder.

    Raises:
        FileNotFoundError: the folder is missing, or some ids have no ``<id>.png`` (says how
            many and lists the first few).
        ValueError: the folder holds other files (unless ``ignore_extra``). Hidden files are
            never counted.
    """
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"predictions folder not found: {pred_dir}")
    present = {p.name for p in pred_dir.iterdir() if not p.name.startswith(".")}
    present.discard(PREDICTION_MANIFEST)
    expected = [f"{i}.png" for i in ids]
    missing = [i for i, name in zip(ids, expected, strict=True) if name not in present]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(ids)} predictions are missing from {pred_dir}: "
            f"{_list_ids(missing, len(missing) - _SHOW)}. Expected one <id>.png per image "
            "of the dataset (check --dataset, --curated and --ids-file)."
        )
    extra = sorted(present - set(expected))
    if extra and not ignore_extra:
        raise ValueError(
            f"{pred_dir} holds {len(extra)} entries that are not predictions of this dataset: "
            f"{_list_ids(extra, len(extra) - _SHOW)}. Remove them, or pass --ignore-extra."
        )
    return [pred_dir / name for name in expected]


def random_weights_source(pred_dir: str | Path, ids: Sequence[str]) -> str | None:
    """Where a prediction folder says its run had RANDOM weights, or None when it does not.

    Reads ``manifest.json`` when there is one (an unreadable manifest is not trusted either
    way), else the ``diffseg:random_weights`` PNG text of the prediction of ``ids[0]``.
    """
    manifest = Path(pred_dir) / PREDICTION_MANIFEST
    if manifest.is_file():
        try:
            info = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            info = None
        if isinstance(info, dict) and "random_weights" in info:
            if info["random_weights"] is not True:
                return None
            return f"{manifest}: backbone {info.get('backbone', '?')}"
    if not ids:
        return None
    first = Path(pred_dir) / f"{ids[0]}.png"
    try:
        with Image.open(first) as img:
            flag = img.info.get("diffseg:random_weights")
            if flag is None:  # text after the image data is read with the pixels
                img.load()
                flag = img.info.get("diffseg:random_weights")
    except (UnidentifiedImageError, OSError):
        return None
    return f"PNG text of {first.name}" if flag == "true" else None


def check_sizes(paths: Sequence[Path], resolution: int) -> None:
    """Every prediction must be resolution x resolution (read from the PNG headers only)."""
    for path in paths:
        try:
            with Image.open(path) as img:
                width, height = img.size
        except (UnidentifiedImageError, OSError) as err:
            raise OSError(f"cannot read prediction {path} ({err}).") from err
        if (height, width) != (resolution, resolution):
            raise ValueError(
                f"prediction {path} is {height}x{width} (height x width) but labels are compared "
                f"at {resolution}x{resolution}; save predictions at the evaluation resolution "
                "or pass the matching --resolution."
            )


def build_labels(
    dataset: str,
    root: str | Path | None = None,
    resolution: int = 512,
    split: str = "val",
    curated: bool | None = None,
    ids_file: str | Path | None = None,
    **options: Any,
):
    """The benchmark dataset whose ``load_label`` gives (resolution, resolution) int64 labels.

    ``options`` go to the loader when not None (``preprocessing``, ``other_as_class``, ...).
    """
    info = _benchmark(dataset)
    kwargs: dict[str, Any] = {"root": root, "split": split, "label_size": resolution}
    kwargs.update({k: v for k, v in options.items() if v is not None})
    if curated is not None:
        kwargs["curated"] = curated
    if ids_file is not None:
        kwargs["ids_file"] = ids_file
    for option in ("curated", "other_as_class", "void_as_background", "classes"):
        if option in kwargs and option not in info.options:
            takers = [n for n in _choices() if option in _benchmark(n).options]
            flag = "--curated/--no-curated" if option == "curated" else _flag(option)
            raise ValueError(f"{flag} applies to {' and '.join(takers)} only.")
    return info.loader(**kwargs)


def _choices() -> list[str]:
    """The benchmarks of the catalog: labelled datasets with an official size."""
    from diffseg.data import dataset_names

    return dataset_names(labelled=True, benchmark=True)


def _benchmark(name: str):
    """The catalog entry of a benchmark, or a ValueError naming the choices."""
    from diffseg.data import dataset_info

    info = dataset_info(name)
    if info.name not in _choices():
        raise ValueError(f"{name!r} is not a benchmark; choose one of {', '.join(_choices())}.")
    return info


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def score_predictions(
    labels,
    pred_dir: str | Path,
    ignore_extra: bool = False,
    batch_size: int = 16,
    workers: int = 4,
    background_merge: bool | None = None,
    matching: str = "image",
) -> tuple[HungarianMetrics, list[dict[str, Any]]]:
    """Score ``pred_dir`` against a labelled dataset (``ids``, ``load_label``, ``num_classes``).

    ``background_merge`` (default: when the dataset has a ``background_index``) applies
    :func:`eval.metrics.merge_background` to every prediction before matching. ``matching``
    ("image" or "row") goes to :class:`eval.metrics.HungarianMetrics`.

    Returns:
        The filled ``HungarianMetrics`` and one record per image (with its ``id``), in order.
    """
    metrics = HungarianMetrics(num_classes=labels.num_classes, matching=matching)
    ids = list(labels.ids)
    paths = find_predictions(pred_dir, ids, ignore_extra=ignore_extra)
    resolution = int(labels.label_size)
    per_image_size = bool(getattr(labels, "per_image_size", False))
    if not per_image_size:  # seg4diff: each label has its own size, checked when it is read
        check_sizes(paths, resolution)
    records: list[dict[str, Any]] = []
    background = getattr(labels, "background_index", None)
    if background_merge and background is None:
        title = getattr(labels, "title", labels.name)
        raise ValueError(f"{title} has no background class to merge segments into.")
    merge = background is not None and background_merge is not False

    def load(i: int) -> tuple[np.ndarray, np.ndarray]:
        pred = read_prediction(paths[i])
        label = labels.load_label(i).numpy()
        if pred.shape != label.shape:  # the header check makes this a changed file
            raise ValueError(
                f"prediction {paths[i]} is {pred.shape[0]}x{pred.shape[1]} but its label is "
                f"{label.shape[0]}x{label.shape[1]} (height x width); save predictions at the "
                "evaluation size of the same --resolution and --preprocessing."
            )
        if merge:
            pred = merge_background(pred, label, background, num_classes=labels.num_classes)
        return pred, label

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(ids), batch_size):
            chunk = range(start, min(start + batch_size, len(ids)))
            pairs = list(pool.map(load, chunk))
            if per_image_size:  # shapes differ: one image at a time (the same records)
                recs = [rec for p, lab in pairs for rec in metrics.update(p, lab)]
            else:
                preds = np.stack([p for p, _ in pairs])
                recs = metrics.update(preds, np.stack([lab for _, lab in pairs]))
            for i, rec in zip(chunk, recs, strict=True):
                records.append({"id": ids[i], **rec})
    return metrics, records


def _write_atomic(path: Path, text: str) -> None:
    """``text`` to ``path`` through a temp file and a rename (mode as the umask says)."""
    from diffseg.io_utils import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m eval.score",
        description="Per-image Hungarian ACC / mIoU of saved segment PNGs (<id>.png).",
    )
    p.add_argument("--dataset", required=True, choices=_choices())
    p.add_argument("--predictions", required=True, type=Path, help="folder of <id>.png files")
    p.add_argument("--root", type=Path, default=None, help="dataset folder (default: data root)")
    p.add_argument(
        "--resolution",
        type=int,
        default=512,
        help="evaluation size: labels are compared at RxR (DiffSeg 512 or 320, DiffCut 128)",
    )
    p.add_argument(
        "--preprocessing",
        default=None,
        help="the loaders' label preprocessing (e.g. diffseg or diffcut; default: the loader's)",
    )
    p.add_argument(
        "--background-merge",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="DiffCut's many-to-one background merge (default: on for voc, context, coco_object)",
    )
    p.add_argument(
        "--other-as-class",
        action="store_true",
        default=None,
        help="ADE20K as the DiffCut release scores it: 'other' (0) is class 0, 'flag' ignored",
    )
    p.add_argument(
        "--matching",
        choices=MATCHINGS,
        default="image",
        help="image: the protocol; row: every pixel row matched on its own, as the Seg4Diff "
        "release's evaluator (compatibility only, never a headline number)",
    )
    p.add_argument(
        "--classes",
        type=int,
        default=None,
        help="the other class list: cityscapes 19 (official trainIds; default 27), context 59 "
        "(background ignored; default 60)",
    )
    p.add_argument("--split", default="val")
    p.add_argument(
        "--curated",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="COCO-Stuff: the 2175 curated val images (default) or every labelled image",
    )
    p.add_argument("--ids-file", type=Path, default=None, help="score only these ids (one a line)")
    p.add_argument(
        "--ignore-extra", action="store_true", help="allow unrelated files in the folder"
    )
    p.add_argument("--output", type=Path, default=None, help="write the results as JSON")
    p.add_argument("--per-image", type=Path, default=None, help="write per-image records (JSONL)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=4, help="threads decoding PNGs")
    return p


def _coverage_note(coverage: dict[str, Any]) -> str:
    """ " (NOT the full benchmark ...)" as run.py's summary says it, or ""."""
    if coverage["full_benchmark"]:
        return ""
    if coverage["incomplete"]:
        found, expected = coverage["images_found"], coverage["images_expected"]
        return f" (NOT the full benchmark: {found} of {expected} found)"
    return " (NOT the full benchmark)"


def _protocol(merged: bool, matching: str) -> str:
    """The ``protocol`` line of the output JSON."""
    base = ROW_PROTOCOL if matching == "row" else PROTOCOL
    return _MERGE_FIRST + base if merged else base


def _row_note(matching: str) -> str:
    """ " [ROW matching ...]" on the printed line of a row matching, or ""."""
    if matching != "row":
        return ""
    return " [ROW matching: Seg4Diff-release compatibility, not a headline number]"


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; returns the exit status (0 ok, 2 bad input)."""
    args = _parser().parse_args(argv)
    try:
        if args.resolution <= 0 or args.batch_size <= 0:
            raise ValueError("--resolution and --batch-size must be positive.")
        labels = build_labels(
            args.dataset,
            args.root,
            args.resolution,
            args.split,
            args.curated,
            args.ids_file,
            preprocessing=args.preprocessing,
            other_as_class=args.other_as_class,
            classes=args.classes,
        )
        merged = getattr(labels, "background_index", None) is not None and (
            args.background_merge is not False
        )
        metrics, records = score_predictions(
            labels,
            args.predictions,
            ignore_extra=args.ignore_extra,
            batch_size=args.batch_size,
            workers=args.workers,
            background_merge=args.background_merge,
            matching=args.matching,
        )
        random_source = random_weights_source(args.predictions, list(labels.ids))
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"eval.score: error: {err}", file=sys.stderr)
        return 2

    result = metrics.compute()
    warning = None
    if random_source is not None:
        warning = RANDOM_WEIGHTS_WARNING.format(source=random_source)
        print(f"eval.score: warning: {warning}", file=sys.stderr)
    coverage = labels.benchmark_coverage()
    summary = {
        "dataset": args.dataset,
        "split": args.split,
        "curated": getattr(labels, "curated", None),
        **({"classes": labels.classes} if hasattr(labels, "classes") else {}),
        **coverage,
        "resolution": args.resolution,
        "predictions": str(args.predictions),
        "protocol": _protocol(merged, args.matching),
        "matching": args.matching,
        "background_index": getattr(labels, "background_index", None),
        "background_merge": merged,
        "random_weights": random_source is not None,
        **({"WARNING": warning} if warning else {}),
        **result,
        "class_names": list(labels.class_names),
    }
    note = _coverage_note(coverage) + _row_note(args.matching)
    print(
        f"{args.dataset} @ {args.resolution}: ACC {result['acc']:.2f}  mIoU {result['miou']:.2f}"
        f"  ({result['num_images']} images, {result['classes_counted']} of "
        f"{result['num_classes']} classes counted)" + note
    )
    if args.output is not None:
        _write_atomic(args.output, json.dumps(json_safe(summary), indent=2) + "\n")
    if args.per_image is not None:
        lines = (json.dumps(json_safe(r), allow_nan=False) for r in records)
        _write_atomic(args.per_image, "".join(line + "\n" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
