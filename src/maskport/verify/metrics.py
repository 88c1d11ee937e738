"""Mask metrics. Masks are boolean arrays of the same shape.

- IoU = |A ∩ B| / |A ∪ B|; two empty masks count 1 (they agree perfectly).
- Dice = 2|A ∩ B| / (|A| + |B|); two empty masks count 1.
- gIoU = mean over samples of per-sample IoU.
- cIoU = total intersection / total union over the set (0 when both totals are 0 is not possible unless every
  mask is empty, which counts 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    return a, b


def intersection_union(a, b) -> tuple[int, int]:
    a, b = _pair(a, b)
    return int(np.logical_and(a, b).sum()), int(np.logical_or(a, b).sum())


def iou(a, b) -> float:
    inter, union = intersection_union(a, b)
    return 1.0 if union == 0 else inter / union


def dice(a, b) -> float:
    a, b = _pair(a, b)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


@dataclass
class SetScores:
    giou: float
    ciou: float
    n: int


def set_scores(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> SetScores:
    """gIoU and cIoU over (prediction, target) pairs."""
    ious, inter_total, union_total, n = [], 0, 0, 0
    for pred, gt in pairs:
        inter, union = intersection_union(pred, gt)
        ious.append(1.0 if union == 0 else inter / union)
        inter_total += inter
        union_total += union
        n += 1
    if n == 0:
        raise ValueError("no samples")
    return SetScores(giou=float(np.mean(ious)), ciou=1.0 if union_total == 0 else inter_total / union_total, n=n)
