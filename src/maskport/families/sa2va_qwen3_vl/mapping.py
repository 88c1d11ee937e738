"""The mapping table of family ``sa2va-qwen3-vl``, top to bottom: training checkpoint + base Qwen3-VL + Meta SAM2
-> ``Sa2VAQwen3VLModel`` (``mllm.*`` = transformers' ``Qwen3VLForConditionalGeneration``, ``sam2.*`` =
``Sam2Model``, ``text_hidden_fcs.*``). Every key spelled out: ``docs/families/sa2va-qwen3-vl.mapping.tsv``.

Sources: ``ckpt`` (the training checkpoint), ``base`` (the base folder, keys in transformers' native layout),
``sam2`` (Meta's SAM2 checkpoint).
"""

from __future__ import annotations

from ...convert.rules import CopyRest, Drop, DropIfEqual, LoraMerge, Rename, Take
from ...heads import sam2 as sam2map

PEFT = "ckpt:mllm.model.base_model.model."     # peft wraps Qwen3VLForConditionalGeneration
LINEAR = "model.language_model.layers.{i}.{block}.{proj}"  # every LoRA-trained linear of the LLM


def rules(*, lora_scaling: float | None, base_has_lm_head: bool = True) -> list:
    """The mapping table, top to bottom. Targets are keys of ``Sa2VAQwen3VLModel``.

    ``lora_scaling``: peft's ``alpha / r`` (or ``alpha / sqrt(r)``), bound into every LoRA merge.

    ``base_has_lm_head``: False for a base that ties ``lm_head`` to ``embed_tokens`` and so saves no
    ``lm_head.weight`` (Qwen3-VL-3B): the trained ``modules_to_save`` copy then supersedes nothing in the base,
    and the export gets its own, untied ``lm_head``."""
    base_lm_head = ("base:lm_head.weight",) if base_has_lm_head else ()
    return [
        # 1. LoRA-trained linears of the LLM: base weight + (alpha / r) * B @ A, in float32
        LoraMerge(target="mllm." + LINEAR + ".weight",
                  base="base:" + LINEAR + ".weight",
                  a=PEFT + LINEAR + ".lora_A.default.weight",
                  b=PEFT + LINEAR + ".lora_B.default.weight", scaling=lora_scaling),
        # 2. modules_to_save: the trained copies replace the base tensors (and set the vocabulary size)
        Take(target="mllm.model.language_model.embed_tokens.weight",
             source=PEFT + "model.language_model.embed_tokens.modules_to_save.default.weight",
             replaces=("base:model.language_model.embed_tokens.weight",), optional=True),
        Take(target="mllm.lm_head.weight",
             source=PEFT + "lm_head.modules_to_save.default.weight",
             replaces=base_lm_head, optional=True),
        #    older (v1) checkpoints keep full trained copies directly under the peft prefix
        Take(target="mllm.model.language_model.embed_tokens.weight",
             source=PEFT + "model.language_model.embed_tokens.weight",
             replaces=("base:model.language_model.embed_tokens.weight",),
             why="trained full copy (v1 checkpoint) replaces the base tensor", optional=True),
        Take(target="mllm.lm_head.weight", source=PEFT + "lm_head.weight", replaces=base_lm_head,
             why="trained full copy (v1 checkpoint) replaces the base tensor", optional=True),
        #    frozen copies that some savers (DeepSpeed's module states) keep beside modules_to_save
        Drop(PEFT + "{rest}.original_module.weight",
             reason="frozen pre-training copy kept by peft modules_to_save; superseded by the trained copy",
             optional=True),
        #    frozen copies of base tensors (persistent buffers) that DeepSpeed's module state keeps: checked equal
        DropIfEqual(PEFT + "{rest}", equals="base:{rest}", reason=sam2map.FROZEN_COPY_REASON, optional=True),
        # 3. the [SEG] projection into SAM2's prompt space: Linear(C, C) -> ReLU -> Linear(C, 256) -> Dropout
        Rename(target="text_hidden_fcs.{rest}", source="ckpt:text_hidden_fcs.{rest}"),
        # 4. SAM2: Meta's keys -> transformers' Sam2Model; the mask decoder from the training checkpoint
        *sam2map.sam2_rules(target_prefix="sam2.", mask_decoder_from="ckpt:grounding_encoder.sam2_model."),
        # 5. everything else of the base MLLM (vision tower, merger, norms, untouched linears), unchanged
        CopyRest(target="mllm.{rest}", source="base:{rest}"),
    ]


def released_rules() -> list:
    """The table for a released Sa2VA folder (``maskport convert sa2va-hf-to-native``): ``base`` is the folder's
    LoRA-merged MLLM in transformers' names plus ``text_hidden_fcs.*``, ``sam2`` its whole SAM2 (trained mask decoder
    included) in Meta's names."""
    return [
        Rename(target="text_hidden_fcs.{rest}", source="base:text_hidden_fcs.{rest}"),
        *sam2map.sam2_rules(target_prefix="sam2."),
        CopyRest(target="mllm.{rest}", source="base:{rest}"),
    ]


def training_layout():
    """What a Sa2VA-Qwen3-VL training checkpoint holds (``maskport convert hf-to-mmengine`` inverts it), under the
    names Sa2VA's model loads ``pretrained_pth`` with: before it wraps LoRA, so the peft prefix
    ``mllm.model.base_model.model.`` is ``mllm.model.`` and adapted modules have their plain names."""
    from ...convert.inverse import TrainingLayout
    from .._common import PEFT_UNWRAP, TRAINING_PTH_FROZEN, TRAINING_PTH_NOTE

    return TrainingLayout(rules=rules(lora_scaling=None), source="ckpt",
                          renames=((PEFT.split(":", 1)[1], "mllm.model."), *PEFT_UNWRAP),
                          frozen_reason=TRAINING_PTH_FROZEN, notes=(TRAINING_PTH_NOTE,))
