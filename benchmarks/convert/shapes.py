"""Real Sa2VA-Qwen2.5-VL shapes: the configs, the base folder's tensors, the SAM2 and training-checkpoint tensors.

Everything here is names, shapes and dtypes only (models are instantiated on the ``meta`` device); no tensor data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from unittest import mock

import torch

# Qwen2.5's 22 added tokens, in their id order (151643 ...), as in Qwen/Qwen2.5-VL-*-Instruct
QWEN_ADDED_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
QWEN_BPE_SIZE = 151643          # ids of the byte-level BPE vocabulary; the added tokens follow
SA2VA_SPECIAL_TOKENS = ["[SEG]", "<p>", "</p>", "<vp>", "</vp>"]
SA2VA_VOCAB = QWEN_BPE_SIZE + len(QWEN_ADDED_TOKENS) + len(SA2VA_SPECIAL_TOKENS)  # 151670 = len(tokenizer)
LORA_R = 128
LORA_ALPHA = 256
LORA_TARGET_REGEX = (r"model\.language_model\.layers\.\d+\."
                     r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))")
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
PEFT = "mllm.model.base_model.model."

SIZES = {
    # Qwen/Qwen2.5-VL-3B-Instruct
    "3b": dict(text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                         num_key_value_heads=2, vocab_size=151936, max_window_layers=70, tie_word_embeddings=True),
               vision_out=2048, tie=True),
    # Qwen/Qwen2.5-VL-7B-Instruct
    "7b": dict(text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064, max_window_layers=28, tie_word_embeddings=False),
               vision_out=3584, tie=False),
}


def _entry(size: str | dict) -> dict:
    """A ``SIZES`` entry (by name) or a custom one: ``text`` (Qwen2.5 text-config values), ``vision_out``,
    ``tie``, optionally ``vision`` (vision-config overrides), ``vocab_rows`` (trained embedding rows),
    ``lora_r``/``lora_alpha``, ``ids`` (special-token ids, default Qwen's)."""
    return SIZES[size] if isinstance(size, str) else size


QWEN_IDS = dict(bos=151643, eos=151645, image=151655, video=151656, vision_start=151652, vision_end=151653)


def qwen_config(size: str | dict):
    from transformers import Qwen2_5_VLConfig

    s = _entry(size)
    ids = {**QWEN_IDS, **s.get("ids", {})}
    text = dict(hidden_act="silu", max_position_embeddings=128000, rms_norm_eps=1e-6, use_sliding_window=False,
                sliding_window=32768, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                                       "mrope_section": [16, 24, 24]},
                bos_token_id=ids["bos"], eos_token_id=ids["eos"], **s["text"])
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2, window_size=112,
                  out_hidden_size=s["vision_out"], fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu")
    vision.update(s.get("vision", {}))
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=s["tie"],
                           image_token_id=ids["image"], video_token_id=ids["video"],
                           vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"])
    cfg.bos_token_id, cfg.eos_token_id = ids["bos"], ids["eos"]
    cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    return cfg


@dataclass(frozen=True)
class Spec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def base_specs(size: str | dict) -> list[Spec]:
    """The tensors of the saved base folder, under transformers' on-disk (legacy) names, bf16 like the hub files.
    A tied base (3B) has no ``lm_head.weight``."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    cfg = qwen_config(size)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    out = []
    for k, v in model.state_dict().items():
        if k.startswith("model.language_model."):
            name = "model." + k[len("model.language_model."):]
        elif k.startswith("model.visual."):
            name = k[len("model."):]
        elif k == "lm_head.weight":
            if _entry(size)["tie"]:
                continue
            name = k
        else:
            raise AssertionError(f"unexpected key {k}")
        out.append(Spec(name, tuple(v.shape), torch.bfloat16))
    return sorted(out, key=lambda s: s.name)


def sam2_large_model_config() -> dict:
    """Meta's ``sam2.1_hiera_l.yaml`` model config, as a plain dict."""
    import omegaconf
    import sam2

    path = os.path.join(os.path.dirname(sam2.__file__), "configs", "sam2.1", "sam2.1_hiera_l.yaml")
    return omegaconf.OmegaConf.to_container(omegaconf.OmegaConf.load(path), resolve=True)["model"]


def _meta_sam2(model_cfg: dict):
    import hydra.utils

    linspace = torch.linspace  # Hiera's drop-path rates call .item() on a linspace: keep that one on the CPU
    with torch.device("meta"), mock.patch.object(torch, "linspace",
                                                 lambda *a, **k: linspace(*a, **{**k, "device": "cpu"})):
        return hydra.utils.instantiate(model_cfg, _recursive_=True)


def sam2_specs(model_cfg: dict | None = None) -> list[Spec]:
    """Meta's SAM2 ``model`` state dict (fp32), in Meta's order: ``sam2.1_hiera_large.pt`` by default, or the model
    that a hydra-style ``model_cfg`` describes."""
    model = _meta_sam2(model_cfg if model_cfg is not None else sam2_large_model_config())
    return [Spec(k, tuple(v.shape), torch.float32) for k, v in model.state_dict().items()]


def ckpt_specs(size: str | dict, sam2: list[Spec] | None = None) -> list[Spec]:
    """The trainable subset Sa2VA's ``state_dict`` saves (bf16): LoRA of every LLM linear, modules_to_save
    embed_tokens/lm_head (resized to len(tokenizer)), SAM2's mask decoder, text_hidden_fcs; in that order."""
    e = _entry(size)
    t = e["text"]
    r, rows = e.get("lora_r", LORA_R), e.get("vocab_rows", SA2VA_VOCAB)
    h, inter, kv = t["hidden_size"], t["intermediate_size"], t["num_key_value_heads"] * 128
    dims = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, h), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
            "mlp.down_proj": (h, inter)}
    bf = torch.bfloat16
    out = []
    for i in range(t["num_hidden_layers"]):
        for lin in LINEARS:
            o, n = dims[lin]
            stem = f"{PEFT}model.language_model.layers.{i}.{lin}"
            out.append(Spec(f"{stem}.lora_A.default.weight", (r, n), bf))
            out.append(Spec(f"{stem}.lora_B.default.weight", (o, r), bf))
    out.append(Spec(f"{PEFT}model.language_model.embed_tokens.modules_to_save.default.weight", (rows, h), bf))
    out.append(Spec(f"{PEFT}lm_head.modules_to_save.default.weight", (rows, h), bf))
    sam2 = sam2 if sam2 is not None else sam2_specs()
    for s in sam2:
        if s.name.startswith("sam_mask_decoder."):
            out.append(Spec("grounding_encoder.sam2_model." + s.name, s.shape, bf))
    d = next(s.shape[-1] for s in sam2 if s.name == "sam_mask_decoder.iou_token.weight")  # SAM's prompt width
    out += [Spec("text_hidden_fcs.0.weight", (h, h), bf), Spec("text_hidden_fcs.0.bias", (h,), bf),
            Spec("text_hidden_fcs.2.weight", (d, h), bf), Spec("text_hidden_fcs.2.bias", (d,), bf)]
    return out


def total_bytes(specs) -> int:
    return sum(s.nbytes for s in specs)
