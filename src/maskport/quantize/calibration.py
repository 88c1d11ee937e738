"""Calibration batches for the language model, built by the export's own preprocessing.

Each sample of the user's JSONL (the format ``maskport verify`` reads) becomes one batch for the export's MLLM,
exactly as ``predict_forward`` would feed it, plus the answer teacher-forced after the assistant prefix (the
family's :class:`~maskport.quantize.targets.QuantTarget` builds it: Qwen2.5-VL image tokens and
``image_grid_thw``, or InternVL's dynamic tiles), so the decoder layers see real image-token activations and the
hidden state of ``[SEG]``, which is what the masks are made from. ``answer`` is the sample's ``answer`` field,
else ``"Sure, [SEG]."`` (Sa2VA's answer for a referring-segmentation prompt), followed by the template's suffix.

``max_seq_len``: when a sample is longer (large images make thousands of image tokens), the image is given fewer
tokens so that the sequence fits (recorded per sample); a sample that cannot fit is skipped. The text-only
fallback (``text_only=True``) drops the images and calibrates on the prompts + answers; it is only used when
asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

DEFAULT_ANSWER = "Sure, [SEG]."
# used by the text-only fallback when no sample file is given
BUILTIN_TEXT_PROMPTS = [
    "Please segment the person on the left.", "Can you segment the red car in this image?",
    "Segment the dog lying on the grass.", "Where is the cup? Please respond with a segmentation mask.",
    "Please segment the tallest building.", "What is the object on the table? Please segment it.",
    "Segment the white cat near the window.", "Please segment the vessel in the scan.",
]


@dataclass
class CalibrationSet:
    batches: list[dict[str, torch.Tensor]]
    stats: dict[str, Any] = field(default_factory=dict)


def _answer_text(template: dict, answer: str | None) -> str:
    return (answer if answer is not None else DEFAULT_ANSWER) + (template.get("suffix") or "")


def build_calibration(model, tokenizer, samples: list | None, *, n_samples: int = 128, max_seq_len: int = 2048,
                      text_only: bool = False, log=print) -> CalibrationSet:
    """Calibration batches (``input_ids``, ``attention_mask`` and the family's image inputs) for ``model.mllm``;
    ``model`` is the loaded unquantized export."""
    from .targets import target_for

    target = target_for(getattr(model.config, "model_type", None))
    template = model.config.template
    batches: list[dict[str, torch.Tensor]] = []
    skipped: list[str] = []
    reduced: list[str] = []
    tokens = 0
    image_tokens = 0

    if samples is None:
        if not text_only:
            raise ValueError("no calibration samples: pass --calib samples.jsonl (or --calib-text-only)")
        items = [(f"builtin-{i}", None, p, None) for i, p in enumerate(BUILTIN_TEXT_PROMPTS)]
    else:
        items = [(s.id, s, s.prompt, getattr(s, "answer", None)) for s in samples]
    items = items[: max(1, int(n_samples))]

    for sid, sample, prompt, answer in items:
        answer_text = _answer_text(template, answer)
        if text_only or sample is None:
            enc = target.text_batch(model, tokenizer, prompt, answer_text)
            if enc["input_ids"].shape[1] > max_seq_len:
                skipped.append(sid)
                continue
            batches.append(enc)
            tokens += enc["input_ids"].shape[1]
            continue
        got = target.image_batch(model, tokenizer, prompt, answer_text, sample.image(), max_seq_len)
        if got is None:
            skipped.append(sid)
            continue
        if got.reduced:
            reduced.append(sid)
        batches.append(got.batch)
        tokens += got.batch["input_ids"].shape[1]
        image_tokens += got.image_tokens

    if not batches:
        raise ValueError(f"no calibration sample fits --max-seq-len {max_seq_len} ({len(skipped)} skipped)")
    stats = {
        "source": "text-only" if (text_only or samples is None) else "samples",
        "samples": len(batches), "skipped_too_long": skipped, "image_budget_reduced": reduced,
        "tokens": tokens, "image_tokens": image_tokens, "max_seq_len": int(max_seq_len),
        "mean_tokens": round(tokens / len(batches), 1), "answer_default": DEFAULT_ANSWER,
        "seg_token_in_every_batch": _count_seg(batches, model, tokenizer) == len(batches),
    }
    if skipped:
        log(f"calibration: skipped {len(skipped)} sample(s) longer than --max-seq-len {max_seq_len}")
    if reduced:
        log(f"calibration: {len(reduced)} image(s) given fewer tokens to fit --max-seq-len")
    return CalibrationSet(batches, stats)


def _count_seg(batches, model, tokenizer) -> int:
    seg = tokenizer.convert_tokens_to_ids(model.config.seg_token)
    if not isinstance(seg, int) or seg < 0:
        return 0
    return sum(int((b["input_ids"] == seg).any()) for b in batches)


__all__ = ["BUILTIN_TEXT_PROMPTS", "DEFAULT_ANSWER", "CalibrationSet", "build_calibration"]
