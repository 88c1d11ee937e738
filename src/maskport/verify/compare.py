"""Per-sample comparison of REF and CAND, the summary over samples, and the gate.

Policies (also written into every report):

- Multiple ``[SEG]``: mask *i* of REF is compared with mask *i* of CAND, for i up to the larger of the two
  counts; a mask one model did not return is an empty mask. A sample's Dice/IoU is the mean over its mask pairs.
  A sample where neither model returned a mask compares one empty mask with another (Dice 1).
- No mask: counts as an empty mask -- never skipped, never replaced -- and the sample is flagged
  ``ref_no_mask`` / ``cand_no_mask``.
- Ground truth: the first ``[SEG]``'s mask (empty when there is none) is compared with the GT mask. Not the
  union of all masks: a model must not gain by emitting more ``[SEG]`` tokens.
- ``max_abs_dprob``: max |p_REF - p_CAND| over the pixels of the mask pairs both models returned, when both
  returned probability maps; None otherwise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import MissingInput, UnreadableFile
from .metrics import dice, distribution, edit_distance, intersection_union, set_scores_from_counts
from .predictor import Prediction

MULTI_SEG_POLICY = ("mask i of REF vs mask i of CAND for i < max(count REF, count CAND); a missing mask is an empty "
                    "mask; sample Dice/IoU = mean over its mask pairs; no mask from either model = one empty pair")
GT_POLICY = "first [SEG] mask of each model vs GT (no mask = empty mask); gIoU = mean IoU, cIoU = sum I / sum U"
NO_MASK_POLICY = "a model that returns no mask for a sample gets an empty mask there; the sample is flagged"

FLAGS = {
    "ref_no_mask": "REF returned no mask (counted as an empty mask)",
    "cand_no_mask": "CAND returned no mask (counted as an empty mask)",
    "seg_count_mismatch": "REF and CAND returned different numbers of masks",
    "text_mismatch": "the answers differ",
    "multi_seg": "a model returned more than one mask",
    "ref_over_budget": "REF took longer than the time budget (generation was cut)",
    "cand_over_budget": "CAND took longer than the time budget (generation was cut)",
}


@dataclass
class Thresholds:
    """The gate. ``min_dice``: mean Dice REF vs CAND must be at least this. ``max_giou_drop``: gIoU(REF, GT) -
    gIoU(CAND, GT) must be at most this (only with GT). ``max_text_mismatch``: the share of samples whose answers
    differ must be at most this."""

    min_dice: float = 0.95
    max_giou_drop: float = 0.02
    max_text_mismatch: float = 0.10

    def __post_init__(self):
        for name in ("min_dice", "max_text_mismatch"):
            v = getattr(self, name)
            if not 0.0 <= float(v) <= 1.0:
                raise MissingInput(f"--{name.replace('_', '-')} must be between 0 and 1, got {v}")
        if not -1.0 <= float(self.max_giou_drop) <= 1.0:
            raise MissingInput(f"--max-giou-drop must be between -1 and 1, got {self.max_giou_drop}")

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def _gt_scores(pred: Prediction, gt: np.ndarray) -> dict[str, Any]:
    first = pred.masks[0] if pred.masks else np.zeros_like(gt)
    inter, union = intersection_union(first, gt)
    return {"iou": 1.0 if union == 0 else inter / union, "dice": dice(first, gt), "intersection": inter,
            "union": union}


def compare_sample(index: int, sample, ref: Prediction, cand: Prediction, gt: np.ndarray | None,
                   image_size: tuple[int, int], seg_token: str = "[SEG]") -> dict[str, Any]:
    """The per-sample record (JSON-ready)."""
    h, w = image_size
    empty = np.zeros((h, w), dtype=bool)
    n_pairs = max(len(ref.masks), len(cand.masks), 1)
    pairs = []
    for i in range(n_pairs):
        a = ref.masks[i] if i < len(ref.masks) else empty
        b = cand.masks[i] if i < len(cand.masks) else empty
        inter, union = intersection_union(a, b)
        dprob = None
        if (ref.probabilities is not None and cand.probabilities is not None and i < len(ref.masks)
                and i < len(cand.masks)):
            dprob = float(np.abs(ref.probabilities[i].astype(np.float64)
                                 - cand.probabilities[i].astype(np.float64)).max())
        pairs.append({"i": i, "ref_present": i < len(ref.masks), "cand_present": i < len(cand.masks),
                      "ref_area": int(a.sum()), "cand_area": int(b.sum()), "intersection": inter, "union": union,
                      "iou": 1.0 if union == 0 else inter / union, "dice": dice(a, b), "max_abs_dprob": dprob})
    dprobs = [p["max_abs_dprob"] for p in pairs if p["max_abs_dprob"] is not None]
    flags = []
    if not ref.masks:
        flags.append("ref_no_mask")
    if not cand.masks:
        flags.append("cand_no_mask")
    if len(ref.masks) != len(cand.masks):
        flags.append("seg_count_mismatch")
    if ref.answer != cand.answer:
        flags.append("text_mismatch")
    if len(ref.masks) > 1 or len(cand.masks) > 1:
        flags.append("multi_seg")
    if ref.over_budget:
        flags.append("ref_over_budget")
    if cand.over_budget:
        flags.append("cand_over_budget")
    rec: dict[str, Any] = {
        "index": index, "id": sample.id, "image": str(sample.image_path), "prompt": sample.prompt,
        "image_size": [h, w],
        "dice": float(np.mean([p["dice"] for p in pairs])), "iou": float(np.mean([p["iou"] for p in pairs])),
        "max_abs_dprob": max(dprobs) if dprobs else None,
        "text_equal": ref.answer == cand.answer, "edit_distance": edit_distance(ref.answer, cand.answer),
        "seg_count_agree": len(ref.masks) == len(cand.masks),
        "flags": flags, "pairs": pairs,
        "ref": {"answer": ref.answer, "n_masks": len(ref.masks), "n_seg_tokens": ref.answer.count(seg_token)},
        "cand": {"answer": cand.answer, "n_masks": len(cand.masks), "n_seg_tokens": cand.answer.count(seg_token)},
        "has_gt": gt is not None,
    }
    if gt is not None:
        gt = np.asarray(gt, dtype=bool)
        if gt.shape != (h, w):
            raise UnreadableFile(f"sample {sample.id}: GT mask is {gt.shape[0]} x {gt.shape[1]} but the image is "
                                 f"{h} x {w}")
        rec["gt_area"] = int(gt.sum())
        rec["ref"]["gt"] = _gt_scores(ref, gt)
        rec["cand"]["gt"] = _gt_scores(cand, gt)
    return rec


def worst_first_key(rec: dict[str, Any]):
    gt_drop = rec["ref"]["gt"]["iou"] - rec["cand"]["gt"]["iou"] if rec["has_gt"] else 0.0
    return (rec["dice"], rec["iou"], -gt_drop, rec["text_equal"], -rec["edit_distance"], rec["index"])


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Summary over per-sample records (any order; the result does not depend on it)."""
    records = sorted(records, key=lambda r: r["index"])
    n = len(records)
    if n == 0:
        raise UnreadableFile("no samples to compare")
    flag_counts = {f: sum(f in r["flags"] for r in records) for f in FLAGS}
    dprobs = [r["max_abs_dprob"] for r in records if r["max_abs_dprob"] is not None]
    all_pairs = [p for r in records for p in r["pairs"]]
    summary: dict[str, Any] = {
        "n_samples": n,
        "dice": distribution(r["dice"] for r in records),
        "iou": distribution(r["iou"] for r in records),
        "pair_dice": distribution(p["dice"] for p in all_pairs),
        "max_abs_dprob": None if not dprobs else {"max": max(dprobs), "mean": float(np.mean(dprobs)),
                                                  "p95": float(np.percentile(dprobs, 95)), "n": len(dprobs)},
        "text_mismatch_rate": sum(not r["text_equal"] for r in records) / n,
        "text_mismatches": sum(not r["text_equal"] for r in records),
        "mean_edit_distance": float(np.mean([r["edit_distance"] for r in records])),
        "seg_count_agreement_rate": sum(r["seg_count_agree"] for r in records) / n,
        "no_mask": {"ref": flag_counts["ref_no_mask"], "cand": flag_counts["cand_no_mask"]},
        "flags": flag_counts,
        "multi_seg": {
            "policy": MULTI_SEG_POLICY,
            "samples_with_multiple_masks": flag_counts["multi_seg"],
            "mask_pairs": len(all_pairs),
            "pairs_missing_on_one_side": sum(p["ref_present"] != p["cand_present"] for p in all_pairs),
        },
        "gt": None,
    }
    with_gt = [r for r in records if r["has_gt"]]
    if with_gt:
        gt: dict[str, Any] = {"n": len(with_gt), "policy": GT_POLICY}
        for role in ("ref", "cand"):
            s = set_scores_from_counts((r[role]["gt"]["intersection"], r[role]["gt"]["union"]) for r in with_gt)
            gt[role] = {"giou": s.giou, "ciou": s.ciou,
                        "mean_dice": float(np.mean([r[role]["gt"]["dice"] for r in with_gt]))}
        gt["giou_drop"] = gt["ref"]["giou"] - gt["cand"]["giou"]
        gt["ciou_drop"] = gt["ref"]["ciou"] - gt["cand"]["ciou"]
        summary["gt"] = gt
    return summary


def gate(summary: dict[str, Any], thresholds: Thresholds) -> tuple[list[dict[str, Any]], list[str]]:
    """Each threshold checked; returns (gates, failures). A gate without data (no GT) passes, marked so."""
    gates = []
    d = summary["dice"]["mean"]
    gates.append({"name": "min_dice", "option": "--min-dice", "metric": "mean Dice REF vs CAND", "value": d,
                  "threshold": thresholds.min_dice, "comparison": ">=", "applicable": True,
                  "passed": d >= thresholds.min_dice})
    gt = summary["gt"]
    if gt is None:
        gates.append({"name": "max_giou_drop", "option": "--max-giou-drop",
                      "metric": "gIoU(REF, GT) - gIoU(CAND, GT)", "value": None,
                      "threshold": thresholds.max_giou_drop, "comparison": "<=", "applicable": False,
                      "passed": True, "note": "no sample has a GT mask"})
    else:
        gates.append({"name": "max_giou_drop", "option": "--max-giou-drop",
                      "metric": "gIoU(REF, GT) - gIoU(CAND, GT)", "value": gt["giou_drop"],
                      "threshold": thresholds.max_giou_drop, "comparison": "<=", "applicable": True,
                      "passed": gt["giou_drop"] <= thresholds.max_giou_drop})
    t = summary["text_mismatch_rate"]
    gates.append({"name": "max_text_mismatch", "option": "--max-text-mismatch",
                  "metric": "share of samples whose answers differ", "value": t,
                  "threshold": thresholds.max_text_mismatch, "comparison": "<=", "applicable": True,
                  "passed": t <= thresholds.max_text_mismatch})
    failures = []
    for g in gates:
        if not g["passed"]:
            op = "<" if g["comparison"] == ">=" else ">"
            failures.append(f"{g['name']}: {g['metric']} = {g['value']:.4f} {op} {g['threshold']:g} ({g['option']})")
    return gates, failures
