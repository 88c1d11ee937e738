"""Quantize target: LISA (``maskport_lisa`` exports).

The quantized modules are the Llama decoder's linears (``mllm.model.language_model.layers``); CLIP, the projector,
``lm_head``, SAM and ``text_hidden_fcs`` stay floating point. Calibration batch (what ``predict_forward`` feeds the
MLLM, plus the answer): LISA's ``llava_v1`` prompt with ``<im_start>`` + the image's placeholder ids + ``<im_end>``,
encoded as LISA's slow tokenizer encodes it, then the answer; ``pixel_values`` from the export's CLIP preprocessing.
CLIP gives a fixed number of image tokens (256 at 224 px): a sample whose sequence would exceed ``max_seq_len`` is
skipped, not shrunk.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ...quantize.targets import ImageBatch, QuantTarget
from .spec import SPEC


def _module_of(model):
    return sys.modules[type(model).__module__]


def _ids(model, tokenizer, prompt: str, answer_text: str, with_image: bool) -> list[int]:
    mod = _module_of(model)
    tpl = model.config.template
    text = mod.build_prompt(tpl, prompt, "", with_image=with_image)
    ids = mod.lisa_prompt_ids(tokenizer, text, image_placeholder=tpl["image_placeholder"],
                              image_token_id=model.config.mllm_config.image_token_id,
                              image_tokens=model.image_seq_length, stripped_tokens=list(model.config.added_tokens))
    answer = answer_text.strip()
    if answer:
        ids += mod.lisa_prompt_ids(tokenizer, answer, image_placeholder=tpl["image_placeholder"],
                                   image_token_id=model.config.mllm_config.image_token_id, image_tokens=0,
                                   stripped_tokens=list(model.config.added_tokens))[1:]  # no second BOS
    return ids


def _batch(ids: list[int]) -> dict[str, torch.Tensor]:
    t = torch.tensor([ids], dtype=torch.long)
    return {"input_ids": t, "attention_mask": torch.ones_like(t)}


def register_gptqmodel_llava() -> None:
    """GPTQModel has no definition for transformers' native ``llava``; its module tree is the one of its native
    ``internvl`` definition (``model.language_model.layers`` of Llama-style blocks, ``model.vision_tower``,
    ``model.multi_modal_projector``, ``lm_head``): register that definition under ``llava`` for this process (without
    a processor: maskport hands GPTQModel ready batches)."""
    from gptqmodel.models import auto
    from gptqmodel.models.definitions.internvl import InternVLQModel

    if "llava" in auto.MODEL_MAP:
        return

    class LlavaQModel(InternVLQModel):
        require_load_processor = False

    auto.MODEL_MAP["llava"] = LlavaQModel
    if "llava" not in auto.SUPPORTED_MODELS:
        auto.SUPPORTED_MODELS.append("llava")


class LisaTarget(QuantTarget):
    spec = SPEC
    excluded_prefixes = ("mllm.model.vision_tower", "mllm.model.multi_modal_projector", "mllm.lm_head", "sam",
                         "text_hidden_fcs")
    standalone_excluded = ("model.vision_tower", "model.multi_modal_projector", "lm_head")
    vision_prefixes = ("mllm.model.vision_tower.", "mllm.model.multi_modal_projector.")

    def stage(self, model, tokenizer, folder: Path) -> None:
        """A plain LLaVA folder: ``LlavaForConditionalGeneration`` + tokenizer (GPTQModel's ``llava`` definition)."""
        register_gptqmodel_llava()
        model.mllm.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    def text_batch(self, model, tokenizer, prompt, answer_text):
        return _batch(_ids(model, tokenizer, prompt, answer_text, with_image=False))

    def image_batch(self, model, tokenizer, prompt, answer_text, image, max_seq_len):
        mod = _module_of(model)
        ids = _ids(model, tokenizer, prompt, answer_text, with_image=True)
        if len(ids) > max_seq_len:
            return None
        pixel_values = mod.clip_preprocess(image, model.config.image_processor)
        return ImageBatch({**_batch(ids), "pixel_values": pixel_values}, model.image_seq_length, False)


TARGET = LisaTarget()
