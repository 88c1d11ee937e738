"""The mapping table of family ``sa2va-internvl``, top to bottom: training checkpoint + InternVL base (remote-code or
``-hf`` layout; Qwen2 or InternLM2 language model) + Meta SAM2 -> ``Sa2VAInternVLModel`` (``mllm.*`` = transformers'
``InternVLForConditionalGeneration``, ``sam2.*`` = ``Sam2Model``, ``text_hidden_fcs.*``). Every key spelled out:
``docs/families/sa2va-internvl.mapping.tsv``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...convert.rules import CopyRest, Drop, DropIfEqual, LoraMerge, Rename, Rule, Split, Take
from ...heads import sam2 as sam2map
from . import internlm2_llama

PEFT = "ckpt:mllm.model.language_model.base_model.model."   # peft wraps the causal LM inside InternVLChatModel
VT = "mllm.model.vision_tower."
PROJ = "mllm.model.multi_modal_projector."
LM = "mllm.model.language_model."
PROJECTOR_LAYERS = {"0": "layer_norm", "1": "linear_1", "3": "linear_2"}   # nn.Sequential index -> native name


@dataclass(frozen=True)
class BaseLayout:
    """Where the base folder keeps each part (pattern prefixes, source ``base``)."""

    name: str
    llm: str          # the causal LM (remote code: ``language_model.``; native: the decoder and head differ)
    decoder: str      # the decoder stack: ``...model.`` of the causal LM
    lm_head: str      # full key of the head (Qwen2: ``lm_head.weight``; InternLM2: ``output.weight``)
    has_lm_head: bool = True


REMOTE = "remote-code"
NATIVE = "native (-hf)"


# --------------------------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------------------------
def intern_vit_rules() -> list[Rule]:
    """InternViT (remote code, ``vision_model.*``) -> transformers' ``InternVLVisionModel``."""
    V, L = "base:vision_model.", "base:vision_model.encoder.layers.{i}."
    T = VT + "encoder.layer.{i}."
    return [
        Rename(VT + "embeddings.cls_token", V + "embeddings.class_embedding"),
        Rename(VT + "embeddings.patch_embeddings.projection.{p}", V + "embeddings.patch_embedding.{p}"),
        Rename(VT + "embeddings.position_embeddings", V + "embeddings.position_embedding"),
        # q, k, v are stacked in that order along the output rows (InternViT reshapes qkv to (3, heads, d))
        Split(targets=(T + "attention.q_proj.{p}", T + "attention.k_proj.{p}", T + "attention.v_proj.{p}"),
              source=L + "attn.qkv.{p}", dim=0),
        Rename(T + "attention.projection_layer.{p}", L + "attn.proj.{p}"),
        Rename(T + "attention.q_norm.weight", L + "attn.q_norm.weight", optional=True),  # InternViT-6B only
        Rename(T + "attention.k_norm.weight", L + "attn.k_norm.weight", optional=True),
        Rename(T + "lambda_1", L + "ls1"),
        Rename(T + "lambda_2", L + "ls2"),
        Rename(T + "layernorm_before.{p}", L + "norm1.{p}"),
        Rename(T + "layernorm_after.{p}", L + "norm2.{p}"),
        Rename(T + "mlp.fc1.{p}", L + "mlp.fc1.{p}"),
        Rename(T + "mlp.fc2.{p}", L + "mlp.fc2.{p}"),
    ]


def projector_rules(layout: str, trained: bool) -> list[Rule]:
    """``mlp1`` (LayerNorm, Linear, GELU, Linear) -> ``multi_modal_projector``; Sa2VA trains it, so the
    checkpoint's copy supersedes the base's."""
    out: list[Rule] = []
    for idx, name in PROJECTOR_LAYERS.items():
        base_key = f"base:mlp1.{idx}.{{p}}" if layout == REMOTE else f"base:model.multi_modal_projector.{name}.{{p}}"
        if trained:
            out.append(Take(PROJ + f"{name}.{{p}}", f"ckpt:mllm.model.mlp1.{idx}.{{p}}", replaces=(base_key,),
                            why="the projector is trained: the checkpoint's copy replaces the base's"))
        else:
            out.append(Rename(PROJ + f"{name}.{{p}}", base_key))
    return out


def qwen2_llm_rules(base: BaseLayout, lora: bool = True, head_lora_base: str | None = None,
                    lora_scaling: float | None = None) -> list[Rule]:
    """Qwen2 language model: LoRA merged into every trained linear; embeddings / head from the checkpoint."""
    linear = "layers.{i}.{block}.{proj}"
    merge = [LoraMerge(target=LM + linear + ".weight", base=base.decoder + linear + ".weight",
                       a=PEFT + "model." + linear + ".lora_A.default.weight",
                       b=PEFT + "model." + linear + ".lora_B.default.weight", scaling=lora_scaling)] if lora else []
    return [
        *merge,
        *_embedding_rules(base, embed="embed_tokens", head="lm_head", head_lora_base=head_lora_base,
                          lora_scaling=lora_scaling),
        CopyRest(target=LM + "{rest}", source=base.decoder + "{rest}"),
    ]


def _embedding_rules(base: BaseLayout, *, embed: str, head: str, head_lora_base: str | None = None,
                     lora_scaling: float | None = None) -> list[Rule]:
    """Trained copies of the embeddings (``embed`` under the decoder) and the LM head (``head`` under the causal LM)
    supersede the base's: v2 checkpoints keep peft ``modules_to_save`` copies, v1 full tensors.

    ``head_lora_base``: the head carries LoRA (older v1 InternLM2 runs put ``output`` among the LoRA targets); the
    key of the weight it is merged into: the checkpoint's trained head (peft's ``base_layer.weight``, or
    ``weight`` in peft versions before ``base_layer``), or the base's head when the run did not train it."""
    base_embed = (base.decoder + embed + ".weight",)
    base_head = (base.lm_head,) if base.has_lm_head else ()  # a base that ties its head saves none
    if head_lora_base is None:
        head_rules: list[Rule] = [
            Take("mllm.lm_head.weight", PEFT + f"{head}.modules_to_save.default.weight", replaces=base_head,
                 optional=True),
            Take("mllm.lm_head.weight", PEFT + f"{head}.weight", replaces=base_head,
                 why="trained full copy (v1 checkpoint) replaces the base tensor", optional=True),
            CopyRest(target="mllm.lm_head.weight", source=base.lm_head, optional=True),
        ]
    else:
        head_rules = [LoraMerge(target="mllm.lm_head.weight", base=head_lora_base,
                                a=PEFT + f"{head}.lora_A.default.weight", b=PEFT + f"{head}.lora_B.default.weight",
                                scaling=lora_scaling)]
        if head_lora_base.startswith("ckpt:") and base.has_lm_head:
            head_rules.append(Drop(base.lm_head, reason="the checkpoint's trained head (LoRA merged into it) "
                                                         "replaces the base's"))
    return [
        Take(LM + "embed_tokens.weight", PEFT + f"model.{embed}.modules_to_save.default.weight", replaces=base_embed,
             optional=True),
        Take(LM + "embed_tokens.weight", PEFT + f"model.{embed}.weight", replaces=base_embed,
             why="trained full copy (v1 checkpoint) replaces the base tensor", optional=True),
        *head_rules,
        Drop(PEFT + "{rest}.original_module.weight",
             reason="frozen pre-training copy kept by peft modules_to_save; superseded by the trained copy",
             optional=True),
        # frozen copies of base tensors (persistent buffers) that DeepSpeed's module state keeps: checked equal
        DropIfEqual(PEFT + "model.{rest}", equals=base.decoder + "{rest}", reason=sam2map.FROZEN_COPY_REASON,
                    optional=True),
        # untouched by training: the base's (CopyRest claims only what no rule above took)
        CopyRest(target=LM + "embed_tokens.weight", source=base.decoder + embed + ".weight", optional=True),
    ]


def internlm2_llm_rules(base: BaseLayout, lora_modules: set[str], text_cfg: dict,
                        head_lora_base: str | None = None, lora_scaling: float | None = None) -> list[Rule]:
    rules = internlm2_llama.rules(base=base.llm, target=LM, lm_head_target="mllm.lm_head.weight", peft=PEFT,
                                  lora_modules=lora_modules, num_heads=int(text_cfg["num_attention_heads"]),
                                  num_kv_heads=int(text_cfg["num_key_value_heads"]), lora_scaling=lora_scaling)
    return [*rules, *_embedding_rules(base, embed="tok_embeddings", head="output", head_lora_base=head_lora_base,
                                      lora_scaling=lora_scaling)]


def rules(layout: str, llm: str, *, base: BaseLayout, projector_trained: bool, lora_modules: set[str],
          text_cfg: dict, fcs_source: str = "ckpt", decoder_from: str | None = "ckpt:grounding_encoder.sam2_model.",
          head_lora_base: str | None = None, lora_scaling: float | None = None) -> list[Rule]:
    """The whole table, top to bottom. ``fcs_source``/``decoder_from``: where ``text_hidden_fcs`` and the fine-tuned
    SAM2 mask decoder are (the training checkpoint; for a released folder, the folder and None);
    ``head_lora_base``: see :func:`_embedding_rules`; ``lora_scaling``: peft's alpha / r, bound into every merge."""
    if llm == "internlm2":
        llm_rules = internlm2_llm_rules(base, lora_modules, text_cfg, head_lora_base, lora_scaling)
    else:
        llm_rules = qwen2_llm_rules(base, lora=bool(lora_modules), head_lora_base=head_lora_base,
                                    lora_scaling=lora_scaling)
    vision = intern_vit_rules() if layout == REMOTE else [CopyRest(VT + "{rest}", "base:model.vision_tower.{rest}")]
    if layout == REMOTE:  # frozen vision-tower copies (buffers) a DeepSpeed module state may keep: checked equal
        vision.append(DropIfEqual("ckpt:mllm.model.vision_model.{rest}", equals="base:vision_model.{rest}",
                                  reason=sam2map.FROZEN_COPY_REASON, optional=True))
    return [
        *llm_rules,                                                    # 1. language model (LoRA merged)
        *projector_rules(layout, projector_trained),                   # 2. projector
        *vision,                                                       # 3. vision tower
        Rename(target="text_hidden_fcs.{rest}", source=fcs_source + ":text_hidden_fcs.{rest}"),  # 4. [SEG] projection
        *sam2map.sam2_rules(target_prefix="sam2.", mask_decoder_from=decoder_from),          # 5. SAM2
    ]


def training_layout(llm: str, num_heads: int, num_kv_heads: int):
    """What a Sa2VA-InternVL training checkpoint holds (``maskport convert hf-to-mmengine`` inverts it), under the
    names Sa2VA's ``Sa2VAModel`` loads ``pretrained_pth`` with: InternVL's remote-code ``InternVLChatModel``
    (the layout Sa2VA trains, whatever the export's base was) before LoRA is wrapped, so the peft prefix
    ``mllm.model.language_model.base_model.model.`` is ``mllm.model.language_model.``. Every linear of the language
    model is taken as LoRA-trained (merged), the projector as trained."""
    from ...convert.inverse import TrainingLayout
    from .._common import PEFT_UNWRAP, TRAINING_PTH_FROZEN, TRAINING_PTH_NOTE

    head = "output.weight" if llm == "internlm2" else "lm_head.weight"
    base = BaseLayout(REMOTE, "base:language_model.", "base:language_model.model.", "base:language_model." + head)
    lora = set(internlm2_llama.LINEARS) | {internlm2_llama.QKV} if llm == "internlm2" else {"all"}
    table = rules(REMOTE, llm, base=base, projector_trained=True, lora_modules=lora,
                  text_cfg={"num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads})
    return TrainingLayout(rules=table, source="ckpt",
                          renames=((PEFT.split(":", 1)[1], "mllm.model.language_model."), *PEFT_UNWRAP),
                          frozen_reason=TRAINING_PTH_FROZEN, notes=(TRAINING_PTH_NOTE,))
