"""Tiny F-LMM inputs built from configs (no download): a LLaVA-1.5-shaped base folder saved in the legacy llava-hf
layout (``language_model.model.*``), a tiny Meta SAM (``segment_anything``) saved as a ``.pth``, and a training
checkpoint laid out as F-LMM saves it (trainable parts only): the U-Net in mmseg's names, ``text_layer_weights``,
``text_proj``, SAM's prompt encoder + mask decoder (perturbed: "trained") under ``sam.model.``, plus the prompt
encoder's random-Fourier buffer, as a module state keeps it.

The U-Net tensors are random, named and shaped as mmseg's ``UNet`` (``encoder.{i}.{0|1}.convs.{j}.{conv,gn}``,
``decoder.{k}.upsample.interp_upsample.1.{conv,gn}``, ``decoder.{k}.conv_block.convs.{j}.{conv,gn}``) plus
``conv_seg``: the tests' reference forward reads them under those names.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from .tokenizers import make_tiny_tokenizer

IMAGE_TOKEN = "<image>"
# the LMM: 2 layers x 4 heads = 8 attention maps per phrase; CLIP 56 px / patch 14 = a 4x4 grid (16 image tokens)
LAYERS, HEADS, HIDDEN, VISION_SIZE, PATCH = 2, 4, 64, 56, 14
# the U-Net: 3 stages from 8 channels
BASE_CHANNELS, STAGES = 8, 3
# SAM: 128 px, patch 16 (8x8 grid), window 4, 2 blocks (block 1 global), prompt width 32, Meta's 8 decoder heads
SAM_IMG, SAM_PATCH, SAM_EMBED, SAM_DEPTH, SAM_HEADS, SAM_WINDOW, SAM_GLOBAL, SAM_D = 128, 16, 32, 2, 2, 4, (1,), 32


@dataclass
class FLMMFixture:
    root: Path
    base_dir: Path
    sam_pth: Path
    ckpt: Path
    ckpt_state: dict
    meta_sam_state: dict
    tokenizer: object


def tiny_llava_config(vocab_size: int, image_token_id: int, pad_id: int, eos_id: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
                       num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=512,
                       rms_norm_eps=1e-5, pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=None,
                       tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=VISION_SIZE, patch_size=PATCH, projection_dim=32)
    side = VISION_SIZE // PATCH
    return LlavaConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_index=image_token_id,
                       image_seq_length=side * side, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu",
                       tie_word_embeddings=False)


def tiny_meta_sam():
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = SAM_IMG // SAM_PATCH
    return Sam(
        image_encoder=ImageEncoderViT(img_size=SAM_IMG, patch_size=SAM_PATCH, embed_dim=SAM_EMBED, depth=SAM_DEPTH,
                                      num_heads=SAM_HEADS, mlp_ratio=4, out_chans=SAM_D, qkv_bias=True,
                                      norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                                      window_size=SAM_WINDOW, global_attn_indexes=SAM_GLOBAL),
        prompt_encoder=PromptEncoder(embed_dim=SAM_D, image_embedding_size=(grid, grid),
                                     input_image_size=(SAM_IMG, SAM_IMG), mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=SAM_D, iou_head_depth=3,
                                 iou_head_hidden_dim=48,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=SAM_D, mlp_dim=64, num_heads=8)),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375],
    ).eval()


def _randomise_(module: torch.nn.Module, g: torch.Generator) -> None:
    """Every float tensor random and non-trivial (norm weights ~1, matrices ~1/sqrt(fan_in), at least 0.05)."""
    with torch.no_grad():
        for name, t in module.state_dict(keep_vars=True).items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g)
            if name.endswith("positional_encoding_gaussian_matrix"):
                t.copy_(noise)
            elif t.dim() <= 1 and ("norm" in name or name.endswith(".weight") and "ln" in name):
                t.copy_(1.0 + 0.1 * noise)
            elif t.dim() <= 1:
                t.copy_(0.1 * noise)
            else:
                fan_in = max(1, t[0].numel())
                t.copy_(noise * max(fan_in ** -0.5, 0.05))


def unet_state(in_channels: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Random U-Net tensors in mmseg's names (``mask_head.`` prefix), ``STAGES`` stages from ``BASE_CHANNELS``,
    two convs per stage, GroupNorm."""
    out: dict[str, torch.Tensor] = {}

    def conv(prefix: str, cout: int, cin: int, k: int):
        out[f"{prefix}.conv.weight"] = torch.randn(cout, cin, k, k, generator=g) * (cin * k * k) ** -0.5
        out[f"{prefix}.gn.weight"] = 1.0 + 0.1 * torch.randn(cout, generator=g)
        out[f"{prefix}.gn.bias"] = 0.1 * torch.randn(cout, generator=g)

    cin = in_channels
    for i in range(STAGES):
        width = BASE_CHANNELS * 2 ** i
        for j in range(2):
            conv(f"mask_head.encoder.{i}.{0 if i == 0 else 1}.convs.{j}", width, cin if j == 0 else width, 3)
        cin = width
    for k in range(STAGES - 1):
        skip, deep = BASE_CHANNELS * 2 ** k, BASE_CHANNELS * 2 ** (k + 1)
        conv(f"mask_head.decoder.{k}.upsample.interp_upsample.1", skip, deep, 1)
        for j in range(2):
            conv(f"mask_head.decoder.{k}.conv_block.convs.{j}", skip, 2 * skip if j == 0 else skip, 3)
    out["mask_head.conv_seg.weight"] = torch.randn(1, BASE_CHANNELS, 1, 1, generator=g) * BASE_CHANNELS ** -0.5
    out["mask_head.conv_seg.bias"] = torch.tensor([0.3])
    return out


def _legacy_llava_names(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        if k.startswith("model.language_model."):
            out["language_model.model." + k[len("model.language_model."):]] = v
        elif k.startswith("lm_head."):
            out["language_model." + k] = v
        elif k.startswith("model."):
            out[k[len("model."):]] = v
        else:
            out[k] = v
    return out


def _legacy_qwen_names(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        if k.startswith("model.language_model."):
            out["model." + k[len("model.language_model."):]] = v
        elif k.startswith("model.visual."):
            out[k[len("model."):]] = v
        else:
            out[k] = v
    return out


def _llava_base(base_dir: Path, g: torch.Generator, seed: int):
    """A tiny LLaVA-1.5-shaped folder in the legacy llava-hf key layout (as the released llava-1.5 folders)."""
    import json

    from safetensors.torch import save_file
    from transformers import LlavaForConditionalGeneration

    tok = make_tiny_tokenizer(base_dir)
    tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tok.eos_token = "<|im_end|>"
    tok.save_pretrained(str(base_dir))
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    config = tiny_llava_config(len(tok), image_id, tok.pad_token_id, tok.eos_token_id)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    _randomise_(model, g)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(_legacy_llava_names(state), str(base_dir / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(base_dir)
    (base_dir / "preprocessor_config.json").write_text(json.dumps({
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "crop_size": {"height": VISION_SIZE, "width": VISION_SIZE}, "size": {"shortest_edge": VISION_SIZE}}))
    return tok


def _qwen_base(base_dir: Path, g: torch.Generator, seed: int):
    """A tiny Qwen2.5-VL folder (2 layers x 4 heads, hidden 64: the same mask-head and text_proj shapes as the LLaVA
    one) in the legacy key layout, ``lm_head`` tied to the embeddings and not saved (as Qwen2.5-VL-3B)."""
    import json

    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    from .sa2va_qwen2_5_vl import IMAGE_MAX_PIXELS, IMAGE_MIN_PIXELS, tiny_qwen2_5_vl_config

    tok = make_tiny_tokenizer(base_dir)
    config = tiny_qwen2_5_vl_config(len(tok))
    config.tie_word_embeddings = True
    config.text_config.tie_word_embeddings = True
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    _randomise_(model, g)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(_legacy_qwen_names(state), str(base_dir / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(base_dir)
    (base_dir / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "min_pixels": IMAGE_MIN_PIXELS,
        "max_pixels": IMAGE_MAX_PIXELS, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    return tok


def make_flmm_fixture(root: Path, seed: int = 0, base: str = "llava") -> FLMMFixture:
    """Write the tiny base folder (``base``: ``llava`` or ``qwen2_5_vl``), Meta SAM ``.pth`` and F-LMM training
    checkpoint under ``root``."""
    root = Path(root)
    g = torch.Generator().manual_seed(seed)
    # 1. the base LMM folder
    base_dir = root / f"{base}-base"
    tok = {"llava": _llava_base, "qwen2_5_vl": _qwen_base}[base](base_dir, g, seed)
    # 2. Meta's SAM (the image encoder the checkpoint lacks)
    meta = tiny_meta_sam()
    _randomise_(meta, g)
    meta_state = {k: v.clone() for k, v in meta.state_dict().items()}
    sam_pth = root / "sam_tiny.pth"
    torch.save(meta_state, sam_pth)
    # 3. the training checkpoint: trainable parts only, SAM's prompt encoder + mask decoder perturbed ("trained")
    ckpt_state = unet_state(LAYERS * HEADS, g)
    ckpt_state["text_layer_weights"] = torch.randn(LAYERS, generator=g)
    ckpt_state["text_proj.weight"] = torch.randn(SAM_D, HIDDEN, generator=g) * HIDDEN ** -0.5
    ckpt_state["text_proj.bias"] = 0.1 * torch.randn(SAM_D, generator=g)
    for k, v in meta_state.items():
        if k.startswith(("prompt_encoder.", "mask_decoder.")):
            trained = v if k.endswith("positional_encoding_gaussian_matrix") else v + 0.05 * torch.randn(v.shape, generator=g)
            if k.startswith("mask_decoder.output_hypernetworks_mlps.") and ".layers.2." in k:
                # masks with both signs (a random tiny SAM's logits are nearly constant)
                trained = trained * 30.0 if k.endswith("weight") else trained - 40.0
            ckpt_state["sam.model." + k] = trained.clone()
    ckpt = root / "flmm_iter_10.pth"
    torch.save(ckpt_state, ckpt)
    return FLMMFixture(root=root, base_dir=base_dir, sam_pth=sam_pth, ckpt=ckpt, ckpt_state=ckpt_state,
                       meta_sam_state=meta_state, tokenizer=tok)


__all__ = ["FLMMFixture", "make_flmm_fixture", "tiny_llava_config", "tiny_meta_sam", "unet_state"]
