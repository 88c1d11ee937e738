"""The mapping table of family ``lisa``, top to bottom: a LISA training run (or a released LISA folder) + the base
LLaVA folder + a CLIP folder + Meta's SAM -> ``LisaModel`` (``mllm.*`` = transformers'
``LlavaForConditionalGeneration``, ``sam.*`` = ``SamModel``, ``text_hidden_fcs.*``). Every key spelled out:
``docs/families/lisa.mapping.tsv``.

Sources (the family presents every input under LISA's own module names, ``LISAForCausalLM.state_dict()`` without
peft's wrapper):

- ``ckpt``: the training run's tensors, peft prefix ``base_model.model.`` removed and peft >= 0.7's
  ``.base_layer.`` folded (``model.layers.*``, ``model.embed_tokens.weight``, ``lm_head.weight``,
  ``model.mm_projector.*``, ``model.vision_tower.vision_tower.vision_model.*``, ``model.text_hidden_fcs.0.*``, the
  LoRA ``lora_A/B.default`` tensors); for a released folder the folder's ``model.*`` / ``lm_head.weight`` tensors;
- ``ckpt_sam``: the run's (or folder's) SAM, ``model.visual_model.*``, in Meta's names;
- ``base``: the base LLaVA folder (``model.*``, ``lm_head.weight``, ``model.mm_projector.*``), training runs only;
- ``clip``: a CLIP folder (``vision_model.*``; a full ``CLIPModel``'s text half is dropped with a reason);
- ``sam``: Meta's SAM checkpoint, when the run did not save SAM's frozen encoders;
- ``identity``: the identity matrix and zero bias of the projector's second linear (see ``docs/families/lisa.md``).

Which source gives a frozen part depends on what the run saved: DeepSpeed's module states hold the whole model
(frozen parts included), ``zero_to_fp32`` output holds the trainable tensors and, depending on DeepSpeed's version,
the frozen ones. The family looks, and the table reads each part from one place; an input that duplicates a part the
checkpoint holds is dropped whole with that reason.
"""

from __future__ import annotations

from ...convert.rules import CopyRest, Drop, DropIfEqual, DropRest, LoraMerge, Rename, Take
from ...heads import sam as sammap

LLM = "mllm.model.language_model."
CLIP_TARGET = "mllm.model.vision_tower."  # transformers 5: CLIPVisionModel has no vision_model level
PROJECTOR = "mllm.model.multi_modal_projector."
CKPT_CLIP = "model.vision_tower.vision_tower.vision_model."  # LLaVA's CLIPVisionTower(CLIPVisionModel)
LORA = "model.layers.{i}.{block}.{proj}"  # LISA's LoRA targets: self_attn.q_proj / v_proj (any decoder linear read)

SUPERSEDED_BY_CKPT = ("the training checkpoint holds its own copy of this part (DeepSpeed saved the frozen weights "
                      "too); the export takes the checkpoint's")
ROPE_BUFFER = ("RoPE inverse frequencies: a buffer transformers computes from the configuration (rope_theta), not "
               "a weight")
POSITION_IDS = "CLIP position ids: arange(num_positions), a buffer transformers builds itself"
CLIP_TEXT = "the CLIP text tower and projections: LLaVA uses CLIP's vision tower only"


def rules(*, lora_scaling: float | None, llm_from: str, projector_from: str, clip_from: str, sam_from: str,
          inputs: tuple[str, ...], base_has_lm_head: bool = True, src: str = "ckpt", src_sam: str = "ckpt_sam") -> list:
    """The mapping table. Targets are keys of ``LisaModel``.

    ``llm_from`` / ``projector_from`` / ``clip_from``: the source of the frozen LLM, of the projector, of CLIP
    (``ckpt`` when the checkpoint holds it, else ``base`` / ``clip``); ``sam_from``: ``ckpt_sam`` when the
    checkpoint holds SAM's image encoder (then the whole SAM is read from it), else ``sam`` (Meta's checkpoint, the
    mask decoder from ``ckpt_sam``). ``inputs``: the names of the sources given (an input whose part the checkpoint
    holds is dropped with :data:`SUPERSEDED_BY_CKPT`). ``lora_scaling``: peft's ``alpha / r`` bound into every
    merge (``None``: no LoRA in the checkpoint, e.g. a released folder). ``src`` / ``src_sam``: the names of the
    trained model's views (``ckpt`` / ``ckpt_sam`` for a training run; ``base`` / ``base_sam`` for a released
    folder, which is the whole model)."""
    out: list = []
    # 1. LoRA (LISA: q_proj / v_proj; --lora_target_modules may name other decoder linears): base weight +
    #    (alpha / r) * B @ A, in float32
    if lora_scaling is not None:
        out.append(LoraMerge(target=LLM + "layers.{i}.{block}.{proj}.weight",
                             base=f"{llm_from}:{LORA}.weight", a=f"{src}:{LORA}.lora_A.default.weight",
                             b=f"{src}:{LORA}.lora_B.default.weight", scaling=lora_scaling))
    # 2. trained in full: embeddings (vocabulary + [SEG], <im_start>, <im_end>) and lm_head
    if llm_from == src:
        out += [Rename(LLM + "embed_tokens.weight", f"{src}:model.embed_tokens.weight"),
                Rename("mllm.lm_head.weight", f"{src}:lm_head.weight")]
    else:
        out += [Take(LLM + "embed_tokens.weight", f"{src}:model.embed_tokens.weight",
                     replaces=("base:model.embed_tokens.weight",),
                     why="trained in full (vocabulary + LISA's added tokens): replaces the base tensor"),
                Take("mllm.lm_head.weight", f"{src}:lm_head.weight",
                     replaces=("base:lm_head.weight",) if base_has_lm_head else (),
                     why="trained in full (vocabulary + LISA's added tokens): replaces the base tensor")]
    # 3. the rest of the Llama decoder, unchanged
    for src in dict.fromkeys((llm_from, src)):
        if src in inputs:
            out.append(Drop(f"{src}:model.layers.{{i}}.self_attn.rotary_emb.inv_freq", ROPE_BUFFER, optional=True))
    out += [Rename(LLM + "norm.weight", f"{llm_from}:model.norm.weight"),
            CopyRest(LLM + "layers.{rest}", f"{llm_from}:model.layers.{{rest}}")]
    # 4. LISA's projector, one Linear(1024, C) -> transformers' linear_1; linear_2 = identity, zero bias
    #    (projector_hidden_act "linear"): exact for finite inputs
    out += [Rename(PROJECTOR + "linear_1.{p}", f"{projector_from}:model.mm_projector.{{p}}"),
            Rename(PROJECTOR + "linear_2.{p}", "identity:linear_2.{p}")]
    # 5. CLIP ViT-L/14 (vision tower only)
    if clip_from == src:
        out += [Drop(f"{src}:{CKPT_CLIP}embeddings.position_ids", POSITION_IDS, optional=True),
                CopyRest(CLIP_TARGET + "{rest}", f"{src}:{CKPT_CLIP}{{rest}}")]
    else:
        out += [Drop(f"{clip_from}:vision_model.embeddings.position_ids", POSITION_IDS, optional=True),
                Drop(f"{clip_from}:text_model.{{rest}}", CLIP_TEXT, optional=True),
                Drop(f"{clip_from}:text_projection.weight", CLIP_TEXT, optional=True),
                Drop(f"{clip_from}:visual_projection.weight", CLIP_TEXT, optional=True),
                Drop(f"{clip_from}:logit_scale", CLIP_TEXT, optional=True),
                CopyRest(CLIP_TARGET + "{rest}", f"{clip_from}:vision_model.{{rest}}")]
    # 6. the [SEG] projection: ModuleList([Sequential(Linear(C, C), ReLU, Linear(C, 256), Dropout)])
    out.append(Rename("text_hidden_fcs.{k}.{p}", f"{src}:model.text_hidden_fcs.0.{{k}}.{{p}}"))
    # 7. SAM: Meta's keys -> transformers' SamModel (the head's table)
    if sam_from == src_sam:
        out += sammap.sam_rules(target_prefix="sam.", source=src_sam)
    else:
        out += sammap.sam_rules(target_prefix="sam.", source="sam", mask_decoder_from=f"{src_sam}:")
        #    frozen SAM tensors a trainable-only save still holds (persistent buffers): checked equal to Meta's
        out.append(DropIfEqual(f"{src_sam}:{{rest}}", equals="sam:{rest}",
                               reason="frozen SAM tensor the training run saved beside the trained ones",
                               optional=True))
    # 8. inputs that duplicate a part the checkpoint holds
    if "base" in inputs and src != "base":
        if "base" not in (llm_from, projector_from):
            out.append(DropRest("base:{rest}", SUPERSEDED_BY_CKPT))
        else:
            out.append(DropRest(f"base:{CKPT_CLIP}{{rest}}", "CLIP is read from " + (
                "the training checkpoint" if clip_from == src else "the --clip folder"), optional=True))
    if "clip" in inputs and clip_from != "clip":
        out.append(DropRest("clip:{rest}", SUPERSEDED_BY_CKPT))
    if "sam" in inputs and sam_from != "sam":
        out.append(DropRest("sam:{rest}", SUPERSEDED_BY_CKPT))
    return out
