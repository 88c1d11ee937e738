"""InternLM2 -> transformers' Llama layout: the mapping table of Sa2VA-8B/26B's language model (InternVL2.5 with
InternLM2 / InternLM2.5), its configuration, and the one non-trivial op, the ``wqkv`` split.

InternLM2 fuses q, k and v into one ``attention.wqkv`` linear whose output rows are grouped *per key-value head*:
for each of the ``num_key_value_heads`` heads come its ``groups = num_attention_heads / num_key_value_heads``
query heads, then its key head, then its value head, each ``head_dim`` rows (InternLM2's attention reads them
with ``rearrange(qkv, "b q (h gs d) -> b q h gs d", gs=groups + 2)``: ``[..., :groups, :]`` are the queries,
``[..., -2, :]`` the key, ``[..., -1, :]`` the value). Query head ``h * groups + g`` attends with key-value head
``h``, which is exactly Llama's grouped-query convention, so the split only has to gather rows.

A LoRA on ``wqkv`` is merged first, on the fused weight (``B`` has the fused row order), then split.

Table (language-model part; ``{i}`` = layer):

================================================  ====================================================
InternLM2 (``language_model.``)                   Llama (``mllm.model.language_model.`` / ``mllm.``)
================================================  ====================================================
``model.tok_embeddings.weight``                   ``embed_tokens.weight``
``model.layers.{i}.attention.wqkv.*``             ``layers.{i}.self_attn.{q,k,v}_proj.*`` (grouped split)
``model.layers.{i}.attention.wo.*``               ``layers.{i}.self_attn.o_proj.*``
``model.layers.{i}.feed_forward.w1.*``            ``layers.{i}.mlp.gate_proj.*``
``model.layers.{i}.feed_forward.w3.*``            ``layers.{i}.mlp.up_proj.*``
``model.layers.{i}.feed_forward.w2.*``            ``layers.{i}.mlp.down_proj.*``
``model.layers.{i}.attention_norm.weight``        ``layers.{i}.input_layernorm.weight``
``model.layers.{i}.ffn_norm.weight``              ``layers.{i}.post_attention_layernorm.weight``
``model.norm.weight``                             ``norm.weight``
``output.weight``                                 ``lm_head.weight``
================================================  ====================================================
"""

from __future__ import annotations

from typing import Any

from ...convert import ops
from ...convert.rules import Apply, LoraMerge, Rename, Rule

# InternLM2 linear (under model.layers.{i}.) -> Llama linear; wqkv is handled by the split
LINEARS = {
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
}
NORMS = {"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
QKV = "attention.wqkv"


# ---- the op: the engine's GroupedQkvSplit (maskport.convert.ops); re-exported for the tests ------------------
split_wqkv = ops.split_wqkv
split_wqkv_shapes = ops.split_wqkv_shapes


# ---- the table ----------------------------------------------------------------------------------------------
def rules(*, base: str, target: str, lm_head_target: str, peft: str | None, lora_modules: set[str],
          num_heads: int, num_kv_heads: int, lora_scaling: float | None = None) -> list[Rule]:
    """The InternLM2 -> Llama table.

    ``base``: pattern prefix of the InternLM2 causal LM in the base (``"base:language_model."``); ``target``: the
    Llama model's prefix (``"mllm.model.language_model."``); ``lm_head_target``: ``"mllm.lm_head.weight"``;
    ``peft``: prefix of the LoRA tensors in the training checkpoint (``"ckpt:...base_model.model."``) or None;
    ``lora_modules``: which linears carry LoRA (``attention.wqkv``, ``attention.wo``, ``feed_forward.w1``, ...).
    Embeddings and ``output`` are not in this table: the family decides (trained copies supersede them)."""
    L = "model.layers.{i}."
    out: list[Rule] = []
    qkv_targets = tuple(target + "layers.{i}.self_attn." + p + ".weight" for p in ("q_proj", "k_proj", "v_proj"))
    if QKV in lora_modules:
        out.append(Apply(
            targets=qkv_targets,
            sources=(base + L + QKV + ".weight", peft + L + QKV + ".lora_A.default.weight",
                     peft + L + QKV + ".lora_B.default.weight"),
            op=ops.Chain(ops.LoraMerge(lora_scaling), ops.GroupedQkvSplit(num_heads, num_kv_heads))))
    else:
        out.append(Apply(targets=qkv_targets, sources=(base + L + QKV + ".weight",),
                         op=ops.GroupedQkvSplit(num_heads, num_kv_heads)))
    out.append(Apply(targets=tuple(t.replace(".weight", ".bias") for t in qkv_targets),
                     sources=(base + L + QKV + ".bias",),
                     op=ops.GroupedQkvSplit(num_heads, num_kv_heads), optional=True))
    for src, dst in LINEARS.items():
        if src in lora_modules:
            out.append(LoraMerge(target=target + "layers.{i}." + dst + ".weight", base=base + L + src + ".weight",
                                 a=peft + L + src + ".lora_A.default.weight",
                                 b=peft + L + src + ".lora_B.default.weight", scaling=lora_scaling))
        else:
            out.append(Rename(target=target + "layers.{i}." + dst + ".weight", source=base + L + src + ".weight"))
        out.append(Rename(target=target + "layers.{i}." + dst + ".bias", source=base + L + src + ".bias",
                          optional=True))
    for src, dst in NORMS.items():
        out.append(Rename(target=target + "layers.{i}." + dst + ".weight", source=base + L + src + ".weight"))
    out.append(Rename(target=target + "norm.weight", source=base + "model.norm.weight"))
    return out


def llama_config(internlm2: dict, *, vocab_size: int | None = None) -> dict:
    """An InternLM2 ``config.json`` (the ``llm_config`` of an InternVL folder) -> a Llama config dict with the same
    architecture: ``bias`` -> ``attention_bias`` (InternLM2 puts it on wqkv and wo only, as Llama's
    ``attention_bias`` does on q/k/v/o), ``rope_scaling`` ``{"type": "dynamic", ...}`` -> ``rope_type``."""
    c = internlm2
    heads = int(c["num_attention_heads"])
    kv = int(c.get("num_key_value_heads") or heads)
    hidden = int(c["hidden_size"])
    rope_scaling = c.get("rope_scaling")
    if isinstance(rope_scaling, dict):
        rope_scaling = dict(rope_scaling)
        kind = rope_scaling.pop("type", None) or rope_scaling.pop("rope_type", None) or "default"
        rope_scaling = {"rope_type": kind, **rope_scaling}
    out: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(vocab_size if vocab_size is not None else c["vocab_size"]),
        "hidden_size": hidden,
        "intermediate_size": int(c["intermediate_size"]),
        "num_hidden_layers": int(c["num_hidden_layers"]),
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": hidden // heads,
        "hidden_act": c.get("hidden_act", "silu"),
        "max_position_embeddings": int(c.get("max_position_embeddings", 2048)),
        "rms_norm_eps": float(c.get("rms_norm_eps", 1e-6)),
        "rope_theta": float(c.get("rope_theta", 10000.0)),
        "attention_bias": bool(c.get("bias", False)),
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": c.get("bos_token_id", 1),
        "eos_token_id": c.get("eos_token_id", 2),
        "pad_token_id": c.get("pad_token_id", 0),
    }
    if rope_scaling:
        out["rope_scaling"] = rope_scaling
    return out
