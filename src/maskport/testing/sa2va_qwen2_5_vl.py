"""The Sa2VA-Qwen2.5-VL fixture: a tiny training run, built offline with the real libraries.

What it produces (see :func:`make_sa2va_qwen_fixture`):

* ``base/``      -- a tiny ``Qwen2_5_VLForConditionalGeneration`` saved with ``save_pretrained`` (bf16
  safetensors, like the hub checkpoints), its tokenizer (a byte-level BPE with Qwen's special tokens) and
  a ``Qwen2_5_VLProcessor`` (image processor + video processor + tokenizer + chat template).
* ``sam2/tiny_sam2.pt`` -- a Meta-format SAM2 checkpoint ``{'model': SAM2Base.state_dict()}`` (fp32) plus
  ``tiny_sam2.config.json`` holding the hydra-style model config used to build it.
* ``work_dir/iter_N.pth`` -- a genuine mmengine checkpoint written by ``mmengine.runner.Runner`` +
  ``CheckpointHook`` while training a Sa2VA-like module (LoRA on the LLM decoder, ``modules_to_save``
  embed_tokens/lm_head, trainable SAM2 mask decoder, ``text_hidden_fcs``).  Its ``state_dict`` holds
  only the trainable tensors, in bfloat16, under the same key names Sa2VA's ``state_dict`` override
  produces (``mllm.model.base_model.model...lora_A.default.weight`` etc.).
* optionally (``deepspeed=True``) ``ds_work_dir/iter_N.pth/`` -- a genuine DeepSpeed ZeRO-2 checkpoint
  directory of the same module holding the same trained values, laid out the way mmengine's
  ``DeepSpeedStrategy.save_checkpoint`` lays it out (tag = ``iter_N.pth``).

The in-memory oracle objects returned hold exactly the values stored on disk (fp32 copies of the
bf16-rounded tensors), so fp32 comparisons against converted exports can be exact.

The base tokenizer is :func:`maskport.testing.tokenizers.make_tiny_tokenizer`, the SAM2 is
:func:`maskport.testing.sam2.make_meta_sam2`. The DeepSpeed checkpoint is written by
:func:`maskport.testing.deepspeed.save_with_deepspeed` in subprocesses that rebuild the module with :func:`_ds_build`
(imported by name); :func:`write_deepspeed_checkpoint` writes more (ZeRO-3 over several ranks, buffers kept).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..convert.safe_load import safe_torch_load
from .common import SPECIAL_TOKENS, perturb_, round_bf16_
from .sam2 import build_meta_sam2, make_meta_sam2, tiny_meta_sam2_config
from .tokenizers import QWEN_CHAT_TEMPLATE, QWEN_SPECIAL_TOKENS, make_tiny_tokenizer, qwen_special_ids

__all__ = ["LORA_ALPHA", "LORA_R", "LORA_TARGET_REGEX", "QWEN_SPECIAL_TOKENS", "SPECIAL_TOKENS", "Sa2VAQwenFixture",
           "make_qwen_processor", "make_released_folder", "make_sa2va_qwen_fixture", "make_tiny_tokenizer",
           "tiny_qwen2_5_vl_config"]

LORA_R = 8
LORA_ALPHA = 16
# LoRA on every nn.Linear of the LLM decoder, never on the vision tower (whose MLP also has
# gate_proj/up_proj/down_proj) nor lm_head -- what Sa2VA's `target_modules=None` expands to.
LORA_TARGET_REGEX = (
    r"model\.language_model\.layers\.\d+\."
    r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
)

IMAGE_MIN_PIXELS = 56 * 56
IMAGE_MAX_PIXELS = 112 * 112


# --------------------------------------------------------------------------------------------------
# Qwen2.5-VL
# --------------------------------------------------------------------------------------------------
def tiny_qwen2_5_vl_config(vocab_size: int):
    """Tiny Qwen2.5-VL config whose special-token ids match :func:`make_tiny_tokenizer`."""
    from transformers import Qwen2_5_VLConfig

    ids = qwen_special_ids()
    text_config = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        max_window_layers=2,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    vision_config = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        in_channels=3,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        tokens_per_second=2,
        window_size=56,
        out_hidden_size=64,
        fullatt_block_indexes=[1],
    )
    cfg = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    # the top-level ids are read by generate()/Sa2VA code too
    cfg.bos_token_id = ids["<|endoftext|>"]
    cfg.eos_token_id = ids["<|im_end|>"]
    cfg.pad_token_id = ids["<|endoftext|>"]
    return cfg


def make_qwen_processor(tokenizer):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(
        min_pixels=IMAGE_MIN_PIXELS, max_pixels=IMAGE_MAX_PIXELS, patch_size=14, temporal_patch_size=2, merge_size=2
    )
    video_processor = Qwen2VLVideoProcessor(
        min_pixels=IMAGE_MIN_PIXELS, max_pixels=IMAGE_MAX_PIXELS, patch_size=14, temporal_patch_size=2, merge_size=2
    )
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN_CHAT_TEMPLATE,
    )



@dataclass(frozen=True)
class QwenArch:
    """One Qwen-VL generation of the fixture: its tiny config, model class, processor and the names Sa2VA's training
    config spells for it."""

    make_config: Any
    model_class: str
    make_processor: Any
    processor_class: str
    sa2va_mllm_type: str
    config_file: str
    token_types: bool = False  # the model's forward takes the processor's mm_token_type_ids


QWEN2_5_VL = QwenArch(tiny_qwen2_5_vl_config, "Qwen2_5_VLForConditionalGeneration", make_qwen_processor,
                      "Qwen2_5_VLProcessor", "projects.sa2va.models.mllm.qwenvl.Qwen2_5_VL", "sa2va_tiny_qwen25vl.py")


# --------------------------------------------------------------------------------------------------
# the Sa2VA-like training module
# --------------------------------------------------------------------------------------------------
class _MLLM(nn.Module):
    """Stand-in for Sa2VA's ``Qwen2_5_VL`` wrapper: ``.model`` is the peft-wrapped HF model."""

    def __init__(self, model):
        super().__init__()
        self.model = model


class _GroundingEncoder(nn.Module):
    """Stand-in for Sa2VA's ``SAM2TrainRunner``: ``.sam2_model`` is Meta's SAM2Base."""

    def __init__(self, sam2_model):
        super().__init__()
        self.sam2_model = sam2_model
        self.hidden_dim = sam2_model.hidden_dim
        self.img_mean = (0.485, 0.456, 0.406)
        self.img_std = (0.229, 0.224, 0.225)

    def preprocess_image(self, image: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.img_mean, dtype=image.dtype)[:, None, None]
        std = torch.tensor(self.img_std, dtype=image.dtype)[:, None, None]
        return (image / 255.0 - mean) / std

    def masks_from_language(self, images: torch.Tensor, language_embd: torch.Tensor):
        """Image features -> no-mem embedding -> SAM heads with the [SEG] embedding appended to the
        sparse prompt (Sa2VA's ``language_embd`` extension).  Returns (masks, object score logits)."""
        sam = self.sam2_model
        feats = sam.forward_image(images)
        _, vis, _, sizes = sam._prepare_backbone_features(feats)
        high_res = [x.permute(1, 2, 0).reshape(x.size(1), x.size(2), *s) for x, s in zip(vis[:-1], sizes[:-1])]
        B, C = vis[-1].size(1), sam.hidden_dim
        H, W = sizes[-1]
        pix = (vis[-1] + sam.no_mem_embed).permute(1, 2, 0).reshape(B, C, H, W)
        sparse, dense = sam.sam_prompt_encoder(
            points=(torch.zeros(B, 1, 2), -torch.ones(B, 1, dtype=torch.int32)), boxes=None, masks=None
        )
        sparse = torch.cat([sparse, language_embd[:, None].to(sparse.dtype)], dim=1)
        multimask = sam._use_multimask(is_init_cond_frame=True, point_inputs=None)
        low_res, ious, _, obj_logits = sam.sam_mask_decoder(
            image_embeddings=pix,
            image_pe=sam.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
            repeat_image=False,
            high_res_features=high_res,
        )
        if multimask:
            best = torch.argmax(ious, dim=-1)
            low_res = low_res[torch.arange(B), best]
        else:
            low_res = low_res[:, 0]
        return low_res, obj_logits


def _build_sa2va_module_class():
    from mmengine.model import BaseModel

    class TinySa2VAModel(BaseModel):
        """Mirror of Sa2VA's ``Sa2VAModel`` attribute layout and ``state_dict`` override."""

        def __init__(self, peft_model, sam2_model, seg_token_idx: int, adapter_name: str = "default"):
            super().__init__()
            self.mllm = _MLLM(peft_model)
            self.grounding_encoder = _GroundingEncoder(sam2_model)
            self.grounding_encoder.requires_grad_(False)
            self.grounding_encoder.sam2_model.sam_mask_decoder.requires_grad_(True)
            in_dim = peft_model.config.text_config.hidden_size
            out_dim = self.grounding_encoder.hidden_dim
            self.text_hidden_fcs = nn.Sequential(
                nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim), nn.Dropout(0.0)
            )
            self.seg_token_idx = seg_token_idx
            self.adapter_name = adapter_name

        def init_weights(self):  # weights come from the fixture, never re-initialise (HF has init_weights)
            pass

        def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
            full = super().state_dict(prefix=prefix, keep_vars=keep_vars)
            peft_model = self.mllm.model
            mts = list(getattr(peft_model, "modules_to_save", None) or [])
            a = self.adapter_name
            lora, mts_out, rest = {}, {}, {}
            mllm_prefix = prefix + "mllm."
            for k, v in full.items():
                v = v if keep_vars else v.detach().to(torch.bfloat16)  # Sa2VA trains in bf16
                if k.startswith(mllm_prefix):
                    # xtuner's get_peft_model_state_dict: LoRA tensors first, then modules_to_save copies
                    if "lora_" in k and a in k:
                        lora[k] = v
                    elif any(f"{m}.modules_to_save.{a}" in k for m in mts):
                        mts_out[k] = v
                elif k.startswith(prefix + "grounding_encoder."):
                    if k.startswith(prefix + "grounding_encoder.sam2_model.sam_mask_decoder"):
                        rest[k] = v
                elif k.startswith(prefix + "text_hidden_fcs."):
                    rest[k] = v
            out = {**lora, **mts_out, **rest}
            if destination is not None:
                destination.update(out)
                return destination
            from collections import OrderedDict

            return OrderedDict(out)

        def forward(self, data, data_samples=None, mode="loss"):
            assert mode == "loss"
            peft_model = self.mllm.model
            out = peft_model(
                input_ids=data["input_ids"],
                attention_mask=data["attention_mask"],
                labels=data["labels"],
                pixel_values=data["pixel_values"],
                image_grid_thw=data["image_grid_thw"],
                output_hidden_states=True,
                **({"mm_token_type_ids": data["mm_token_type_ids"]} if "mm_token_type_ids" in data else {}),
            )
            hidden = self.text_hidden_fcs(out.hidden_states[-1])
            seg_mask = data["input_ids"] == self.seg_token_idx
            lang = hidden[seg_mask]  # one [SEG] per sample
            ge = self.grounding_encoder
            images = torch.stack([ge.preprocess_image(x) for x in data["g_pixel_values"]])
            masks, obj_logits = ge.masks_from_language(images, lang)
            gt = data["masks"].to(masks.dtype)
            gt = F.interpolate(gt[:, None], size=masks.shape[-2:], mode="nearest")[:, 0]
            loss_mask = F.binary_cross_entropy_with_logits(masks, gt)
            prob = masks.sigmoid().flatten(1)
            g = gt.flatten(1)
            loss_dice = (1 - (2 * (prob * g).sum(-1) + 1) / (prob.sum(-1) + g.sum(-1) + 1)).mean()
            loss_obj = F.binary_cross_entropy_with_logits(obj_logits.flatten(), torch.ones_like(obj_logits.flatten()))
            return {"llm_loss": out.loss, "loss_mask": loss_mask, "loss_dice": loss_dice, "loss_obj": 0.1 * loss_obj}

    return TinySa2VAModel


class _TinySegDataset(torch.utils.data.Dataset):
    """Deterministic in-memory referring-segmentation samples (qwen_chat template, one [SEG])."""

    def __init__(self, processor, seed: int, n: int = 8, sam_image_size: int = 256, token_types: bool = False):
        self.items = []
        gen = torch.Generator().manual_seed(seed + 10)
        tok = processor.tokenizer
        objects = ["cat", "dog", "car", "tree", "person", "bird", "cup", "chair"]
        for i in range(n):
            img = (torch.rand(56, 56, 3, generator=gen) * 255).to(torch.uint8).numpy()
            obj = objects[i % len(objects)]
            prompt = (
                "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
                f"Please segment the {obj} in this image.<|im_end|>\n<|im_start|>assistant\n"
            )
            answer = "Sure, it is [SEG].<|im_end|>"
            enc = processor(text=[prompt + answer], images=[img], return_tensors="pt")
            ids = enc["input_ids"][0]
            n_prompt = len(processor(text=[prompt], images=[img], return_tensors="pt")["input_ids"][0])
            labels = ids.clone()
            labels[:n_prompt] = -100
            g_img = (torch.rand(3, sam_image_size, sam_image_size, generator=gen) * 255).float()
            yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
            cy, cx = torch.randint(16, 48, (2,), generator=gen).tolist()
            mask = (((yy - cy) ** 2 + (xx - cx) ** 2) < 15**2).to(torch.uint8)
            item = dict(
                input_ids=ids,
                labels=labels,
                pixel_values=enc["pixel_values"],
                image_grid_thw=enc["image_grid_thw"],
                g_pixel_values=g_img,
                masks=mask,
            )
            if token_types:  # Qwen3-VL's M-RoPE needs the processor's image-token marks
                item["mm_token_type_ids"] = enc["mm_token_type_ids"][0]
            self.items.append(item)
        self.pad_id = tok.pad_token_id

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _collate(pad_id, batch):
    L = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), L), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), L), -100, dtype=torch.long)
    att = torch.zeros((len(batch), L), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = b["input_ids"]
        labels[i, :n] = b["labels"]
        att[i, :n] = 1
    data = dict(
        input_ids=ids,
        labels=labels,
        attention_mask=att,
        pixel_values=torch.cat([b["pixel_values"] for b in batch]),
        image_grid_thw=torch.cat([b["image_grid_thw"] for b in batch]),
        g_pixel_values=[b["g_pixel_values"] for b in batch],
        masks=torch.stack([b["masks"] for b in batch]),
    )
    if "mm_token_type_ids" in batch[0]:
        types = torch.zeros((len(batch), L), dtype=batch[0]["mm_token_type_ids"].dtype)
        for i, b in enumerate(batch):
            types[i, :len(b["input_ids"])] = b["mm_token_type_ids"]
        data["mm_token_type_ids"] = types
    return dict(data=data, data_samples=None)


def _config_text(base_dir: Path, sam2_cfg_path: Path, sam2_pt: Path, train_steps: int, seed: int,
                 arch: "QwenArch | None" = None) -> str:
    arch = arch or QWEN2_5_VL
    return f'''\
from mmengine.hooks import (CheckpointHook, DistSamplerSeedHook, IterTimerHook,
                            LoggerHook, ParamSchedulerHook)
from mmengine.optim import LinearLR, OptimWrapper
from peft import LoraConfig
from torch.optim import AdamW
from transformers import AutoTokenizer, {arch.processor_class}

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
# Model
path = {str(base_dir)!r}
pretrained_pth = None

# Data
template = "qwen_chat"
max_length = 512

# Scheduler & Optimizer
batch_size = 2  # per_device
accumulative_counts = 1
dataloader_num_workers = 0
max_iters = {train_steps}
optim_type = AdamW
lr = 1e-3
betas = (0.9, 0.999)
weight_decay = 0.05
max_norm = 1  # grad clip

# Save
save_steps = {train_steps}
save_total_limit = 2

special_tokens = {SPECIAL_TOKENS!r}

tokenizer = dict(
    type=AutoTokenizer.from_pretrained,
    pretrained_model_name_or_path=path,
    trust_remote_code=True,
    padding_side='right')

#######################################################################
#            PART 2  Model & Tokenizer & Image Processor              #
#######################################################################
model = dict(
    type='projects.sa2va.models.Sa2VAModel',
    training_bs=batch_size,
    special_tokens=special_tokens,
    pretrained_pth=pretrained_pth,
    frozen_sam2_decoder=False,
    arch_type='qwen',
    mllm=dict(
        type={arch.sa2va_mllm_type!r},
        model_path=path,
        freeze_llm=True,
        freeze_visual_encoder=True,
        llm_lora=dict(
            type=LoraConfig,
            r={LORA_R},
            lora_alpha={LORA_ALPHA},
            lora_dropout=0.0,
            bias='none',
            task_type='CAUSAL_LM',
            modules_to_save=['embed_tokens', 'lm_head'],
            target_modules={LORA_TARGET_REGEX!r},
        ),
    ),
    tokenizer=tokenizer,
    grounding_encoder=dict(
        type='projects.sa2va.models.SAM2TrainRunner',
        cfg_path={str(sam2_cfg_path)!r},
        ckpt_path={str(sam2_pt)!r},
    ),
)

preprocessor = dict(
    type={arch.processor_class}.from_pretrained,
    pretrained_model_name_or_path=path,
    trust_remote_code=True,
)

#######################################################################
#                    PART 4  Scheduler & Optimizer                    #
#######################################################################
optim_wrapper = dict(
    type=OptimWrapper,
    optimizer=dict(type=optim_type, lr=lr, betas=betas, weight_decay=weight_decay),
    clip_grad=dict(max_norm=max_norm, error_if_nonfinite=False),
    accumulative_counts=accumulative_counts,
)

param_scheduler = [
    dict(type=LinearLR, start_factor=0.5, by_epoch=False, begin=0, end=max_iters),
]

train_cfg = dict(by_epoch=False, max_iters=max_iters, val_interval=max_iters + 1)

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
default_hooks = dict(
    timer=dict(type=IterTimerHook),
    logger=dict(type=LoggerHook, log_metric_by_epoch=False, interval=1),
    param_scheduler=dict(type=ParamSchedulerHook),
    checkpoint=dict(
        type=CheckpointHook,
        save_optimizer=False,
        by_epoch=False,
        interval=save_steps,
        max_keep_ckpts=save_total_limit),
    sampler_seed=dict(type=DistSamplerSeedHook),
)

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='gloo'),
)
visualizer = None
log_level = 'WARNING'
load_from = None
resume = False
randomness = dict(seed={seed}, deterministic=False)
log_processor = dict(by_epoch=False)
'''


_PRETTY_TEXT_CACHE: dict = {}


def _cached_pretty_config_class():
    from mmengine.config import Config

    class CachedPrettyConfig(Config):
        """mmengine ``Config`` whose ``pretty_text`` (a yapf run, ~1.3 s, called ~5x by Runner) is
        computed once by mmengine itself and then reused; the text is unchanged."""

        @property
        def pretty_text(self) -> str:
            key = (self.filename, self.text, repr(self._cfg_dict))
            if key not in _PRETTY_TEXT_CACHE:
                _PRETTY_TEXT_CACHE.clear()
                _PRETTY_TEXT_CACHE[key] = Config.pretty_text.fget(self)
            return _PRETTY_TEXT_CACHE[key]

    return CachedPrettyConfig


# --------------------------------------------------------------------------------------------------
# the fixture
# --------------------------------------------------------------------------------------------------
@dataclass
class Sa2VAQwenFixture:
    base_dir: Path
    sam2_pt: Path
    sam2_meta_config: dict
    ckpt: Path
    lora_r: int
    lora_alpha: int
    special_tokens: list
    peft_model: Any
    meta_sam2: Any
    text_hidden_fcs: torch.nn.Module
    tokenizer: Any
    ds_ckpt: Path | None = None
    config_path: Path | None = None  # the mmengine config file the run used (text == meta['cfg'] source)
    processor: Any = None  # Qwen2_5_VLProcessor built from base_dir + the 5 added tokens
    extras: dict = field(default_factory=dict)


def _build_lora_config():
    from peft import LoraConfig

    return LoraConfig(
        r=LORA_R,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=LORA_TARGET_REGEX,
        modules_to_save=["embed_tokens", "lm_head"],
    )


def make_sa2va_qwen_fixture(
    root: Path,
    *,
    seed: int = 0,
    deepspeed: bool = False,
    train_steps: int = 2,
    base_vocab_size: int | None = None,
    arch: "QwenArch | None" = None,
) -> Sa2VAQwenFixture:
    """Build the tiny base model, SAM2 checkpoint and a genuine mmengine Sa2VA checkpoint under ``root``.

    ``base_vocab_size``: embedding rows of the saved base model (default: ``len(base tokenizer)``).
    ``arch``: which Qwen-VL generation (default :data:`QWEN2_5_VL`; :mod:`maskport.testing.sa2va_qwen3_vl` passes
    its Qwen3-VL one; the DeepSpeed folders are built for Qwen2.5-VL only).
    Real Qwen2.5-VL checkpoints pad it (151936 rows for a 151665-token tokenizer), and Sa2VA's
    ``resize_token_embeddings(len(tokenizer))`` then *shrinks* it; pass e.g. 512 to reproduce that.
    """
    import logging

    from mmengine.config import Config
    from mmengine.runner import Runner
    from peft import get_peft_model
    import transformers
    from transformers import AutoTokenizer

    arch = arch or QWEN2_5_VL
    if deepspeed and arch is not QWEN2_5_VL:
        raise ValueError("the DeepSpeed folders are built for the Qwen2.5-VL fixture only")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    base_dir = root / "base"
    sam2_dir = root / "sam2"
    work_dir = root / "work_dir"
    sam2_dir.mkdir(parents=True, exist_ok=True)

    # ---- base Qwen2.5-VL ----------------------------------------------------------------------
    base_tok = make_tiny_tokenizer(base_dir)
    processor = arch.make_processor(base_tok)
    processor.save_pretrained(str(base_dir))
    cfg = arch.make_config(base_vocab_size or len(base_tok))
    torch.manual_seed(seed)
    model = getattr(transformers, arch.model_class)(cfg).float()
    gen = torch.Generator().manual_seed(seed + 3)
    perturb_(model.parameters(), gen, 0.02)  # make norms/biases distinctive too
    round_bf16_(model)  # the oracle holds exactly the bf16 values saved below
    # save a bf16 copy (a .to(bf16)/.float() round trip would also round non-persistent buffers such
    # as the rotary inv_freq, which a from_pretrained() model recomputes in fp32)
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(str(base_dir), safe_serialization=True)
    model.eval()

    # ---- Meta SAM2 -----------------------------------------------------------------------------
    sam2_cfg = tiny_meta_sam2_config()
    sam2 = make_meta_sam2(sam2_cfg, seed)
    sam2_pt = sam2_dir / "tiny_sam2.pt"
    torch.save({"model": sam2.state_dict()}, sam2_pt)
    sam2_cfg_path = sam2_dir / f"{sam2_pt.stem}.config.json"
    sam2_cfg_path.write_text(json.dumps(sam2_cfg, indent=2))

    # ---- Sa2VA stage-2 setup -------------------------------------------------------------------
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    n_new = tokenizer.add_tokens(SPECIAL_TOKENS, special_tokens=True)
    assert n_new == len(SPECIAL_TOKENS)
    torch.manual_seed(seed + 4)
    model.resize_token_embeddings(len(tokenizer))
    model.requires_grad_(False)
    peft_model = get_peft_model(model, _build_lora_config())
    gen = torch.Generator().manual_seed(seed + 5)
    # emulate a long run: LoRA B / modules_to_save copies / SAM decoder move away from their init
    perturb_([p for n, p in peft_model.named_parameters() if "lora_B" in n], gen, 0.05)
    perturb_([p for n, p in peft_model.named_parameters() if ".modules_to_save." in n], gen, 0.01)
    perturb_(sam2.sam_mask_decoder.parameters(), gen, 0.01)
    train_processor = arch.make_processor(tokenizer)
    seg_idx = tokenizer.convert_tokens_to_ids("[SEG]")

    Sa2VA = _build_sa2va_module_class()
    torch.manual_seed(seed + 6)
    module = Sa2VA(peft_model, sam2, seg_idx)
    module.train()

    _CachedPrettyConfig = _cached_pretty_config_class()
    cfg_path = root / arch.config_file
    cfg_path.write_text(_config_text(base_dir, sam2_cfg_path, sam2_pt, train_steps, seed, arch))
    mm_cfg = Config.fromfile(str(cfg_path))
    object.__setattr__(mm_cfg, "__class__", _CachedPrettyConfig)  # same object, pretty_text memoised (see class docstring)

    dataset = _TinySegDataset(train_processor, seed, sam_image_size=sam2_cfg["model"]["image_size"],
                              token_types=arch.token_types)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=2,
        shuffle=False,
        num_workers=0,
        collate_fn=functools.partial(_collate, dataset.pad_id),
    )
    runner = Runner(
        model=module,
        work_dir=str(work_dir),
        experiment_name=f"sa2va_tiny_{uuid.uuid4().hex[:8]}",
        train_dataloader=loader,
        train_cfg=mm_cfg.train_cfg,
        optim_wrapper=mm_cfg.optim_wrapper,
        param_scheduler=mm_cfg.param_scheduler,
        default_hooks=mm_cfg.default_hooks,
        env_cfg=mm_cfg.env_cfg,
        randomness=mm_cfg.randomness,
        log_processor=mm_cfg.log_processor,
        log_level=mm_cfg.log_level,
        cfg=mm_cfg,
    )
    runner.train()
    # mmengine leaves FileHandlers open on the work_dir log; close ours
    for h in list(runner.logger.handlers):
        if isinstance(h, logging.FileHandler):
            h.close()
            runner.logger.removeHandler(h)
    ckpt = work_dir / f"iter_{train_steps}.pth"
    assert ckpt.is_file(), f"mmengine did not write {ckpt}"

    # ---- oracle objects: exactly the values on disk --------------------------------------------
    module.eval()
    round_bf16_(module, only_trainable=True)
    sd = safe_torch_load(ckpt, mmap=False)["state_dict"]  # the converter's own allowlist reads mmengine files
    live = module.state_dict()
    assert list(sd) == list(live), "checkpoint keys differ from the module's state_dict"
    for k in sd:
        assert torch.equal(sd[k], live[k]), f"checkpoint value of {k} differs from the in-memory module"
    peft_model.eval()
    for p in peft_model.parameters():
        p.requires_grad_(False)
    text_fcs = module.text_hidden_fcs.eval()
    sam2.eval()
    for p in list(sam2.parameters()) + list(text_fcs.parameters()):
        p.requires_grad_(False)

    ds_ckpt = None
    if deepspeed:
        ds_ckpt = _run_deepspeed_worker(root, base_dir, sam2_cfg_path, sam2_pt, ckpt, seed, train_steps)

    return Sa2VAQwenFixture(
        base_dir=base_dir,
        sam2_pt=sam2_pt,
        sam2_meta_config=sam2_cfg,
        ckpt=ckpt,
        lora_r=LORA_R,
        lora_alpha=LORA_ALPHA,
        special_tokens=list(SPECIAL_TOKENS),
        peft_model=peft_model,
        meta_sam2=sam2,
        text_hidden_fcs=text_fcs,
        tokenizer=tokenizer,
        ds_ckpt=ds_ckpt,
        config_path=cfg_path,
        processor=train_processor,
        extras=dict(seg_token_idx=seg_idx, work_dir=work_dir, lora_target_regex=LORA_TARGET_REGEX),
    )


# --------------------------------------------------------------------------------------------------
# DeepSpeed (run in subprocesses: it initialises torch.distributed and patches global state)
# --------------------------------------------------------------------------------------------------
def _run_deepspeed_worker(root, base_dir, sam2_cfg_path, sam2_pt, ckpt, seed, train_steps, *, stage: int = 2,
                          world_size: int = 1, unfiltered_state_dict: bool = False,
                          out_name: str = "ds_work_dir") -> Path:
    from .deepspeed import save_with_deepspeed

    args = dict(base_dir=str(base_dir), sam2_cfg_path=str(sam2_cfg_path), sam2_pt=str(sam2_pt), ckpt=str(ckpt),
                seed=seed)
    return save_with_deepspeed(f"{__name__}:_ds_build", args, Path(root) / out_name, f"iter_{train_steps}.pth",
                               stage=stage, world_size=world_size, bf16=True,
                               unfiltered_state_dict=unfiltered_state_dict, timeout=600)


def write_deepspeed_checkpoint(fx: "Sa2VAQwenFixture", root: Path, *, stage: int = 2, world_size: int = 1,
                               unfiltered_state_dict: bool = False, seed: int = 0, train_steps: int = 2) -> Path:
    """Another genuine DeepSpeed save (bf16) of the fixture's trained module, under ``root``: ZeRO ``stage`` with
    ``world_size`` ranks; ``unfiltered_state_dict``: DeepSpeed's module state then keeps every persistent buffer
    (SAM2's ``positional_encoding_gaussian_matrix``) beside the trained parameters (see
    :mod:`maskport.testing.deepspeed`). Returns the tag folder."""
    return _run_deepspeed_worker(root, fx.base_dir, fx.sam2_pt.with_suffix(".config.json"), fx.sam2_pt, fx.ckpt,
                                 seed, train_steps, stage=stage, world_size=world_size,
                                 unfiltered_state_dict=unfiltered_state_dict, out_name=Path(root).name + "_ds")


def _ds_build(args: dict):
    """Rebuild the training module and load the trained values of the mmengine checkpoint (a builder for
    :func:`maskport.testing.deepspeed.save_with_deepspeed`); the client state is mmengine's extra entries."""
    from peft import get_peft_model
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    seed = args["seed"]
    base_dir = args["base_dir"]
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokenizer.add_tokens(SPECIAL_TOKENS, special_tokens=True)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed + 4)
    model.resize_token_embeddings(len(tokenizer))
    model.requires_grad_(False)
    peft_model = get_peft_model(model, _build_lora_config())
    sam2_cfg = json.loads(Path(args["sam2_cfg_path"]).read_text())
    sam2 = build_meta_sam2(sam2_cfg)
    sam2.load_state_dict(torch.load(args["sam2_pt"], map_location="cpu", weights_only=True)["model"])
    Sa2VA = _build_sa2va_module_class()
    module = Sa2VA(peft_model, sam2, tokenizer.convert_tokens_to_ids("[SEG]"))
    # the file this fixture's own mmengine run just wrote; a full unpickle on purpose: its client state (mmengine's
    # message hub, schedulers) goes into the DeepSpeed checkpoint as the real objects, as a real run's does
    ck = torch.load(args["ckpt"], map_location="cpu", weights_only=False)
    # a training checkpoint holds the trainable tensors only: the frozen ones are "missing" by design; nothing may be
    # unexpected, and the checkpoint must hold exactly the trainable parameters (both asserted below)
    missing, unexpected = module.load_state_dict({k: v.float() for k, v in ck["state_dict"].items()}, strict=False)
    assert not unexpected, unexpected
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == set(ck["state_dict"]), sorted(trainable ^ set(ck["state_dict"]))[:10]
    return module, {k: ck[k] for k in ("meta", "message_hub", "param_schedulers") if k in ck}


# --------------------------------------------------------------------------------------------------
# the released HF folder Sa2VA's own export script writes
# --------------------------------------------------------------------------------------------------
def make_released_folder(fx: Sa2VAQwenFixture, out: Path, *, mllm_state: dict | None = None) -> Path:
    """The folder Sa2VA's ``tools/convert_to_hf.py`` writes for the fixture's trained model (``Sa2VAChatModelQwen``):
    ``model.*`` = the MLLM after peft's ``merge_and_unload`` (``modules_to_save`` copies in place), the whole SAM2
    under ``grounding_encoder.sam2_model.`` in Meta's names with ``gamma`` renamed ``g_weight``,
    ``text_hidden_fcs.*``; ``config.json`` = the base's MLLM config with ``model_type`` ``sa2va_chat``, the
    vocabulary of the tokenizer, untied embeddings, ``template`` and ``auto_map``; the processor (tokenizer with
    Sa2VA's tokens) saved beside it. Tensors in float32 (the fixture's values).

    ``mllm_state``: the MLLM's tensors (transformers' names) to write instead of peft's merge, e.g. those of a
    maskport export, to build the folder from exactly the same weights."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True)
    if mllm_state is None:
        merged = copy.deepcopy(fx.peft_model).merge_and_unload()
        mllm_state = merged.state_dict()
    sd = {"model." + k: v.detach().float().clone().contiguous() for k, v in mllm_state.items()}
    for k, v in fx.meta_sam2.state_dict().items():
        sd["grounding_encoder.sam2_model." + k.replace(".gamma", ".g_weight")] = v.detach().clone().contiguous()
    for k, v in fx.text_hidden_fcs.state_dict().items():
        sd["text_hidden_fcs." + k] = v.detach().clone().contiguous()
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((fx.base_dir / "config.json").read_text())
    cfg.update(model_type="sa2va_chat", architectures=["Sa2VAChatModelQwen"], template="qwen_chat",
               tie_word_embeddings=False,
               auto_map={"AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfigQwen",
                         "AutoModel": "modeling_sa2va_qwen.Sa2VAChatModelQwen",
                         "AutoModelForCausalLM": "modeling_sa2va_qwen.Sa2VAChatModelQwen"})
    cfg["text_config"].update(vocab_size=len(fx.tokenizer), tie_word_embeddings=False)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "modeling_sa2va_qwen.py").write_text("raise RuntimeError('remote code must never run')\n")
    fx.processor.save_pretrained(str(out))
    return out
