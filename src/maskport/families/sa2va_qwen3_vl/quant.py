"""Quantize target: Sa2VA on Qwen3-VL (``maskport_sa2va_qwen3_vl`` exports).

Calibration batch (what ``predict_forward`` feeds the MLLM, plus the answer):

    <|im_start|>user\\n<|vision_start|><|image_pad|> * N<|vision_end|>{prompt}<|im_end|>\\n<|im_start|>assistant\\n
    {answer}<|im_end|>

with ``pixel_values``/``image_grid_thw`` from the export's Qwen3-VL image processing and the
``mm_token_type_ids`` Qwen3-VL's M-RoPE needs (``_mllm_image_inputs``). When
the sequence would exceed ``max_seq_len`` the image gets a smaller pixel budget (fewer merged tokens).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ...quantize.targets import ImageBatch, QuantTarget, encode
from .spec import SPEC


def _module_of(model):
    return sys.modules[type(model).__module__]


def _n_image_tokens(mm, merge: int) -> int:
    return int(mm["image_grid_thw"].prod(dim=-1).sum().item()) // (merge * merge)


class Sa2VAQwen3VLTarget(QuantTarget):
    spec = SPEC
    excluded_prefixes = ("mllm.model.visual", "mllm.lm_head", "sam2", "text_hidden_fcs")
    standalone_excluded = ("model.visual", "lm_head")
    vision_prefixes = ("mllm.model.visual.",)
    # measured with GPTQModel 7.6.0 on the tiny fixture: its AWQ scales the attention's per-head k_norm (head_dim
    # wide) as if it fed o_proj (hidden wide) and stops with "The size of tensor a (16) must match the size of
    # tensor b (64)"; GPTQ quantizes and predicts
    unsupported_methods = {"awq": "GPTQModel's AWQ fails on Qwen3-VL's decoder (it pairs the per-head k_norm with "
                                  "o_proj: a shape error, seen with GPTQModel 7.6); use --method gptq"}

    def stage(self, model, tokenizer, folder: Path) -> None:
        """A plain Qwen3-VL folder: ``Qwen3VLForConditionalGeneration`` + tokenizer + processor."""
        from transformers import Qwen3VLProcessor

        model.mllm.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        kwargs = {}
        try:
            from transformers import Qwen3VLVideoProcessor

            kwargs["video_processor"] = Qwen3VLVideoProcessor()
        except Exception:  # noqa: BLE001 - e.g. no torchvision: the processor is saved without one
            kwargs.clear()
        Qwen3VLProcessor(image_processor=model._qwen_image_processor(), tokenizer=tokenizer,
                            **kwargs).save_pretrained(folder)

    def text_batch(self, model, tokenizer, prompt, answer_text):
        mod = _module_of(model)
        return encode(tokenizer, mod.build_prompt(model.config.template, prompt, "", None) + answer_text)

    def image_batch(self, model, tokenizer, prompt, answer_text, image, max_seq_len):
        mod = _module_of(model)
        template = model.config.template
        merge = int(model.config.image_processor["merge_size"])
        text_len = encode(tokenizer, mod.build_prompt(template, prompt, "", 0) + answer_text)["input_ids"].shape[1]
        room = max_seq_len - text_len
        if room < 4:
            return None
        full = model._mllm_image_inputs(image)
        mm = full if _n_image_tokens(full, merge) <= room else self._within(model, image, room)
        n_img = _n_image_tokens(mm, merge)
        enc = encode(tokenizer, mod.build_prompt(template, prompt, "", n_img) + answer_text)
        if enc["input_ids"].shape[1] > max_seq_len:
            return None
        return ImageBatch({**enc, "pixel_values": mm["pixel_values"], "image_grid_thw": mm["image_grid_thw"],
                           **model.token_inputs(enc["input_ids"])},
                          n_img, n_img != _n_image_tokens(full, merge))

    @staticmethod
    def _within(model, image, max_image_tokens: int):
        """The export's image preprocessing with a pixel budget of at most ``max_image_tokens`` merged tokens."""
        s = model.config.image_processor
        factor = int(s["patch_size"]) * int(s["merge_size"])
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


TARGET = Sa2VAQwen3VLTarget()
