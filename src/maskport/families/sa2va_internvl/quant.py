"""Quantize target: Sa2VA on InternVL (``maskport_sa2va_internvl`` exports: Qwen2 or Llama-layout InternLM2 text
models inside transformers' native ``InternVLForConditionalGeneration``).

Calibration batch (what ``predict_forward`` feeds the MLLM, plus the answer), e.g. with ``internlm2_chat``:

    [BOS]<|im_start|>user\\n<img><IMG_CONTEXT> * 256 * n_tiles</img>\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n
    {answer}<|im_end|>

with ``pixel_values`` = the export's InternVL dynamic tiles (448 px, 1..``max_dynamic_patch`` + thumbnail). When
the sequence would exceed ``max_seq_len``, the image is tiled with a smaller maximum number of tiles (each tile is
``image_seq_length`` tokens); a sample whose single tile does not fit is skipped.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ...quantize.targets import ImageBatch, QuantTarget, encode
from .spec import SPEC


def _module_of(model):
    return sys.modules[type(model).__module__]


class Sa2VAInternVLTarget(QuantTarget):
    spec = SPEC
    excluded_prefixes = ("mllm.model.vision_tower", "mllm.model.multi_modal_projector", "mllm.lm_head", "sam2",
                         "text_hidden_fcs")
    standalone_excluded = ("model.vision_tower", "model.multi_modal_projector", "lm_head")
    vision_prefixes = ("mllm.model.vision_tower.", "mllm.model.multi_modal_projector.")

    def stage(self, model, tokenizer, folder: Path) -> None:
        """A plain InternVL folder (``InternVLForConditionalGeneration`` + tokenizer + ``InternVLProcessor``), as
        the ``-hf`` InternVL releases are laid out: the tokenizer names its image tokens (``start_image_token``,
        ``end_image_token``, ``context_image_token``, ``video_token``) so that transformers' processor loads."""
        from transformers import AutoTokenizer, InternVLProcessor
        from transformers.models.got_ocr2 import GotOcr2ImageProcessor

        s = model.config.image_processor
        model.mllm.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        # InternVLProcessor requires a video_token; the exports have none (no video support) and adding one would
        # grow the vocabulary, so it names the image context token: image prompts are tokenised as in -hf releases
        names = {"start_image_token": s["img_start_token"], "end_image_token": s["img_end_token"],
                 "context_image_token": s["img_context_token"], "video_token": s["img_context_token"]}
        tok = AutoTokenizer.from_pretrained(folder, extra_special_tokens=names)
        if len(tok) != len(tokenizer):
            raise RuntimeError(f"staging the tokenizer changed its size ({len(tokenizer)} -> {len(tok)})")
        size = int(s["image_size"])
        ip = GotOcr2ImageProcessor(size={"height": size, "width": size}, crop_to_patches=True,
                                   min_patches=int(s["min_dynamic_patch"]), max_patches=int(s["max_dynamic_patch"]),
                                   image_mean=list(s["image_mean"]), image_std=list(s["image_std"]))
        kwargs = {}
        try:
            from transformers import InternVLVideoProcessor

            kwargs["video_processor"] = InternVLVideoProcessor()
        except Exception:  # noqa: BLE001 - e.g. no torchvision: the processor is saved without one
            kwargs.clear()
        tok.save_pretrained(folder)
        InternVLProcessor(image_processor=ip, tokenizer=tok, image_seq_length=int(model.config.mllm_config.image_seq_length),
                          **kwargs).save_pretrained(folder)

    def _prompt(self, model, prompt: str, image_tokens: str | None) -> str:
        mod = _module_of(model)
        return mod.build_prompt(model.config.template, prompt, "", image_tokens,
                                model.config.image_processor.get("image_placeholder", "<image>"))

    def text_batch(self, model, tokenizer, prompt, answer_text):
        return encode(tokenizer, self._prompt(model, prompt, None) + answer_text, bos=model.config.add_bos_token)

    def image_batch(self, model, tokenizer, prompt, answer_text, image, max_seq_len):
        mod = _module_of(model)
        s = model.config.image_processor
        per_tile = int(model.config.mllm_config.image_seq_length)
        bos = bool(model.config.add_bos_token)
        text_len = encode(tokenizer, self._prompt(model, prompt, model.image_token_string(0)) + answer_text,
                          bos=bos)["input_ids"].shape[1]
        room = max_seq_len - text_len
        rgb = mod.to_rgb(image)
        lo, hi = int(s["min_dynamic_patch"]), int(s["max_dynamic_patch"])

        def tiles(max_num: int):
            return mod.dynamic_tiles(rgb, min(lo, max_num), max_num, int(s["image_size"]), bool(s["use_thumbnail"]))

        full = len(tiles(hi))
        chosen = None
        for max_num in range(hi, 0, -1):
            t = tiles(max_num)
            if len(t) * per_tile <= room:
                chosen = t
                break
        if chosen is None:
            return None
        pixel_values = mod.tiles_to_pixel_values(chosen, int(s["image_size"]), s["image_mean"], s["image_std"])
        enc = encode(tokenizer, self._prompt(model, prompt, model.image_token_string(len(chosen))) + answer_text,
                     bos=bos)
        if enc["input_ids"].shape[1] > max_seq_len:
            return None
        return ImageBatch({**enc, "pixel_values": pixel_values}, len(chosen) * per_tile, len(chosen) != full)


TARGET = Sa2VAInternVLTarget()
