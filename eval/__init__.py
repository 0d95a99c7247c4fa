"""Evaluation protocol: per-image Hungarian matching (ACC / mIoU) and scoring of saved predictions.

``eval.metrics`` needs only numpy, scipy and torch; ``python -m eval.score`` scores a folder of
segment PNGs against a benchmark's labels (it reads them with ``diffseg.data``).
See eval/README.md for the protocol.
"""

from eval.metrics import HungarianMetrics, ImageMatch, confusion_matrix, json_safe, match_image

__all__ = ["HungarianMetrics", "ImageMatch", "confusion_matrix", "json_safe", "match_image"]
