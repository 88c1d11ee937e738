"""Tiny Sa2VA-on-InternVL fixtures: a remote-code InternVL base folder (Qwen2 or InternLM2 language model), Meta's
SAM2, and a Sa2VA training checkpoint (v2: LoRA + modules_to_save; v1: full embeddings/head) as mmengine and
DeepSpeed save them, plus the un-converted trained model in memory (the oracle:
:mod:`maskport.testing.references.internvl` with peft's un-merged LoRA), and the folder Sa2VA's own HF export
script would write (:func:`make_released_folder`). The InternLM2 base tokenizer comes from
:func:`maskport.testing.tokenizers.make_internlm2_tokenizer_dir`."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .common import SPECIAL_TOKENS, perturb_
from .references.internvl import RefInternLM2, RefInternVLChat
from .sam2 import make_meta_sam2, tiny_meta_sam2_config
from .tokenizers import INTERNVL_TOKENS, make_internlm2_tokenizer_dir, make_tiny_tokenizer

__all__ = ["INTERNVL_TOKENS", "LORA_ALPHA", "LORA_R", "SPECIAL_TOKENS", "TILE", "VISION", "VISION_6B",
           "InternVLFixture", "make_internlm2_tokenizer_dir", "make_internvl_fixture", "make_released_folder"]

TILE = 56          # the tiny vision tower's image size (real: 448)
LORA_R, LORA_ALPHA = 8, 16
VISION = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
          "image_size": TILE, "patch_size": 14, "layer_norm_eps": 1e-6, "qkv_bias": True}
PEFT_PREFIX = "mllm.model.language_model."


@dataclass
class InternVLFixture:
    root: Path
    base_dir: Path
    sam2_pt: Path
    ckpt: Path
    llm: str
    oracle: RefInternVLChat          # trained: peft-wrapped (un-merged) LLM, trained projector
    sam2: Any
    text_hidden_fcs: nn.Module
    state_dict: dict                  # what the checkpoint holds
    img_context_id: int
    vocab: int


def _llm(kind: str, vocab: int, tied: bool = False):
    if kind == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        cfg = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
                          max_position_embeddings=512, tie_word_embeddings=tied, use_sliding_window=False,
                          attn_implementation="eager")
        model = Qwen2ForCausalLM(cfg)
        d = cfg.to_dict()
        d["architectures"] = ["Qwen2ForCausalLM"]
        return model, d, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cfg = {"vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 8, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
           "bias": False, "hidden_act": "silu", "max_position_embeddings": 512, "bos_token_id": 1,
           "eos_token_id": 2, "pad_token_id": 2, "model_type": "internlm2", "architectures": ["InternLM2ForCausalLM"],
           "rope_scaling": {"type": "dynamic", "factor": 2.0}, "attn_implementation": "eager"}
    return RefInternLM2(cfg), cfg, ["wqkv", "wo", "w1", "w2", "w3"]


def _cfg_text(base_dir: Path, template: str) -> str:
    return (f"path = {str(base_dir)!r}\n"
            f"template = {template!r}\n"
            f"special_tokens = {SPECIAL_TOKENS!r}\n"
            "model = dict(type='Sa2VAModel', mllm=dict(type='InternVL_Slowfast', model_path=path,\n"
            f"    llm_lora=dict(type='LoraConfig', r={LORA_R}, lora_alpha={LORA_ALPHA}, lora_dropout=0.05)))\n")


VISION_6B = dict(VISION, qkv_bias=False, norm_type="rms_norm", qk_normalization=True)  # InternViT-6B style


class Sa2VAInternVLTrainingModule(nn.Module):
    """Sa2VA's training-module layout around the fixture's parts: ``mllm.model`` (the InternVL chat model with its
    peft-wrapped language model, ``mlp1``, ``vision_model``), ``grounding_encoder.sam2_model`` (Meta's SAM2) and
    ``text_hidden_fcs``. Only ``trained`` parameters require grad, and ``state_dict`` keeps only them, as Sa2VA's
    ``state_dict`` override does."""

    def __init__(self, chat: nn.Module, sam2: nn.Module, fcs: nn.Module, trained: set[str]):
        super().__init__()
        self.mllm = nn.Module()
        self.mllm.model = chat
        self.grounding_encoder = nn.Module()
        self.grounding_encoder.sam2_model = sam2
        self.text_hidden_fcs = fcs
        self.trained = sorted(trained)
        self.requires_grad_(False)
        params = dict(self.named_parameters())
        assert set(trained) <= set(params), sorted(set(trained) - set(params))[:5]
        for k in trained:
            params[k].requires_grad_(True)

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        from collections import OrderedDict

        full = super().state_dict(prefix=prefix, keep_vars=keep_vars)
        keep = set(self.trained)
        out = OrderedDict((k, v) for k, v in full.items() if k[len(prefix):] in keep)
        if destination is not None:
            destination.update(out)
            return destination
        return out


def make_internvl_fixture(root: Path, *, llm: str = "qwen2", version: str = "v2", seed: int = 0,
                          deepspeed: bool = False, tokenizer_dir: Path | None = None,
                          vision: dict | None = None, head_lora: bool = False, tied: bool = False,
                          deepspeed_stage: int = 2, deepspeed_world_size: int = 1,
                          deepspeed_buffers: bool = False) -> InternVLFixture:
    """Build every input of a conversion under ``root``. ``tokenizer_dir``: a base tokenizer to copy (the
    InternLM2 fixture brings its own); default: the tiny byte-level BPE with InternVL's tokens added.
    ``head_lora``: LoRA on the LM head too (``output``/``lm_head`` among the targets, as older v1 runs had).
    ``tied``: a Qwen2 LLM that ties its head to the embeddings (Qwen2.5-0.5B/1.5B in InternVL2.5-1B / InternVL3-2B,
    i.e. Sa2VA-1B / Sa2VA-InternVL3-2B): the base folder saves no ``lm_head.weight``.
    ``deepspeed``: the checkpoint is a folder written by DeepSpeed itself (fp32, ZeRO ``deepspeed_stage`` over
    ``deepspeed_world_size`` ranks, :mod:`maskport.testing.deepspeed`) from :class:`Sa2VAInternVLTrainingModule`;
    ``deepspeed_buffers``: its module state also keeps every persistent buffer (SAM2's gaussian matrix)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    root = Path(root)
    base_dir, sam2_dir = root / "base", root / "sam2"
    base_dir.mkdir(parents=True)
    sam2_dir.mkdir()
    torch.manual_seed(seed)
    if tokenizer_dir is None:
        tok = make_tiny_tokenizer(base_dir)
        tok.add_tokens(INTERNVL_TOKENS, special_tokens=True)
        tok.save_pretrained(str(base_dir))
    else:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file():
                (base_dir / f.name).write_bytes(f.read_bytes())
    tok = AutoTokenizer.from_pretrained(str(base_dir), trust_remote_code=False) if llm == "qwen2" else None
    n_base = len(tok) if tok is not None else None
    if llm != "qwen2":
        from maskport.families.sa2va_internvl import internlm2_tokenizer

        n_base = len(internlm2_tokenizer.load(base_dir))
    img_ctx = (tok.convert_tokens_to_ids("<IMG_CONTEXT>") if tok is not None else
               internlm2_tokenizer.load(base_dir).convert_tokens_to_ids("<IMG_CONTEXT>"))

    # ---- the base InternVL (remote-code layout) ----------------------------------------------------------
    assert not tied or llm == "qwen2"
    lm, llm_cfg, lora_targets = _llm(llm, n_base, tied)
    vision = vision or VISION
    model = RefInternVLChat(vision, lm, llm_cfg["hidden_size"])
    gen = torch.Generator().manual_seed(seed + 1)
    perturb_(model.parameters(), gen, 0.02)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if tied:  # as save_pretrained writes a tied model: the head is the embeddings, stored once
        assert model.language_model.lm_head.weight is model.language_model.model.embed_tokens.weight
        del sd["language_model.lm_head.weight"]
    from safetensors.torch import save_file

    save_file(sd, str(base_dir / "model.safetensors"), metadata={"format": "pt"})
    vis = dict(vision, architectures=["InternVisionModel"], model_type="intern_vit_6b",
               norm_type=vision.get("norm_type", "layer_norm"), qk_normalization=vision.get("qk_normalization", False),
               hidden_act="gelu", initializer_factor=0.1, num_channels=3)
    (base_dir / "config.json").write_text(json.dumps({
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel"},
        "vision_config": vis, "llm_config": {k: v for k, v in llm_cfg.items() if k != "attn_implementation"},
        "downsample_ratio": 0.5, "select_layer": -1, "ps_version": "v2", "template": "internvl2_5",
        "force_image_size": TILE, "dynamic_image_size": True, "use_thumbnail": True, "max_dynamic_patch": 12,
        "min_dynamic_patch": 1, "torch_dtype": "float32"}, indent=2))

    # ---- SAM2 ----------------------------------------------------------------------------------------------
    sam2_cfg = tiny_meta_sam2_config()
    sam2 = make_meta_sam2(sam2_cfg, seed)
    sam2_pt = sam2_dir / "tiny_sam2.pt"
    torch.save({"model": sam2.state_dict()}, sam2_pt)
    (sam2_dir / "tiny_sam2.config.json").write_text(json.dumps(sam2_cfg, indent=2))

    # ---- "training": Sa2VA adds 5 tokens, LoRA on the LLM, trains the projector, the SAM2 decoder, fcs -------
    vocab = n_base + len(SPECIAL_TOKENS)
    emb, head = model.language_model.get_input_embeddings(), (
        model.language_model.lm_head if llm == "qwen2" else model.language_model.output)
    new_emb = nn.Embedding(vocab, emb.weight.shape[1])
    new_head = nn.Linear(head.weight.shape[1], vocab, bias=False)
    with torch.no_grad():
        new_emb.weight[:n_base] = emb.weight
        new_head.weight[:n_base] = head.weight
        perturb_([new_emb.weight[n_base:], new_head.weight[n_base:]], gen, 0.02)
    if llm == "qwen2":
        model.language_model.model.embed_tokens = new_emb
        model.language_model.lm_head = new_head
        model.language_model.config.vocab_size = vocab
        save = ["embed_tokens", "lm_head"] if version == "v2" else None
    else:
        model.language_model.model.tok_embeddings = new_emb
        model.language_model.output = new_head
        save = ["tok_embeddings", "output"] if version == "v2" else None
    head_name = "lm_head" if llm == "qwen2" else "output"
    if head_lora:
        assert version == "v1", "peft cannot put LoRA on a modules_to_save module"
        lora_targets = [*lora_targets, head_name]
    model.language_model = get_peft_model(model.language_model, LoraConfig(
        r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=lora_targets, modules_to_save=save, lora_dropout=0.0))
    named = dict(model.language_model.named_parameters())
    perturb_([p for n, p in named.items() if "lora_B" in n], gen, 0.05)
    if version == "v2":
        perturb_([p for n, p in named.items() if ".modules_to_save." in n], gen, 0.01)
    else:
        perturb_([new_emb.weight, new_head.weight], gen, 0.01)
    perturb_(model.mlp1.parameters(), gen, 0.01)
    perturb_(sam2.sam_mask_decoder.parameters(), gen, 0.01)
    fcs = nn.Sequential(nn.Linear(llm_cfg["hidden_size"], llm_cfg["hidden_size"]), nn.ReLU(),
                        nn.Linear(llm_cfg["hidden_size"], sam2_cfg["model"]["image_encoder"]["neck"]["d_model"]),
                        nn.Dropout(0.0))  # into SAM2's prompt width (32 for the tiny SAM2, 256 for the real ones)
    model.eval()

    # ---- what Sa2VAModel.state_dict() saves ------------------------------------------------------------------
    ckpt_sd: dict[str, torch.Tensor] = {}
    for k, v in model.language_model.state_dict().items():
        trained = ".lora_" in k or ".modules_to_save." in k or (
            version == "v1" and any(f"{n}.weight" in k for n in ("embed_tokens", "lm_head", "tok_embeddings", "output"))
            and ".original_module." not in k) or (head_lora and k.endswith(f"{head_name}.base_layer.weight"))
        if trained:
            ckpt_sd[PEFT_PREFIX + k] = v.detach().clone()
    for k, v in model.mlp1.state_dict().items():
        ckpt_sd["mllm.model.mlp1." + k] = v.detach().clone()
    for k, v in sam2.sam_mask_decoder.state_dict().items():
        ckpt_sd["grounding_encoder.sam2_model.sam_mask_decoder." + k] = v.detach().clone()
    for k, v in fcs.state_dict().items():
        ckpt_sd["text_hidden_fcs." + k] = v.detach().clone()
    template = "internlm2_chat" if llm == "internlm2" else "qwen_chat"
    meta = {"cfg": _cfg_text(base_dir, template), "iter": 2, "epoch": 0}
    if deepspeed:
        from .deepspeed import save_with_deepspeed

        module = Sa2VAInternVLTrainingModule(copy.deepcopy(model), copy.deepcopy(sam2), copy.deepcopy(fcs),
                                             set(ckpt_sd))
        assert set(module.state_dict()) == set(ckpt_sd)
        module_file = root / "training_module.pickle.pt"
        torch.save(module, module_file)  # the fixture's own file, read back by its own workers
        ckpt = save_with_deepspeed("maskport.testing.deepspeed:load_pickled_module",
                                   {"module": str(module_file), "client_state": {"meta": meta}}, root, "iter_2.pth",
                                   stage=deepspeed_stage, world_size=deepspeed_world_size, bf16=False,
                                   unfiltered_state_dict=deepspeed_buffers)
        module_file.unlink()
    else:
        ckpt = root / "iter_2.pth"
        torch.save({"state_dict": ckpt_sd, "meta": meta}, ckpt)
    return InternVLFixture(root, base_dir, sam2_pt, ckpt, llm, model, sam2, fcs, ckpt_sd, img_ctx, vocab)


def make_released_folder(fx: InternVLFixture, out: Path) -> Path:
    """The folder Sa2VA's own HF export script would write for the fixture's trained model (``Sa2VAChatModel``):
    the LoRA merged by peft (``merge_and_unload``), the trained projector, the whole SAM2 under
    ``grounding_encoder.sam2_model.`` in Meta's names with ``gamma`` renamed ``g_weight``, ``text_hidden_fcs``,
    the tokenizer with Sa2VA's tokens, and a ``sa2va_chat`` config."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    out = Path(out)
    out.mkdir(parents=True)
    model = copy.deepcopy(fx.oracle)
    model.language_model = model.language_model.merge_and_unload()
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    for k, v in fx.sam2.state_dict().items():
        sd["grounding_encoder.sam2_model." + k.replace(".gamma", ".g_weight")] = v.detach().clone().contiguous()
    for k, v in fx.text_hidden_fcs.state_dict().items():
        sd["text_hidden_fcs." + k] = v.detach().clone().contiguous()
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((fx.base_dir / "config.json").read_text())
    cfg.update(model_type="sa2va_chat", architectures=["Sa2VAChatModel"],
               template="internlm2_chat" if fx.llm == "internlm2" else "qwen_chat",
               auto_map={"AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfig",
                         "AutoModel": "modeling_sa2va_chat.Sa2VAChatModel"})
    cfg["llm_config"]["vocab_size"] = fx.vocab
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "modeling_sa2va_chat.py").write_text("raise RuntimeError('remote code must never run')\n")
    if fx.llm == "qwen2":
        tok = AutoTokenizer.from_pretrained(str(fx.base_dir), trust_remote_code=False)
        tok.add_tokens(SPECIAL_TOKENS, special_tokens=True)
        tok.save_pretrained(str(out))
    else:
        from maskport.families.sa2va_internvl import internlm2_tokenizer

        tok = internlm2_tokenizer.load(fx.base_dir)
        tok.add_tokens(SPECIAL_TOKENS, special_tokens=True)
        tok.save_pretrained(str(out))
        tc = json.loads((out / "tokenizer_config.json").read_text())
        tc.update(tokenizer_class="InternLM2Tokenizer",
                  auto_map={"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]})
        (out / "tokenizer_config.json").write_text(json.dumps(tc))
    return out
