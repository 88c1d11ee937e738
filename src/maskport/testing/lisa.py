"""A tiny LISA, built from configs (nothing downloaded): the inputs a LISA user has, and the oracles.

- a LLaVA v1 base folder in LLaVA's own format (flat Llama ``config.json`` with ``mm_vision_tower``, a
  SentencePiece ``tokenizer.model``, ``pytorch_model.bin`` with ``model.*``, ``lm_head.weight``,
  ``model.mm_projector.*``, no CLIP);
- a CLIP folder (a full ``CLIPModel``: vision and text towers, as openai/clip-vit-large-patch14 ships);
- Meta's SAM ``.pth`` (a small ``segment_anything`` ``Sam``; decoder heads 8, as Meta's builder fixes them);
- the training run: peft's ``get_peft_model`` on a Llama (LoRA on q_proj/v_proj, r=8, alpha=16: LISA's defaults)
  whose embeddings and lm_head grew by LISA's three tokens and were "trained" (perturbed), plus LISA's other
  modules under its names (``model.mm_projector``, ``model.vision_tower.vision_tower.*``, ``model.visual_model.*``
  with a perturbed mask decoder, ``model.text_hidden_fcs.0.*``); saved as a DeepSpeed ZeRO-2 folder layout
  (``ckpt_model/latest`` + ``global_step10/mp_rank_00_model_states.pt`` whose ``module`` is the whole state dict),
  as ``zero_to_fp32`` shards of the trainable tensors, and as a released folder (LoRA merged by peft's
  ``merge_and_unload``, CLIP stripped, ``.bin`` shards + index, LISA's ``config.json`` and tokenizer files).

The pieces stay in memory (``LisaFixture``) for the reference forwards of the tests.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .tokenizers import WORDS

SEG, IM_START, IM_END = "[SEG]", "<im_start>", "<im_end>"
BASE_VOCAB = 400
HIDDEN, LAYERS, HEADS, INTER = 64, 2, 4, 128
CLIP_HIDDEN, CLIP_LAYERS, CLIP_IMAGE, CLIP_PATCH = 32, 3, 56, 14
LORA_R, LORA_ALPHA = 8, 16
SAM_IMG, SAM_PATCH, SAM_EMBED, SAM_DEPTH, SAM_HEADS, SAM_WINDOW, SAM_GLOBAL = 128, 16, 32, 2, 2, 3, (1,)
SAM_D = 32
PEFT = "base_model.model."


def make_sentencepiece(root: Path) -> bytes:
    """A Llama-like SentencePiece BPE (byte fallback, dummy prefix, <unk>/<s>/</s> = 0/1/2), trained on the tiny
    corpus, written as ``root/tokenizer.model``."""
    import sentencepiece as spm

    corpus = [f"{w} {WORDS[(i * 7) % len(WORDS)]} {w.capitalize()}, {w}.\n" for i, w in enumerate(WORDS)] * 3
    corpus.append("A chat between a curious human and an artificial intelligence assistant. USER: ASSISTANT: "
                  "0 1 2 3 4 5 6 7 8 9 ? ! : ; ' \" ( ) [ ] < > / - _")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buf, vocab_size=BASE_VOCAB,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, split_digits=True, normalization_rule_name="identity",
                                   add_dummy_prefix=True, remove_extra_whitespaces=False, minloglevel=2)
    root.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer.model").write_bytes(buf.getvalue())
    return buf.getvalue()


def _added_token(content: str, typed: bool) -> dict:
    tok = {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    return {"__type": "AddedToken", **tok} if typed else tok


def _tokenizer_files(root: Path, added: dict[str, int] | None) -> None:
    """The files transformers 4.31's slow LlamaTokenizer.save_pretrained writes (special tokens as AddedToken
    dicts, no pad token in the config, LISA's pad = unk in the map)."""
    (root / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": _added_token("<s>", True),
        "eos_token": _added_token("</s>", True), "unk_token": _added_token("<unk>", True), "pad_token": None,
        "add_bos_token": True, "add_eos_token": False, "model_max_length": 512, "padding_side": "right",
        "clean_up_tokenization_spaces": False, "sp_model_kwargs": {}}))
    (root / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": _added_token("<s>", False), "eos_token": _added_token("</s>", False),
         "unk_token": _added_token("<unk>", False), "pad_token": "<unk>"}))
    if added:
        (root / "added_tokens.json").write_text(json.dumps(added))


def llava_v1_config(vocab: int, **extra) -> dict:
    """LLaVA v1's flat config.json (what LISA's base folders and released folders carry)."""
    return {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "hidden_size": HIDDEN,
            "intermediate_size": INTER, "num_attention_heads": HEADS, "num_hidden_layers": LAYERS,
            "num_key_value_heads": HEADS, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "vocab_size": vocab,
            "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "rope_scaling": None,
            "tie_word_embeddings": False, "torch_dtype": "float32", "use_cache": False, "pretraining_tp": 1,
            "mm_vision_tower": "openai/clip-vit-large-patch14", "mm_hidden_size": CLIP_HIDDEN,
            "mm_vision_select_layer": -2, "mm_use_im_start_end": True, "mm_use_im_patch_token": False, **extra}


def tiny_meta_sam(seed: int):
    """A small Meta ``Sam`` (segment_anything), every tensor random and non-trivial."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(seed)
    grid = SAM_IMG // SAM_PATCH
    sam = Sam(
        image_encoder=ImageEncoderViT(img_size=SAM_IMG, patch_size=SAM_PATCH, embed_dim=SAM_EMBED, depth=SAM_DEPTH,
                                      num_heads=SAM_HEADS, mlp_ratio=4, out_chans=SAM_D, qkv_bias=True,
                                      norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                                      window_size=SAM_WINDOW, global_attn_indexes=SAM_GLOBAL),
        prompt_encoder=PromptEncoder(embed_dim=SAM_D, image_embedding_size=(grid, grid),
                                     input_image_size=(SAM_IMG, SAM_IMG), mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=SAM_D, iou_head_depth=3,
                                 iou_head_hidden_dim=48,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=SAM_D, mlp_dim=64,
                                                               num_heads=8)),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375]).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in sam.state_dict(keep_vars=True).items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g)
            if name.endswith("positional_encoding_gaussian_matrix"):
                t.copy_(noise)
            elif t.dim() == 1 and name.endswith("weight"):
                t.copy_(1.0 + 0.1 * noise)
            elif t.dim() == 1:
                t.copy_(0.1 * noise)
            else:
                t.copy_(max(t[0].numel() ** -0.5, 0.05) * noise)
    return sam


@dataclass
class LisaFixture:
    root: Path
    base_dir: Path
    clip_dir: Path
    sam_pth: Path
    ds_dir: Path                 # DeepSpeed ZeRO-2 folder layout (ckpt_model: latest + global_step10/)
    zero_dir: Path               # zero_to_fp32 output: trainable tensors in 2 safetensors shards + index
    zero_bin_dir: Path           # the same as 2 .bin shards + index
    released_dir: Path           # a released LISA folder
    sp_model: bytes
    peft_model: Any              # the peft-wrapped Llama (LoRA un-merged): the LLM oracle
    clip_vision: Any             # transformers CLIPVisionModel (the CLIP oracle)
    projector: Any               # torch Linear (LISA's mm_projector)
    text_hidden_fcs: Any         # torch Sequential
    meta_sam: Any                # segment_anything Sam with the trained mask decoder
    seg_id: int
    state: dict = field(default_factory=dict)  # the training run's full state dict (peft names)


def _save_bin_shards(sd: dict, folder: Path, n: int, name: str = "pytorch_model") -> None:
    keys = sorted(sd)
    per = (len(keys) + n - 1) // n
    weight_map = {}
    for i in range(n):
        part = keys[i * per:(i + 1) * per]
        fname = f"{name}-{i + 1:05d}-of-{n:05d}.bin"
        torch.save({k: sd[k].contiguous() for k in part}, folder / fname)
        weight_map.update({k: fname for k in part})
    (folder / f"{name}.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _save_st_shards(sd: dict, folder: Path, n: int) -> None:
    from safetensors.torch import save_file

    keys = sorted(sd)
    per = (len(keys) + n - 1) // n
    weight_map = {}
    for i in range(n):
        part = keys[i * per:(i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file({k: sd[k].contiguous() for k in part}, str(folder / fname))
        weight_map.update({k: fname for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def make_lisa_fixture(root: Path, seed: int = 0) -> LisaFixture:
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPConfig, CLIPModel, LlamaConfig, LlamaForCausalLM

    root = Path(root)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)

    # 1. base LLaVA folder (LLaVA v1 format)
    base_dir = root / "llava-base"
    sp_model = make_sentencepiece(base_dir)
    _tokenizer_files(base_dir, None)
    llama_cfg = LlamaConfig(vocab_size=BASE_VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                            num_attention_heads=HEADS, num_hidden_layers=LAYERS, num_key_value_heads=HEADS,
                            rms_norm_eps=1e-6, max_position_embeddings=2048, tie_word_embeddings=False,
                            bos_token_id=1, eos_token_id=2, pad_token_id=0)
    llama = LlamaForCausalLM(llama_cfg).eval()
    with torch.no_grad():
        for p in llama.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() > 1 else 0.1) + (1.0 if p.dim() == 1 else 0))
    projector = torch.nn.Linear(CLIP_HIDDEN, HIDDEN)
    with torch.no_grad():
        projector.weight.copy_(torch.randn(projector.weight.shape, generator=g) * 0.3)
        projector.bias.copy_(torch.randn(projector.bias.shape, generator=g) * 0.1)
    base_sd = {k: v.detach().clone() for k, v in llama.state_dict().items()}
    base_sd["model.mm_projector.weight"] = projector.weight.detach().clone()
    base_sd["model.mm_projector.bias"] = projector.bias.detach().clone()
    torch.save(base_sd, base_dir / "pytorch_model.bin")
    (base_dir / "config.json").write_text(json.dumps(llava_v1_config(BASE_VOCAB)))

    # 2. CLIP folder (CLIPModel: both towers)
    clip_dir = root / "clip"
    clip_cfg = CLIPConfig(
        vision_config=dict(hidden_size=CLIP_HIDDEN, intermediate_size=64, num_hidden_layers=CLIP_LAYERS,
                           num_attention_heads=4, image_size=CLIP_IMAGE, patch_size=CLIP_PATCH, projection_dim=16,
                           hidden_act="quick_gelu"),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=99, max_position_embeddings=16, projection_dim=16),
        projection_dim=16)
    clip = CLIPModel(clip_cfg).eval()
    with torch.no_grad():
        for name, p in clip.named_parameters():
            if name.startswith("vision_model.") and p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    clip.save_pretrained(clip_dir)
    from transformers import CLIPVisionModel

    clip_vision = CLIPVisionModel.from_pretrained(clip_dir).eval()

    # 3. Meta's SAM
    meta_sam = tiny_meta_sam(seed + 2)
    sam_pth = root / "sam_vit_tiny.pth"
    torch.save(meta_sam.state_dict(), sam_pth)

    # 4. the training run: LISA adds [SEG], <im_start>, <im_end>; embeddings/lm_head grow and are trained
    vocab = BASE_VOCAB + 3
    llama.resize_token_embeddings(vocab)
    with torch.no_grad():
        llama.model.embed_tokens.weight.add_(torch.randn(llama.model.embed_tokens.weight.shape, generator=g) * 0.05)
        llama.lm_head.weight.add_(torch.randn(llama.lm_head.weight.shape, generator=g) * 0.05)
    peft_model = get_peft_model(llama, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=["q_proj", "v_proj"],
                                                  lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    text_hidden_fcs = torch.nn.Sequential(torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.ReLU(inplace=True),
                                          torch.nn.Linear(HIDDEN, SAM_D), torch.nn.Dropout(0.0))
    with torch.no_grad():
        for p in text_hidden_fcs.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for p in meta_sam.mask_decoder.parameters():   # the trained mask decoder
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    state = {k: v.detach().clone() for k, v in peft_model.state_dict().items()}
    state[PEFT + "model.mm_projector.weight"] = projector.weight.detach().clone()
    state[PEFT + "model.mm_projector.bias"] = projector.bias.detach().clone()
    for k, v in clip_vision.state_dict().items():
        state[PEFT + "model.vision_tower.vision_tower.vision_model." + k] = v.detach().clone()  # 4.31 names
    for k, v in meta_sam.state_dict().items():
        state[PEFT + "model.visual_model." + k] = v.detach().clone()
    for k, v in text_hidden_fcs.state_dict().items():
        state[PEFT + "model.text_hidden_fcs.0." + k] = v.detach().clone()

    # 4a. DeepSpeed ZeRO-2 folder layout: the whole module state (peft 0.4's names: no .base_layer.)
    ds_dir = root / "runs" / "lisa-tiny" / "ckpt_model"
    (ds_dir / "global_step10").mkdir(parents=True)
    (ds_dir / "latest").write_text("global_step10")
    module = {k.replace(".base_layer.", "."): v for k, v in state.items()}
    # persistent buffers transformers 4.31 kept in the state dict: RoPE inverse frequencies, CLIP's position ids
    inv_freq = 1.0 / (10000 ** (torch.arange(0, HIDDEN // HEADS, 2).float() / (HIDDEN // HEADS)))
    for i in range(LAYERS):
        module[f"{PEFT}model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    n_pos = (CLIP_IMAGE // CLIP_PATCH) ** 2 + 1
    module[PEFT + "model.vision_tower.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(n_pos)[None]
    torch.save({"module": module, "ds_config": {"zero_optimization": {"stage": 2}, "bf16": {"enabled": False}},
                "ds_version": "0.9.5", "global_steps": 10},
               ds_dir / "global_step10" / "mp_rank_00_model_states.pt")

    # 4b. zero_to_fp32 output: the trainable tensors only (LoRA, embed/lm_head, mask decoder, text_hidden_fcs)
    trainable = {k: v for k, v in state.items()
                 if "lora_" in k or k.endswith(("embed_tokens.weight", "lm_head.weight")) or ".mask_decoder." in k
                 or ".text_hidden_fcs." in k}
    zero_dir = root / "zero_to_fp32"
    zero_dir.mkdir()
    _save_st_shards(trainable, zero_dir, 2)
    zero_bin_dir = root / "zero_to_fp32_bin"
    zero_bin_dir.mkdir()
    _save_bin_shards(trainable, zero_bin_dir, 2)

    # 4c. a released folder: LoRA merged by peft, LISA's module names, CLIP stripped, .bin shards
    import copy

    merged = copy.deepcopy(peft_model).merge_and_unload()
    released = {k: v.detach().clone() for k, v in merged.state_dict().items()}
    for k, v in state.items():
        name = k[len(PEFT):]
        if name.startswith(("model.mm_projector.", "model.visual_model.", "model.text_hidden_fcs.")):
            released[name] = v
    for i in range(LAYERS):
        released[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    released_dir = root / "LISA-tiny-v1"
    released_dir.mkdir()
    _save_bin_shards(released, released_dir, 2)
    (released_dir / "config.json").write_text(json.dumps(llava_v1_config(
        vocab, architectures=["LISAForCausalLM"], out_dim=SAM_D, train_mask_decoder=True,
        vision_tower="openai/clip-vit-large-patch14")))
    (released_dir / "tokenizer.model").write_bytes(sp_model)
    _tokenizer_files(released_dir, {SEG: BASE_VOCAB, IM_START: BASE_VOCAB + 1, IM_END: BASE_VOCAB + 2})

    return LisaFixture(root=root, base_dir=base_dir, clip_dir=clip_dir, sam_pth=sam_pth, ds_dir=ds_dir,
                       zero_dir=zero_dir, zero_bin_dir=zero_bin_dir, released_dir=released_dir, sp_model=sp_model,
                       peft_model=peft_model, clip_vision=clip_vision, projector=projector,
                       text_hidden_fcs=text_hidden_fcs, meta_sam=meta_sam, seg_id=BASE_VOCAB, state=state)
