"""Mask metrics. Masks are boolean arrays of the same shape.

- IoU = |A ∩ B| / |A ∪ B|; two empty masks count 1 (they agree perfectly).
- Dice = 2|A ∩ B| / (|A| + |B|); two empty masks count 1.
- gIoU = mean over samples of per-sample IoU.
- cIoU = total intersection / total union over the set (0 when both totals are 0 is not possible unless every
  mask is empty, which counts 1).

``set_scores_from_counts`` computes the same from per-sample (intersection, union) counts; ``distribution`` gives
mean/min/percentiles; ``edit_distance`` is the Levenshtein distance between two answers.
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
    return set_scores_from_counts(intersection_union(pred, gt) for pred, gt in pairs)


def set_scores_from_counts(counts: Iterable[tuple[int, int]]) -> SetScores:
    """gIoU and cIoU from per-sample (intersection, union) pixel counts (what a report keeps per sample)."""
    ious, inter_total, union_total, n = [], 0, 0, 0
    for inter, union in counts:
        inter, union = int(inter), int(union)
        ious.append(1.0 if union == 0 else inter / union)
        inter_total += inter
        union_total += union
        n += 1
    if n == 0:
        raise ValueError("no samples")
    return SetScores(giou=float(np.mean(ious)), ciou=1.0 if union_total == 0 else inter_total / union_total, n=n)


def distribution(values: Iterable[float]) -> dict[str, float | int] | None:
    """mean, min, max and the 5th/50th/95th percentiles (numpy's linear interpolation); None for no values."""
    v = np.asarray([float(x) for x in values], dtype=np.float64)
    if v.size == 0:
        return None
    p5, p50, p95 = np.percentile(v, [5, 50, 95])
    return {"n": int(v.size), "mean": float(v.mean()), "min": float(v.min()), "p5": float(p5), "p50": float(p50),
            "p95": float(p95), "max": float(v.max())}


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance in characters (insert, delete, substitute: cost 1 each).

    One numpy pass per character of ``a``: the insertion chain ``row[j] = min(row[j], row[j-1] + 1)`` is the
    running minimum of ``row[k] - k`` shifted back by ``j``, so long answers stay fast.
    """
    if a == b:
        return 0
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    codes_b = np.frombuffer(b.encode("utf-32-le"), dtype=np.uint32)
    j = np.arange(len(b) + 1, dtype=np.int64)
    row = j.copy()
    for i, ch in enumerate(a, 1):
        cost = (codes_b != ord(ch)).astype(np.int64)
        new = np.empty_like(row)
        new[0] = i
        new[1:] = np.minimum(row[1:] + 1, row[:-1] + cost)   # deletion, substitution/match
        row = np.minimum.accumulate(new - j) + j              # insertions
    return int(row[-1])
