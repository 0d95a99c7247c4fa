"""Per-image Hungarian matching: pixel accuracy (ACC) and mean IoU for unsupervised segmentation.

The protocol of the DiffSeg release (docs/diffseg.md section 7; the release adapted it from
PiCIE), applied to each image on its own:

1. Over the image's labelled pixels (``0 <= label < num_classes``; ``ignore_index`` is skipped),
   build the confusion matrix ``hist[c, k]`` (int64) with ``num_classes`` rows and
   ``max(num_classes, K)`` columns, where ``K = (largest segment id anywhere in the image) + 1``.
   Column ``k`` is segment id ``k`` as predicted: ids are never renumbered.
2. ``scipy.optimize.linear_sum_assignment(hist, maximize=True)`` gives the one-to-one matching of
   classes to segments with the most matched pixels. Every class gets a column (rows <= columns),
   including classes absent from the image.
3. For class ``c`` matched to segment ``k``: ``TP_c = hist[c, k]``, ``FN_c = row_c - hist[c, k]``,
   ``FP_c = col_k - hist[c, k]``. Pixels of unmatched segments are FN of their class only.

Over a dataset the integers add up: ``ACC = sum(TP) / pixels``, ``IoU_c = TP_c / (TP_c + FP_c +
FN_c)`` and ``mIoU`` is the mean of the defined IoUs (nan-mean). Both are reported in percent.

**Row matching** (``matching="row"``) is a compatibility mode only. The Seg4Diff release
(docs/seg4diff.md section 2) hands its PiCIE-style matching function one (H, W) prediction and
label, and that function loops over axis 0 as if it were a batch. So
every pixel row is matched on its own: steps 1 to 3 above run once per row, the matrix of a row
has ``max(num_classes, K_row)`` columns with ``K_row`` = (largest segment id in that row, over
all its pixels) + 1, and the image's TP/FP/FN are the sums over its rows. A row without a
labelled pixel adds nothing. ``matching="row"`` reproduces that evaluator exactly, to compare
with its published numbers. It is far more lenient (a segment may stand for a different class
in every row; a single-segment prediction of a striped scene scores many times its per-image
mIoU), so a row-matched number must never be reported as a headline result. In this mode
``ImageMatch.segment_of_class`` is -1 for every class (no single segment is matched to a class
over the whole image) and ``class_of_segment`` raises.

Only numpy, scipy and torch are used. Inputs may be torch tensors (on any device; the confusion
counts are computed there) or numpy arrays.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = [
    "MATCHINGS",
    "HungarianMetrics",
    "ImageMatch",
    "confusion_matrix",
    "json_safe",
    "match_image",
    "merge_background",
    "summarize",
]

ArrayLike = torch.Tensor | np.ndarray

#: The matchings: "image" (the protocol, default) and "row" (the Seg4Diff release's per-row
#: compatibility mode; never a headline number).
MATCHINGS = ("image", "row")


def _check_matching(matching: Any) -> str:
    """``matching`` if it is one of ``MATCHINGS``, else a ValueError naming the choices."""
    if not isinstance(matching, str) or matching not in MATCHINGS:
        raise ValueError(
            f"matching={matching!r} is not a matching; choose one of "
            f"{', '.join(repr(m) for m in MATCHINGS)} ('image' is the protocol, 'row' only "
            "reproduces the Seg4Diff release's per-row evaluator)."
        )
    return matching


def _as_tensor(x: ArrayLike, name: str) -> torch.Tensor:
    """Integer tensor of shape (B, H, W) sharing memory with ``x`` where possible."""
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "iu":
            raise ValueError(
                f"{name} must hold integers, got numpy dtype {x.dtype}; cast it first "
                f"(e.g. {name}.astype(np.int64))."
            )
        if x.dtype == np.uint16 or x.dtype == np.uint32 or x.dtype == np.uint64:
            # torch has limited support for wide unsigned types; int64 holds every id we accept.
            x = x.astype(np.int64)
        x = torch.from_numpy(np.ascontiguousarray(x))
    elif not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}.")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise ValueError(
            f"{name} must hold integers, got torch dtype {x.dtype}; cast it first "
            f"(e.g. {name}.long())."
        )
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape (B, H, W) or (H, W), got {tuple(x.shape)}.")
    return x


def _batch_confusion(
    pred: torch.Tensor,
    label: torch.Tensor,
    num_classes: int,
    ignore_index: int,
    where: Callable[[int], str] = "image {} of the batch".format,
) -> tuple[np.ndarray, np.ndarray]:
    """Confusion counts of a batch with one bincount.

    Args:
        pred: (B, H, W) integer segment ids >= 0.
        label: (B, H, W) integer classes in [0, num_classes) or ``ignore_index``.
        where: how an error names batch element ``b`` (``where(b)``).

    Returns:
        ``hist``: (B, num_classes + 1, N) int64 numpy array, ``N = max(num_classes, max K_b)``;
        rows ``0..num_classes-1`` count labelled pixels, the last row counts ignored pixels
        (used only to count segments over the whole image).
        ``ncols``: (B,) int64, ``max(num_classes, K_b)`` for each image.
    """
    b = pred.shape[0]
    label = label.to(pred.device)
    if pred.numel() == 0:
        ncols = np.full(b, num_classes, dtype=np.int64)
        return np.zeros((b, num_classes + 1, num_classes), dtype=np.int64), ncols

    flat_pred = pred.reshape(b, -1)
    flat_label = label.reshape(b, -1)
    min_pred = int(flat_pred.min())
    if min_pred < 0:
        raise ValueError(
            f"pred holds a negative segment id ({min_pred}); segment ids must be >= 0 "
            "(there is no ignore value for predictions)."
        )
    ignored = flat_label == ignore_index
    lo, hi = (int(v) for v in torch.aminmax(flat_label))
    # Fast path: the range alone proves every value valid (the usual ignore_index=-1 case).
    in_range = hi < num_classes and (lo >= 0 or (ignore_index == -1 and lo >= -1))
    bad = None if in_range else ~ignored & ((flat_label < 0) | (flat_label >= num_classes))
    if bad is not None and bool(bad.any()):
        image, pos = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"label holds class {int(flat_label[image, pos])} ({where(image)}); "
            f"labels must lie in [0, {num_classes}) or equal ignore_index={ignore_index}. "
            "Map the dataset's raw ids to classes first, or set num_classes/ignore_index."
        )

    # The release takes K from the prediction's largest id over ALL pixels of the image,
    # unlabelled ones included, before masking: the column count (and so how the solver breaks
    # ties for absent classes) follows that, so we do the same.
    max_id = flat_pred.amax(dim=1).to("cpu", torch.int64).numpy()
    ncols = np.maximum(num_classes, max_id + 1)
    n = int(ncols.max())
    rows = num_classes + 1
    # Ignored pixels go to an extra last row instead of being dropped: no boolean gather,
    # and the labelled rows are exactly the masked histogram.
    index = torch.where(ignored, num_classes, flat_label.long())
    index.mul_(n).add_(flat_pred)
    index.add_(torch.arange(b, device=index.device, dtype=torch.int64).mul_(rows * n)[:, None])
    counts = torch.bincount(index.reshape(-1), minlength=b * rows * n)
    return counts.reshape(b, rows, n).cpu().numpy(), ncols


@dataclass(frozen=True)
class ImageMatch:
    """The Hungarian matching of one image.

    Attributes:
        tp, fp, fn: (num_classes,) int64 counts of this image.
        pixels: number of labelled pixels.
        num_segments: distinct segment ids in the prediction over all pixels of the image
            (ignored pixels included: it describes the method's output).
        num_classes: classes present among the labelled pixels.
        segment_of_class: (num_classes,) int64, the segment id each class was matched to
            (absent classes too; every class gets one column of the matrix). With
            ``matching="row"`` -1 for every class: each row has a matching of its own.
        matching: "image" or "row" (see the module docstring); not part of ``record()``.
    """

    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    pixels: int
    num_segments: int
    num_classes: int
    segment_of_class: np.ndarray
    matching: str = "image"

    @property
    def acc(self) -> float:
        """Pixel accuracy in percent; nan when the image has no labelled pixel."""
        return 100.0 * float(self.tp.sum()) / self.pixels if self.pixels else math.nan

    @property
    def iou(self) -> np.ndarray:
        """(num_classes,) float64 IoU in percent, nan where TP + FP + FN = 0."""
        return _iou(self.tp, self.fp, self.fn)

    @property
    def miou(self) -> float:
        """Mean IoU in percent over classes where it is defined in this image (TP+FP+FN > 0).

        Absent classes that the matching paired with a non-empty segment have FP > 0 and count
        as 0, exactly as they do in the dataset totals.
        """
        return _nanmean(self.iou)

    def class_of_segment(self, num_segments: int | None = None) -> np.ndarray:
        """(S,) int64 mapping segment id -> matched class, -1 for unmatched segments.

        ``S`` defaults to the number of matrix columns covered by the matching; useful for
        colouring a prediction by its matched classes (``class_of_segment()[pred]``).

        Raises:
            ValueError: for a row matching, where a segment has no class over the image.
        """
        if self.matching != "image":
            raise ValueError(
                f"class_of_segment needs a per-image matching; this one is matching="
                f"{self.matching!r} (each pixel row is matched on its own). Use "
                "match_image(..., matching='image') to colour a prediction by class."
            )
        s = int(self.segment_of_class.max()) + 1 if num_segments is None else num_segments
        out = np.full(s, -1, dtype=np.int64)
        keep = self.segment_of_class < s
        out[self.segment_of_class[keep]] = np.nonzero(keep)[0]
        return out

    def record(self) -> dict[str, Any]:
        """JSON-able per-image record (undefined acc/miou become None)."""
        return {
            "acc": _none_if_nan(self.acc),
            "miou": _none_if_nan(self.miou),
            "num_segments": self.num_segments,
            "num_classes": self.num_classes,
            "pixels": self.pixels,
            "tp": self.tp.tolist(),
            "fp": self.fp.tolist(),
            "fn": self.fn.tolist(),
        }


def _match_hist(hist: np.ndarray, ncols: int, num_classes: int) -> ImageMatch:
    """Match one image from its (num_classes + 1, >= ncols) counts (last row = ignored)."""
    labelled = np.ascontiguousarray(hist[:num_classes, :ncols])
    rows, cols = linear_sum_assignment(labelled, maximize=True)
    # rows <= columns, so the solver assigns every class, in order: rows == arange(num_classes).
    matched = labelled[rows, cols]
    row_sum = labelled.sum(axis=1)
    col_sum = labelled.sum(axis=0)
    return ImageMatch(
        tp=matched,
        fp=col_sum[cols] - matched,
        fn=row_sum - matched,
        pixels=int(row_sum.sum()),
        num_segments=int(np.count_nonzero(hist[:, :ncols].sum(axis=0))),
        num_classes=int(np.count_nonzero(row_sum)),
        segment_of_class=cols.astype(np.int64),
    )


def confusion_matrix(
    pred: ArrayLike, label: ArrayLike, num_classes: int = 27, ignore_index: int = -1
) -> np.ndarray:
    """The matrix the matching is solved on, for one image.

    Args:
        pred: (H, W) integer segment ids >= 0 (any ids, not renumbered).
        label: (H, W) integer classes in [0, num_classes) or ``ignore_index``.

    Returns:
        (num_classes, max(num_classes, K)) int64, ``K = pred.max() + 1`` over all pixels;
        entry [c, k] counts labelled pixels of class c predicted as segment k.
    """
    p, lab = _check_pair(pred, label, single=True)
    hist, ncols = _batch_confusion(p, lab, num_classes, ignore_index)
    return np.ascontiguousarray(hist[0, :num_classes, : int(ncols[0])])


#: Histogram entries per block of rows in ``_match_rows`` (bounds its memory, ~32 MB).
_ROW_BLOCK = 1 << 22


def _match_rows(
    pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int, image: int = 0
) -> ImageMatch:
    """Row matching of one image: every pixel row matched on its own, counts summed.

    Args:
        pred: (H, W) integer segment ids >= 0.
        label: (H, W) integer classes in [0, num_classes) or ``ignore_index``.
        image: the image's index in its batch (error messages only).
    """
    tp, fp, fn = (np.zeros(num_classes, dtype=np.int64) for _ in range(3))
    widest = max(num_classes, int(pred.max()) + 1) if pred.numel() else num_classes
    totals = np.zeros((num_classes + 1, widest), dtype=np.int64)  # the whole image's counts
    # Rows as a batch of (1, W) images: one bincount per block of rows, the block sized so
    # its (rows, num_classes + 1, <= widest) histogram stays near _ROW_BLOCK entries.
    step = max(1, _ROW_BLOCK // ((num_classes + 1) * widest))
    for start in range(0, pred.shape[0], step):
        hist, ncols = _batch_confusion(
            pred[start : start + step, None],
            label[start : start + step, None],
            num_classes,
            ignore_index,
            where=lambda r, start=start: f"image {image}, pixel row {start + r}",
        )
        totals[:, : hist.shape[2]] += hist.sum(axis=0)
        for r in np.flatnonzero(hist[:, :num_classes].sum(axis=(1, 2))):  # rows with labels
            m = _match_hist(hist[r], int(ncols[r]), num_classes)
            tp += m.tp
            fp += m.fp
            fn += m.fn
    row_sum = totals[:num_classes].sum(axis=1)
    return ImageMatch(
        tp=tp,
        fp=fp,
        fn=fn,
        pixels=int(row_sum.sum()),
        num_segments=int(np.count_nonzero(totals.sum(axis=0))),
        num_classes=int(np.count_nonzero(row_sum)),
        segment_of_class=np.full(num_classes, -1, dtype=np.int64),
        matching="row",
    )


def match_image(
    pred: ArrayLike,
    label: ArrayLike,
    num_classes: int = 27,
    ignore_index: int = -1,
    matching: str = "image",
) -> ImageMatch:
    """Hungarian matching of one (H, W) prediction against its (H, W) label.

    ``matching="image"`` (the protocol) matches the whole image; ``"row"`` matches every pixel
    row on its own and sums the counts (the Seg4Diff release's evaluator; a compatibility mode,
    never a headline number). See the module docstring; ``ImageMatch.record()`` gives the
    JSON record.
    """
    _check_matching(matching)
    p, lab = _check_pair(pred, label, single=True)
    if matching == "row":
        return _match_rows(p[0], lab[0], num_classes, ignore_index)
    hist, ncols = _batch_confusion(p, lab, num_classes, ignore_index)
    return _match_hist(hist[0], int(ncols[0]), num_classes)


def _check_pair(pred: ArrayLike, label: ArrayLike, single: bool = False):
    p = _as_tensor(pred, "pred")
    lab = _as_tensor(label, "label")
    if p.shape != lab.shape:
        raise ValueError(
            f"pred and label shapes differ: {tuple(p.shape)} vs {tuple(lab.shape)}; predictions "
            "must be at the label's resolution."
        )
    if single and p.shape[0] != 1:
        raise ValueError(f"expected one (H, W) image, got shape {tuple(p.shape)}.")
    return p, lab


def _iou(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denom = (tp + fp + fn).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, 100.0 * tp / denom, np.nan)


def _nanmean(values: np.ndarray) -> float:
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else math.nan


def _none_if_nan(x: float) -> float | None:
    return None if math.isnan(x) else x


def json_safe(obj: Any) -> Any:
    """Copy of ``obj`` with nan/inf floats replaced by None and numpy scalars/arrays as Python."""
    if isinstance(obj, Mapping):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def summarize(
    tp: Sequence[int], fp: Sequence[int], fn: Sequence[int], pixels: int
) -> dict[str, Any]:
    """ACC / IoU / mIoU (percent) from integer totals; nan where undefined."""
    tp_a, fp_a, fn_a = (np.asarray(v, dtype=np.int64) for v in (tp, fp, fn))
    iou = _iou(tp_a, fp_a, fn_a)
    return {
        "acc": 100.0 * float(tp_a.sum()) / pixels if pixels else math.nan,
        "miou": _nanmean(iou),
        "iou_per_class": iou.tolist(),
        "classes_counted": int(np.count_nonzero(~np.isnan(iou))),
    }


class HungarianMetrics:
    """Accumulates per-image Hungarian matching over a dataset.

    Totals are integers, so any order of images, any split into batches or parts combined with
    ``merge``, and any replay of saved per-image records with ``add_records`` give exactly the
    same result.

    ``matching="row"`` matches every pixel row on its own instead of every image (the Seg4Diff
    release's evaluator, module docstring): a compatibility mode, never a headline number.
    Records look the same in both modes and do not say their matching; ``state()`` does, and
    ``merge`` refuses to mix matchings.

    Example:
        >>> m = HungarianMetrics(num_classes=27)
        >>> records = m.update(segments, labels)  # (B, H, W) each, torch or numpy
        >>> m.compute()["miou"]
    """

    def __init__(
        self, num_classes: int = 27, ignore_index: int = -1, matching: str = "image"
    ) -> None:
        if int(num_classes) != num_classes or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f"ignore_index={ignore_index} is a valid class id for num_classes={num_classes}; "
                "pick a value outside [0, num_classes) (the default is -1)."
            )
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matching = _check_matching(matching)
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        c = self.num_classes
        self.tp = np.zeros(c, dtype=np.int64)
        self.fp = np.zeros(c, dtype=np.int64)
        self.fn = np.zeros(c, dtype=np.int64)
        self.pixels = 0
        self.num_images = 0

    def __len__(self) -> int:
        return self.num_images

    def __repr__(self) -> str:
        row = ", matching='row'" if self.matching == "row" else ""
        return (
            f"HungarianMetrics(num_classes={self.num_classes}, ignore_index={self.ignore_index}"
            f"{row}, num_images={self.num_images})"
        )

    def match(self, pred: ArrayLike, label: ArrayLike) -> list[ImageMatch]:
        """Match a batch without accumulating (per image or per row, as ``matching`` says).

        Args:
            pred: (B, H, W) or (H, W) integer segment ids >= 0, any ids, per image.
            label: same shape, classes in [0, num_classes) or ``ignore_index``.
        """
        p, lab = _check_pair(pred, label)
        if self.matching == "row":
            return [
                _match_rows(p[i], lab[i], self.num_classes, self.ignore_index, image=i)
                for i in range(p.shape[0])
            ]
        # On a GPU one bincount for the batch saves launches; on the CPU image by image keeps
        # the working set in cache (faster, see benchmarks/metrics.py). Same counts either way.
        step = p.shape[0] if p.device.type != "cpu" else 1
        counts = [
            _batch_confusion(
                p[s : s + step], lab[s : s + step], self.num_classes, self.ignore_index
            )
            for s in range(0, p.shape[0], step)
        ]
        return [
            _match_hist(hist[i], int(ncols[i]), self.num_classes)
            for hist, ncols in counts
            for i in range(len(ncols))
        ]

    def update(self, pred: ArrayLike, label: ArrayLike) -> list[dict[str, Any]]:
        """Match a batch, add it to the totals and return one JSON-able record per image.

        Args:
            pred: (B, H, W) or (H, W) integer segment ids >= 0 (torch on any device, or numpy).
            label: same shape, int classes in [0, num_classes), ``ignore_index`` elsewhere.

        Returns:
            Per image: ``{"acc", "miou", "num_segments", "num_classes", "pixels", "tp", "fp",
            "fn"}`` (acc/miou in percent, None when undefined; tp/fp/fn lists of ints).
        """
        matches = self.match(pred, label)
        for m in matches:
            self._add(m.tp, m.fp, m.fn, m.pixels, 1)
        return [m.record() for m in matches]

    def add_records(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Add saved per-image records (from ``update``) back into the totals, e.g. to resume."""
        checked = []
        for i, rec in enumerate(records):
            try:
                tp, fp, fn = (np.asarray(rec[k], dtype=np.int64) for k in ("tp", "fp", "fn"))
                pixels = int(rec["pixels"])
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(
                    f"record {i} is not a per-image metrics record (needs integer 'tp', 'fp', "
                    f"'fn' lists and 'pixels'): {err}"
                ) from err
            if not (tp.shape == fp.shape == fn.shape == (self.num_classes,)):
                raise ValueError(
                    f"record {i} has tp/fp/fn of lengths {tp.size}/{fp.size}/{fn.size}, "
                    f"expected {self.num_classes} (num_classes)."
                )
            # Every labelled pixel is a TP or an FN of its own class.
            if int(tp.sum() + fn.sum()) != pixels or (tp < 0).any() or (fp < 0).any():
                raise ValueError(
                    f"record {i} is inconsistent: sum(tp) + sum(fn) = {int(tp.sum() + fn.sum())} "
                    f"but pixels = {pixels} (or negative counts)."
                )
            checked.append((tp, fp, fn, pixels))
        for tp, fp, fn, pixels in checked:  # all or nothing
            self._add(tp, fp, fn, pixels, 1)

    def _add(self, tp, fp, fn, pixels: int, images: int) -> None:
        self.tp += tp
        self.fp += fp
        self.fn += fn
        self.pixels += int(pixels)
        self.num_images += int(images)

    def compute(self) -> dict[str, Any]:
        """Dataset results.

        Returns:
            ``acc`` and ``miou`` in percent (nan before any labelled pixel), ``iou_per_class``
            (list of num_classes floats in percent, nan where TP + FP + FN = 0),
            ``classes_counted`` (how many IoUs the mean covers), integer lists ``tp``, ``fp``,
            ``fn``, and ``pixels``, ``num_images``, ``num_classes``. Use ``json_safe`` to turn
            nan into None for strict JSON.
        """
        out = summarize(self.tp, self.fp, self.fn, self.pixels)
        out.update(
            tp=self.tp.tolist(),
            fp=self.fp.tolist(),
            fn=self.fn.tolist(),
            pixels=self.pixels,
            num_images=self.num_images,
            num_classes=self.num_classes,
        )
        return out

    def state(self) -> dict[str, Any]:
        """JSON-able totals; ``from_state`` / ``merge`` take them back."""
        return {
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "matching": self.matching,
            "tp": self.tp.tolist(),
            "fp": self.fp.tolist(),
            "fn": self.fn.tolist(),
            "pixels": self.pixels,
            "num_images": self.num_images,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> HungarianMetrics:
        """Rebuild from ``state()`` output (a state without ``matching`` is "image")."""
        m = cls(
            num_classes=state["num_classes"],
            ignore_index=state.get("ignore_index", -1),
            matching=state.get("matching", "image"),
        )
        m.merge(state)
        return m

    def merge(self, other: HungarianMetrics | Mapping[str, Any]) -> HungarianMetrics:
        """Add another accumulator's totals (or its ``state()``) to this one; returns self.

        Raises:
            ValueError: the other counts another number of classes, another ignore_index or
                another matching (a state without ``matching`` is "image").
        """
        state = other.state() if isinstance(other, HungarianMetrics) else other
        if state["num_classes"] != self.num_classes:
            raise ValueError(
                f"cannot merge metrics over {state['num_classes']} classes into metrics over "
                f"{self.num_classes} classes."
            )
        if state.get("ignore_index", self.ignore_index) != self.ignore_index:
            raise ValueError(
                f"cannot merge metrics with ignore_index={state['ignore_index']} into metrics "
                f"with ignore_index={self.ignore_index}."
            )
        if state.get("matching", "image") != self.matching:
            raise ValueError(
                f"cannot merge metrics with matching={state.get('matching', 'image')!r} into "
                f"metrics with matching={self.matching!r}: per-row and per-image counts do not "
                "add up to either protocol."
            )
        tp, fp, fn = (np.asarray(state[k], dtype=np.int64) for k in ("tp", "fp", "fn"))
        if not (tp.shape == fp.shape == fn.shape == (self.num_classes,)):
            raise ValueError(f"state's tp/fp/fn must each have {self.num_classes} entries.")
        self._add(tp, fp, fn, int(state["pixels"]), int(state["num_images"]))
        return self


def _numpy_ids(x: ArrayLike, name: str) -> np.ndarray:
    """One (H, W) integer map as an int64 numpy array (a copy; tensors come to the CPU)."""
    arr = _as_tensor(x, name)
    if arr.shape[0] != 1:
        raise ValueError(f"{name} must be one (H, W) image, got shape {tuple(arr.shape)}.")
    return arr[0].detach().cpu().numpy().astype(np.int64)


def merge_background(
    pred: ArrayLike, label: ArrayLike, background_index: int, num_classes: int | None = None
) -> ArrayLike:
    """Many-to-one background matching of one image, as the DiffCut release does it.

    Datasets with a background class (Pascal VOC, Pascal Context, COCO-Object) let many
    segments cover the background. Before the usual per-image Hungarian matching:

    1. ``hist[r, k]`` counts the pixels of object class ``r`` (every class but the background,
       in order; background and ignored pixels are left out) in segment ``k``: ``n_obj`` rows,
       ``max(n_obj, pred.max() + 1)`` columns, ids not renumbered (as ``confusion_matrix``).
    2. ``linear_sum_assignment(hist, maximize=True)`` pairs every object class, present or
       not, with a segment.
    3. A class row is *kept* when it has a pixel in any of the matched segments, i.e. when
       ``hist[r, matched columns].max() > 0`` (not only in its own). The segments paired with
       kept rows survive, even one that does not overlap its own class at all.
    4. Every other segment (paired with an absent class, with a class all of whose pixels lie
       in unmatched segments, or unpaired) becomes one segment with id ``pred.max() + 1``.

    Args:
        pred: (H, W) integer segment ids >= 0 (torch tensor on any device, or numpy array).
        label: (H, W) integer classes in [0, num_classes); ``background_index`` marks the
            background, -1 ignored pixels (they count for no class).
        background_index: the background class.
        num_classes: classes including the background. The object rows of the matrix (and so
            the solver's choice among ties) depend on it. ``None`` takes
            ``max(background_index, label.max()) + 1``, which is exact whenever the background
            is the last class (as in this project's datasets); pass it otherwise.

    Returns:
        the merged (H, W) map, of the input's type (tensor on the input's device, or array) and
        dtype (widened to int64 if the new id does not fit). Unchanged when every segment
        survives.
    """
    p, lab = _numpy_ids(pred, "pred"), _numpy_ids(label, "label")
    if p.shape != lab.shape:
        raise ValueError(f"pred and label shapes differ: {p.shape} vs {lab.shape}.")
    if p.size and p.min() < 0:
        raise ValueError(f"pred holds a negative segment id ({int(p.min())}).")
    top = int(lab.max(initial=-1))
    n = max(background_index, top) + 1 if num_classes is None else int(num_classes)
    if not 0 <= background_index < n or n < 2:
        raise ValueError(
            f"background_index={background_index} must be a class of num_classes={n} (>= 2)."
        )
    bad = (lab < -1) | (lab >= n)
    if bad.any():
        raise ValueError(
            f"label holds class {int(lab[bad][0])}; labels must lie in [0, {n}) or be -1."
        )
    n_obj = n - 1
    obj = (lab >= 0) & (lab != background_index)
    rows = lab[obj] - (lab[obj] > background_index)  # object classes keep their order
    ncols = max(n_obj, int(p.max(initial=-1)) + 1)
    hist = np.bincount(rows * ncols + p[obj], minlength=n_obj * ncols).reshape(n_obj, ncols)
    _, cols = linear_sum_assignment(hist, maximize=True)
    kept = hist[:, cols].max(axis=1) > 0
    surviving = set(cols[kept].tolist())
    merged = [s for s in np.unique(p).tolist() if s not in surviving]
    if not merged:
        return pred
    new_id = int(p.max()) + 1
    p[np.isin(p, merged)] = new_id
    return _like(p, pred, new_id)


def _like(values: np.ndarray, ref: ArrayLike, largest: int) -> ArrayLike:
    """``values`` (int64) as the type, device and dtype of ``ref`` (int64 if it cannot hold
    ``largest``)."""
    if isinstance(ref, torch.Tensor):
        out = torch.from_numpy(values)
        fits = largest <= torch.iinfo(ref.dtype).max
        return out.to(device=ref.device, dtype=ref.dtype if fits else torch.int64)
    fits = largest <= np.iinfo(ref.dtype).max
    return values.astype(ref.dtype if fits else np.int64, copy=False)
