"""Calibration batches for the language model, built by the export's own preprocessing.

Each sample of the user's JSONL (the format ``maskport verify`` reads) becomes one batch for the Qwen2.5-VL
MLLM, exactly as ``predict_forward`` would feed it, plus the answer teacher-forced after the assistant prefix:

    <system><user><|vision_start|><|image_pad|> * N<|vision_end|>{prompt}<|im_end|>\\n<|im_start|>assistant\\n
    {answer}<|im_end|>

``pixel_values``/``image_grid_thw`` come from the export's Qwen2-VL image processing (``_mllm_image_inputs``),
so the decoder layers see real image-token activations and the hidden state of ``[SEG]``, which is what the
masks are made from. ``answer`` is the sample's ``answer`` field, else ``"Sure, [SEG]."`` (Sa2VA's answer for a
referring-segmentation prompt).

``max_seq_len``: when a sample is longer (large images make thousands of image tokens), the image is given a
smaller pixel budget so that the sequence fits (recorded per sample as ``image_tokens``); a sample whose text
alone exceeds the limit is skipped. The text-only fallback (``text_only=True``) drops the images and
calibrates on the prompts + answers; it is only used when asked for.
"""

from __future__ import annotations

import sys
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


def _module_of(model):
    return sys.modules[type(model).__module__]


def _answer_text(template: dict, answer: str | None) -> str:
    return (answer if answer is not None else DEFAULT_ANSWER) + (template.get("suffix") or "")


def _image_inputs_within(model, image, max_image_tokens: int) -> dict[str, torch.Tensor]:
    """The export's image preprocessing with a pixel budget of at most ``max_image_tokens`` merged tokens."""
    s = model.config.image_processor
    merge = int(s["merge_size"])
    factor = int(s["patch_size"]) * merge
    mm = model._mllm_image_inputs(image)
    n = int(mm["image_grid_thw"].prod(dim=-1).sum().item()) // (merge * merge)
    if n <= max_image_tokens:
        return mm
    budget = max(1, max_image_tokens) * factor * factor
    ip = model._qwen_image_processor()
    mod = _module_of(model)
    rgb = mod.to_rgb(image)
    h, w = mod.smart_resize(rgb.height, rgb.width, factor=factor, min_pixels=factor * factor,
                            max_pixels=budget)
    if (w, h) != rgb.size:
        rgb = rgb.resize((w, h), resample=mod.Image.BICUBIC)
    out = ip(images=[rgb], return_tensors="pt", min_pixels=factor * factor, max_pixels=budget)
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


def build_calibration(model, tokenizer, samples: list | None, *, n_samples: int = 128, max_seq_len: int = 2048,
                      text_only: bool = False, log=print) -> CalibrationSet:
    """Calibration batches (``input_ids``, ``attention_mask``[, ``pixel_values``, ``image_grid_thw``]) for
    ``model.mllm``; ``model`` is the loaded unquantized export (``Sa2VAQwenModel``)."""
    mod = _module_of(model)
    template = model.config.template
    merge = int(model.config.image_processor["merge_size"])
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

    def encode(text: str) -> dict[str, torch.Tensor]:
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        return {"input_ids": enc["input_ids"], "attention_mask": torch.ones_like(enc["input_ids"])}

    for sid, sample, prompt, answer in items:
        answer_text = _answer_text(template, answer)
        if text_only or sample is None:
            enc = encode(mod.build_prompt(template, prompt, "", None) + answer_text)
            if enc["input_ids"].shape[1] > max_seq_len:
                skipped.append(sid)
                continue
            batches.append(enc)
            tokens += enc["input_ids"].shape[1]
            continue
        text_len = encode(mod.build_prompt(template, prompt, "", 0) + answer_text)["input_ids"].shape[1]
        room = max_seq_len - text_len
        if room < 4:
            skipped.append(sid)
            continue
        image = sample.image()
        mm = _image_inputs_within(model, image, room)
        n_img = int(mm["image_grid_thw"].prod(dim=-1).sum().item()) // (merge * merge)
        full = model._mllm_image_inputs(image)
        if int(full["image_grid_thw"].prod(dim=-1).sum().item()) // (merge * merge) != n_img:
            reduced.append(sid)
        enc = encode(mod.build_prompt(template, prompt, "", n_img) + answer_text)
        if enc["input_ids"].shape[1] > max_seq_len:
            skipped.append(sid)
            continue
        batches.append({**enc, "pixel_values": mm["pixel_values"], "image_grid_thw": mm["image_grid_thw"]})
        tokens += enc["input_ids"].shape[1]
        image_tokens += n_img

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
        log(f"calibration: {len(reduced)} image(s) given a smaller pixel budget to fit --max-seq-len")
    return CalibrationSet(batches, stats)


def _count_seg(batches, model, tokenizer) -> int:
    seg = tokenizer.convert_tokens_to_ids(model.config.seg_token)
    if not isinstance(seg, int) or seg < 0:
        return 0
    return sum(int((b["input_ids"] == seg).any()) for b in batches)


__all__ = ["BUILTIN_TEXT_PROMPTS", "DEFAULT_ANSWER", "CalibrationSet", "build_calibration"]
