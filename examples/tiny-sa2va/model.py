"""The tiny Sa2VA of the demo: tokenizer, Qwen2.5-VL and SAM2 configs, input encoding and the training module.

Inputs are built the way Sa2VA's Qwen2.5-VL inference builds them (and therefore the way a maskport export's
``predict_forward`` builds them), written out here independently:

- prompt: xtuner's ``qwen_chat`` template with the default system prompt and the vision block first in the
  user turn::

      <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n
      <|vision_start|><|image_pad|>*N<|vision_end|>{text without <image>}<|im_end|>\\n<|im_start|>assistant\\n

  followed in training by the answer and ``<|im_end|>`` (the only tokens with a language-model loss);
- MLLM image: ``qwen_vl_utils``' pre-resize (both sides to multiples of 28, PIL bicubic; 128 px -> 140 px),
  then transformers' Qwen2-VL image processor with ``MIN_PIXELS``/``MAX_PIXELS`` (140x140 stays 140x140:
  a 10x10 patch grid, 25 image tokens);
- SAM2 image: PIL bicubic square resize to SAM2's ``image_size`` (256), /255, ImageNet mean/std;
- masks: the last-layer hidden state at each ``[SEG]`` -> ``text_hidden_fcs`` -> appended to SAM2's sparse
  prompt (after the two "not a point" tokens), mask decoder in multi-mask mode, the mask with the highest
  predicted IoU kept (``SAM2Base._use_multimask`` is true for this config, as for Sa2VA's hiera configs).

The module mirrors Sa2VA's attribute layout (``mllm.model`` = the (peft-wrapped) HF model,
``grounding_encoder.sam2_model`` = Meta's ``SAM2Base``, ``text_hidden_fcs``) and, in stage 2, its
``state_dict`` override (only the trainable tensors, in bfloat16).
"""

from __future__ import annotations

import copy
import functools
import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import shapes

SPECIAL_TOKENS = ["[SEG]", "<p>", "</p>", "<vp>", "</vp>"]
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>"]
SYSTEM = "You are a helpful assistant."
MIN_PIXELS = 56 * 56
MAX_PIXELS = 140 * 140
PRE_RESIZE_MIN_PIXELS, PRE_RESIZE_MAX_PIXELS = 4 * 28 * 28, 16384 * 28 * 28  # qwen_vl_utils' bounds
SAM2_IMAGE_SIZE = 128
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

COLOUR_IDS = {c: i for i, c in enumerate(shapes.COLOURS)}
KIND_IDS = {k: i for i, k in enumerate(shapes.KINDS)}

LORA_R, LORA_ALPHA = 8, 16
LORA_TARGET_REGEX = (r"model\.language_model\.layers\.\d+\."
                     r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))")

CHAT_TEMPLATE = (  # the processor's chat template (what apply_chat_template renders), for the base folder
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# ------------------------------------------------------------------------------------------------------------
# tokenizer (a byte-level BPE trained on the task's words; Qwen's special tokens after it)
# ------------------------------------------------------------------------------------------------------------
def _corpus() -> list[str]:
    lines = [f"<|im_start|>system\n{SYSTEM}<|im_end|>\n", "user assistant system", shapes.VOCABULARY_TEXT]
    words = sorted(set(shapes.VOCABULARY_TEXT.replace(".", " ").replace(",", " ").replace("?", " ").split()))
    lines += [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    lines.append("0 1 2 3 4 5 6 7 8 9 ? ! : ; ' \" ( ) [ ] < > / - _ \n")
    return lines * 3


def build_tokenizer():
    """The base tokenizer (before Sa2VA's tokens): deterministic BPE training, ~300 tokens + Qwen's specials."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None, model_max_length=4096,
                                   padding_side="right", chat_template=CHAT_TEMPLATE)


# ------------------------------------------------------------------------------------------------------------
# configs
# ------------------------------------------------------------------------------------------------------------
def qwen_config(tokenizer):
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    text_config = dict(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=2048,
        rms_norm_eps=1e-6, use_sliding_window=False, max_window_layers=4,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    vision_config = dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=4, in_channels=3, patch_size=14,
                         spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2, window_size=56,
                         out_hidden_size=128, fullatt_block_indexes=[1, 3])
    cfg = Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config,
                           image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                           vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                           tie_word_embeddings=False)
    cfg.bos_token_id = ids["<|endoftext|>"]
    cfg.eos_token_id = ids["<|im_end|>"]
    cfg.pad_token_id = ids["<|endoftext|>"]
    return cfg


def sam2_config(image_size: int | None = None) -> dict:
    """Meta's hydra-style SAM2 model config (``sam2_hiera_t.yaml``'s flags), shrunk: Hiera embed_dim 24 (channels
    24-48-96-192), stages [1, 2, 3, 1], global attention in block 4; FPN/SAM-decoder width 64; memory modules
    tiny (unused for images, but part of every SAM2 checkpoint)."""
    image_size = image_size or SAM2_IMAGE_SIZE
    d_model, mem_dim, feat = 64, 16, image_size // 16

    def rope(**kw):
        return dict(_target_="sam2.modeling.sam.transformer.RoPEAttention", rope_theta=10000.0,
                    feat_sizes=[feat, feat], embedding_dim=d_model, num_heads=1, downsample_rate=1, dropout=0.1,
                    **kw)

    pos = lambda n: dict(_target_="sam2.modeling.position_encoding.PositionEmbeddingSine",  # noqa: E731
                         num_pos_feats=n, normalize=True, scale=None, temperature=10000)
    return {"model": {
        "_target_": "sam2.modeling.sam2_base.SAM2Base",
        "image_encoder": {
            "_target_": "sam2.modeling.backbones.image_encoder.ImageEncoder",
            "scalp": 1,
            "trunk": {"_target_": "sam2.modeling.backbones.hieradet.Hiera", "embed_dim": 24, "num_heads": 1,
                      "stages": [1, 2, 3, 1], "global_att_blocks": [4], "window_pos_embed_bkg_spatial_size": [4, 4],
                      "window_spec": [8, 4, 8, 4]},
            "neck": {"_target_": "sam2.modeling.backbones.image_encoder.FpnNeck", "position_encoding": pos(d_model),
                     "d_model": d_model, "backbone_channel_list": [192, 96, 48, 24], "fpn_top_down_levels": [2, 3],
                     "fpn_interp_model": "nearest"},
        },
        "memory_attention": {
            "_target_": "sam2.modeling.memory_attention.MemoryAttention", "d_model": d_model, "pos_enc_at_input": True,
            "layer": {"_target_": "sam2.modeling.memory_attention.MemoryAttentionLayer", "activation": "relu",
                      "dim_feedforward": 64, "dropout": 0.1, "pos_enc_at_attn": False, "self_attention": rope(),
                      "d_model": d_model, "pos_enc_at_cross_attn_keys": True, "pos_enc_at_cross_attn_queries": False,
                      "cross_attention": rope(rope_k_repeat=True, kv_in_dim=mem_dim)},
            "num_layers": 1,
        },
        "memory_encoder": {
            "_target_": "sam2.modeling.memory_encoder.MemoryEncoder", "out_dim": mem_dim, "in_dim": d_model,
            "position_encoding": pos(mem_dim),
            "mask_downsampler": {"_target_": "sam2.modeling.memory_encoder.MaskDownSampler", "embed_dim": d_model,
                                 "kernel_size": 3, "stride": 2, "padding": 1},
            "fuser": {"_target_": "sam2.modeling.memory_encoder.Fuser",
                      "layer": {"_target_": "sam2.modeling.memory_encoder.CXBlock", "dim": d_model, "kernel_size": 7,
                                "padding": 3, "layer_scale_init_value": 1e-6, "use_dwconv": True},
                      "num_layers": 1},
        },
        "num_maskmem": 7, "image_size": image_size, "sigmoid_scale_for_mem_enc": 20.0,
        "sigmoid_bias_for_mem_enc": -10.0, "use_mask_input_as_output_without_sam": True,
        "directly_add_no_mem_embed": True, "use_high_res_features_in_sam": True, "multimask_output_in_sam": True,
        "iou_prediction_use_sigmoid": True, "use_obj_ptrs_in_encoder": True, "add_tpos_enc_to_obj_ptrs": False,
        "only_obj_ptrs_in_the_past_for_eval": True, "pred_obj_scores": True, "pred_obj_scores_mlp": True,
        "fixed_no_obj_ptr": True, "multimask_output_for_tracking": True, "use_multimask_token_for_obj_ptr": True,
        "multimask_min_pt_num": 0, "multimask_max_pt_num": 1, "use_mlp_for_obj_ptr_proj": True,
        "compile_image_encoder": False,
    }}


def build_meta_sam2(cfg: dict):
    """Meta's ``SAM2Base`` from the hydra-style dict (what ``sam2.build_sam.build_sam2`` does, minus the yaml)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    return instantiate(OmegaConf.create(copy.deepcopy(cfg)).model, _recursive_=True)


# ------------------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------------------
def render_prompt(text: str, n_image_tokens: int) -> str:
    body = "<|vision_start|>" + "<|image_pad|>" * n_image_tokens + "<|vision_end|>" + text.replace("<image>", "")
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{body}<|im_end|>\n"
            "<|im_start|>assistant\n")


def _round_to(x: float, f: int) -> int:
    return max(f, round(x / f) * f)


def qwen_pre_resize(image: Image.Image, factor: int = 28) -> Image.Image:
    """qwen_vl_utils' ``fetch_image`` resize (within its default pixel bounds, which a 128 px image is)."""
    h, w = image.height, image.width
    hb, wb = _round_to(h, factor), _round_to(w, factor)
    if hb * wb > PRE_RESIZE_MAX_PIXELS or hb * wb < PRE_RESIZE_MIN_PIXELS:
        raise ValueError("image outside the pre-resize bounds this demo handles")
    return image if (wb, hb) == image.size else image.resize((wb, hb), resample=Image.BICUBIC)


@functools.lru_cache(maxsize=1)
def image_processor():
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}, patch_size=14,
                                    temporal_patch_size=2, merge_size=2, image_mean=CLIP_MEAN, image_std=CLIP_STD)


def mllm_image_inputs(image: Image.Image) -> dict:
    out = image_processor()(images=[qwen_pre_resize(image.convert("RGB"))], return_tensors="pt",
                            min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


def sam2_pixels(image: Image.Image, size: int | None = None) -> torch.Tensor:
    """[3, S, S] uint8: Sa2VA's DirectResize (PIL bicubic square resize); the model normalises
    (``_GroundingEncoder.preprocess_image``)."""
    size = size or SAM2_IMAGE_SIZE
    x = np.asarray(image.convert("RGB").resize((size, size), resample=Image.BICUBIC), dtype=np.uint8)
    return torch.from_numpy(x.copy()).permute(2, 0, 1).contiguous()


class Encoder:
    """Sample -> training tensors (token ids with labels on the answer only, both images, the GT mask)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.pad_id = tokenizer.pad_token_id

    def __call__(self, sample) -> dict:
        mm = mllm_image_inputs(sample.image)
        n_img = int(mm["image_grid_thw"].prod()) // 4
        prompt_ids = self.tok(render_prompt(sample.prompt, n_img), add_special_tokens=False)["input_ids"]
        answer_ids = self.tok(sample.answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        ids = torch.tensor(prompt_ids + answer_ids)
        labels = ids.clone()
        labels[: len(prompt_ids)] = -100
        named = sample.family == "colour"  # the prompt names colour and kind (stage 1's auxiliary probe)
        return dict(input_ids=ids, labels=labels, pixel_values=mm["pixel_values"],
                    image_grid_thw=mm["image_grid_thw"], g_pixel_values=sam2_pixels(sample.image),
                    masks=torch.from_numpy(sample.mask.astype(np.uint8)),
                    colour_id=COLOUR_IDS[sample.target.colour] if named else -100,
                    kind_id=KIND_IDS[sample.target.kind] if named else -100)


def collate(pad_id: int, batch: list[dict]) -> dict:
    L = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), L), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), L), -100, dtype=torch.long)
    att = torch.zeros((len(batch), L), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n], labels[i, :n], att[i, :n] = b["input_ids"], b["labels"], 1
    data = dict(input_ids=ids, labels=labels, attention_mask=att,
                pixel_values=torch.cat([b["pixel_values"] for b in batch]),
                image_grid_thw=torch.cat([b["image_grid_thw"] for b in batch]),
                g_pixel_values=torch.stack([b["g_pixel_values"] for b in batch]),
                masks=torch.stack([b["masks"] for b in batch]),
                colour_id=torch.tensor([b["colour_id"] for b in batch]),
                kind_id=torch.tensor([b["kind_id"] for b in batch]))
    return dict(data=data, data_samples=None)


class TaskDataset(torch.utils.data.Dataset):
    """``length`` samples drawn from ``families`` with weights; sample ``i`` is ``make_sample(offset + i, ...)``."""

    def __init__(self, tokenizer, families: dict[str, float], length: int, offset: int, seed: int):
        self.enc = Encoder(tokenizer)
        self.families = list(families)
        p = np.array([families[f] for f in self.families], dtype=np.float64)
        rng = np.random.default_rng([seed, 7])
        self.choice = rng.choice(len(self.families), size=length, p=p / p.sum())
        self.offset = offset
        self.pad_id = tokenizer.pad_token_id

    def __len__(self):
        return len(self.choice)

    def __getitem__(self, i):
        return self.enc(shapes.make_sample(self.offset + i, self.families[self.choice[i]]))


# ------------------------------------------------------------------------------------------------------------
# the Sa2VA-like module
# ------------------------------------------------------------------------------------------------------------
class _MLLM(nn.Module):
    """Stand-in for Sa2VA's ``Qwen2_5_VL`` wrapper: ``.model`` is the (peft-wrapped) HF model."""

    def __init__(self, model):
        super().__init__()
        self.model = model


class _GroundingEncoder(nn.Module):
    """Stand-in for Sa2VA's ``SAM2TrainRunner``: ``.sam2_model`` is Meta's SAM2Base."""

    def __init__(self, sam2_model):
        super().__init__()
        self.sam2_model = sam2_model

    @staticmethod
    def preprocess_image(images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, S, S] -> /255, ImageNet mean/std (float32)."""
        mean = torch.tensor(IMAGENET_MEAN, device=images.device)[:, None, None]
        std = torch.tensor(IMAGENET_STD, device=images.device)[:, None, None]
        return (images.float() / 255.0 - mean) / std

    def masks_from_language(self, images: torch.Tensor, language_embd: torch.Tensor):
        """SAM2 image features -> + no-memory embedding -> SAM heads with the [SEG] embedding appended to the
        sparse prompt (Sa2VA's ``language_embd``). Returns the 3 multi-mask logits [B, 3, h, w] and their
        predicted IoUs [B, 3]."""
        sam = self.sam2_model
        feats = sam.forward_image(images)
        _, vis, _, sizes = sam._prepare_backbone_features(feats)
        high_res = [x.permute(1, 2, 0).reshape(x.size(1), x.size(2), *s) for x, s in zip(vis[:-1], sizes[:-1])]
        B, C = vis[-1].size(1), sam.hidden_dim
        H, W = sizes[-1]
        pix = (vis[-1] + sam.no_mem_embed).permute(1, 2, 0).reshape(B, C, H, W)
        dev = images.device
        sparse, dense = sam.sam_prompt_encoder(
            points=(torch.zeros(B, 1, 2, device=dev), -torch.ones(B, 1, dtype=torch.int32, device=dev)),
            boxes=None, masks=None)
        sparse = torch.cat([sparse, language_embd[:, None].to(sparse.dtype)], dim=1)
        assert sam._use_multimask(is_init_cond_frame=True, point_inputs=None)
        low_res, ious, _, _ = sam.sam_mask_decoder(
            image_embeddings=pix, image_pe=sam.sam_prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense, multimask_output=True, repeat_image=False, high_res_features=high_res)
        return low_res, ious


def _base_model_class():
    from mmengine.model import BaseModel

    return BaseModel


class TinySa2VA(_base_model_class()):
    """Sa2VA's layout and losses, tiny. ``stage=1``: everything trainable; ``stage=2``: the Sa2VA fine-tuning
    recipe (LoRA + modules_to_save on the LLM, SAM2 mask decoder, text_hidden_fcs)."""

    def __init__(self, hf_model, sam2_model, seg_token_idx: int, stage: int, adapter_name: str = "default",
                 image_size: int = shapes.IMAGE_SIZE):
        super().__init__()
        self.mllm = _MLLM(hf_model)
        self.grounding_encoder = _GroundingEncoder(sam2_model)
        cfg = hf_model.config
        in_dim = cfg.text_config.hidden_size
        out_dim = sam2_model.hidden_dim
        self.text_hidden_fcs = nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True),
                                             nn.Linear(in_dim, out_dim), nn.Dropout(0.0))
        self.seg_token_idx = seg_token_idx
        self.stage = stage
        # Stage 1 only (pre-training), never saved with the model: a linear probe that reads the target's colour
        # and kind back from the [SEG] prompt embedding. Trained from scratch, the LLM otherwise settles on a
        # [SEG] state that ignores the prompt (SAM2 then segments "some shape"); the probe's loss makes the
        # embedding carry what the prompt names from the first steps on, and SAM2 learns to use it.
        self.aux_probe = nn.Linear(out_dim, len(COLOUR_IDS) + len(KIND_IDS)) if stage == 1 else None
        self.adapter_name = adapter_name
        self.image_size = image_size
        if stage == 2:
            self.grounding_encoder.requires_grad_(False)
            self.grounding_encoder.sam2_model.sam_mask_decoder.requires_grad_(True)

    def init_weights(self):  # weights come from the script; never let mmengine re-initialise them
        pass

    # --- Sa2VA's state_dict override: only what was trained, bf16 ------------------------------------------
    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        full = super().state_dict(prefix=prefix, keep_vars=keep_vars)
        if self.stage != 2:
            return full
        peft_model = self.mllm.model
        mts = list(getattr(peft_model, "modules_to_save", None) or [])
        a = self.adapter_name
        lora, mts_out, rest = OrderedDict(), OrderedDict(), OrderedDict()
        for k, v in full.items():
            v = v if keep_vars else v.detach().to(torch.bfloat16)
            if k.startswith(prefix + "mllm."):
                if "lora_" in k and a in k:
                    lora[k] = v
                elif any(f"{m}.modules_to_save.{a}" in k for m in mts):
                    mts_out[k] = v
            elif k.startswith(prefix + "grounding_encoder.sam2_model.sam_mask_decoder"):
                rest[k] = v
            elif k.startswith(prefix + "text_hidden_fcs."):
                rest[k] = v
        out = OrderedDict(list(lora.items()) + list(mts_out.items()) + list(rest.items()))
        if destination is not None:
            destination.update(out)
            return destination
        return out

    # --- forward -------------------------------------------------------------------------------------------
    def seg_masks(self, data: dict, return_embedding: bool = False):
        """Teacher-forced pass: LM output, multi-mask logits at image resolution [B, 3, H, W], predicted IoUs."""
        out = self.mllm.model(input_ids=data["input_ids"], attention_mask=data["attention_mask"],
                              labels=data.get("labels"), pixel_values=data["pixel_values"],
                              image_grid_thw=data["image_grid_thw"], output_hidden_states=True)
        seg = data["input_ids"] == self.seg_token_idx
        assert bool((seg.sum(1) == 1).all()), "each sample must hold exactly one [SEG]"
        lang = self.text_hidden_fcs(out.hidden_states[-1][seg])
        images = self.grounding_encoder.preprocess_image(data["g_pixel_values"])
        low_res, ious = self.grounding_encoder.masks_from_language(images, lang)
        s = self.grounding_encoder.sam2_model.image_size
        # the export's two resizes: SAM2 resolution, then the image's
        logits = F.interpolate(low_res.float(), size=(s, s), mode="bilinear", align_corners=False)
        logits = F.interpolate(logits, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        if return_embedding:
            return out, logits, ious.float(), lang
        return out, logits, ious.float()

    def forward(self, data, data_samples=None, mode="loss"):
        out, logits, ious, lang = self.seg_masks(data, return_embedding=True)
        gt = data["masks"].float()[:, None].expand_as(logits)
        loss_mask = F.binary_cross_entropy_with_logits(logits, gt)
        prob = logits.sigmoid().flatten(2)
        g = gt.flatten(2)
        loss_dice = (1 - (2 * (prob * g).sum(-1) + 1) / (prob.sum(-1) + g.sum(-1) + 1)).mean()
        with torch.no_grad():
            hard = (logits > 0).flatten(2).float()
            inter = (hard * g).sum(-1)
            true_iou = inter / (hard.sum(-1) + g.sum(-1) - inter).clamp(min=1.0)
        loss_iou = F.mse_loss(ious, true_iou)
        losses = {"llm_loss": out.loss, "loss_mask": 2.0 * loss_mask, "loss_dice": 0.5 * loss_dice,
                  "loss_iou": loss_iou}
        if self.aux_probe is not None and "colour_id" in data:
            z = self.aux_probe(lang.float())
            nc = len(COLOUR_IDS)
            losses["loss_probe"] = 0.5 * (F.cross_entropy(z[:, :nc], data["colour_id"], ignore_index=-100)
                                          + F.cross_entropy(z[:, nc:], data["kind_id"], ignore_index=-100))
        if mode == "loss":
            return losses
        raise NotImplementedError(mode)


def best_mask_iou(logits: torch.Tensor, ious: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per-sample IoU of the best-predicted-IoU mask (> 0 logit, i.e. sigmoid > 0.5) with the GT."""
    best = ious.argmax(-1)
    m = logits[torch.arange(len(best)), best] > 0
    g = gt > 0.5
    inter = (m & g).flatten(1).sum(-1).float()
    union = (m | g).flatten(1).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def lr_lambda(warmup: int, total: int):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


__all__ = ["TinySa2VA", "Encoder", "TaskDataset", "collate", "build_tokenizer", "qwen_config", "sam2_config",
           "build_meta_sam2", "render_prompt", "mllm_image_inputs", "sam2_pixels", "Path"]
