"""Configuration of a maskport export of F-LMM (family ``flmm``: a frozen LMM grounded by a mask head on its
attention maps, refined by SAM).

This file is copied verbatim into every export folder and loaded with ``trust_remote_code=True`` on machines that
do not have maskport installed: it may import only torch, transformers, numpy and PIL, and its sibling
``sam_image`` (the SAM v1 settings shared by the families' exports).

Sub-configurations (transformers' ``sub_configs``): ``lmm_config`` (the frozen base LMM's own configuration, e.g. a
``LlavaConfig``; its ``model_type`` picks the class) and ``sam_config`` (a ``SamConfig``). Plain-data settings:
``mask_head`` (the U-Net's sizes), ``template`` (prompts), ``image_processor`` (the LMM's image preprocessing as
F-LMM runs it) and SAM's preprocessing.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import PretrainedConfig, SamConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, AutoConfig

from .sam_image import sam_head_settings

# The U-Net of F-LMM's configs (mmseg's UNet: 4 stages, 2 convs each, GroupNorm(1 group), ReLU, max-pool down,
# bilinear x2 + 1x1 conv up), fed with num_layers x num_heads attention maps.
DEFAULT_MASK_HEAD: dict[str, Any] = {
    "in_channels": None,        # num_hidden_layers * num_attention_heads of the LMM (checked by the model)
    "base_channels": 64,
    "num_stages": 4,
    "enc_num_convs": [2, 2, 2, 2],
    "dec_num_convs": [2, 2, 2],
    "norm_groups": 1,
    "norm_eps": 1e-5,           # torch's GroupNorm default (mmcv builds nn.GroupNorm with it)
    "upsample_input": 64,       # the attention grid is upsampled bilinearly so that its longer side is >= 64
    "normalize_input": True,    # each map divided by its sum over the grid
    "merge": "mean",            # rows of a phrase's tokens are averaged
}

# F-LMM's LLaVA-1.5 prompt (xtuner's ``vicuna`` template, INSTRUCTION only) and its referring-segmentation input:
# the prompt, then each phrase's tokens followed by the token of ``phrase_separator``.
DEFAULT_TEMPLATE: dict[str, Any] = {
    "instruction": "USER: {input} ASSISTANT:",
    "ground_input": "<image>\nPlease give me a description of the image.",
    "chat_input": "<image>\n{text}",
    "image_placeholder": "<image>",
    "phrase_separator": ".",
    "stop_words": ["</s>"],
    # predict_forward(text="ground: <expression>") runs ground(phrases=[expression]) (F-LMM's referring
    # segmentation, no generation), e.g. maskport verify --prompt-template "ground: {sentence}"
    "ground_prefix": "ground: ",
}

# A frozen Qwen2.5-VL (maskport's adaptation, no F-LMM release to follow): Qwen's chat template with its default
# system prompt; the image block first in the user turn, as Qwen2.5-VL's processor renders it.
QWEN2_5_VL_TEMPLATE: dict[str, Any] = {
    "instruction": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{input}<|im_end|>\n"
                   "<|im_start|>assistant\n",
    "ground_input": "<|vision_start|><|image_pad|><|vision_end|>Please give me a description of the image.",
    "chat_input": "<|vision_start|><|image_pad|><|vision_end|>{text}",
    "image_placeholder": "<|image_pad|>",
    "phrase_separator": ".",
    "stop_words": ["<|im_end|>", "<|endoftext|>"],
    "ground_prefix": "ground: ",
}

# The LMM image preprocessing F-LMM uses for LLaVA-1.5: the longer side resized to ``size`` (PIL bicubic), the
# image centred on a ``size`` x ``size`` square filled with the mean colour (``int(mean * 255)``), then scaled to
# [0, 1] and normalised with CLIP's mean/std.
DEFAULT_IMAGE_PROCESSOR: dict[str, Any] = {
    "size": 336,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}

# Qwen2.5-VL: transformers' Qwen2-VL image processor (smart resize to multiples of patch * merge within the pixel
# bounds, no padding); the merged-token grid is (grid_h / merge, grid_w / merge).
QWEN2_5_VL_IMAGE_PROCESSOR: dict[str, Any] = {
    "min_pixels": 256 * 28 * 28,
    "max_pixels": 1280 * 28 * 28,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}

TEMPLATES = {"llava": DEFAULT_TEMPLATE, "qwen2_5_vl": QWEN2_5_VL_TEMPLATE}
IMAGE_PROCESSORS = {"llava": DEFAULT_IMAGE_PROCESSOR, "qwen2_5_vl": QWEN2_5_VL_IMAGE_PROCESSOR}


def _merged(default: dict, given: dict | None) -> dict:
    out = copy.deepcopy(default)
    if given:
        out.update(copy.deepcopy(dict(given)))
    return out


def _sub_config(value, what: str):
    if isinstance(value, PretrainedConfig):
        return value
    if isinstance(value, dict):
        data = copy.deepcopy(value)
        model_type = data.pop("model_type", None)
        if model_type not in CONFIG_MAPPING:
            raise ValueError(f"{what}: unknown model_type {model_type!r}")
        return CONFIG_MAPPING[model_type](**data)
    raise TypeError(f"{what} must be a dict or a PretrainedConfig, got {type(value).__name__}")


class FLMMConfig(PretrainedConfig):
    r"""Configuration of ``FLMMModel``.

    Args:
        lmm_config (`dict` or `PretrainedConfig`): the frozen base LMM's configuration (``model_type`` ``llava`` or
            ``qwen2_5_vl``).
        sam_config (`dict` or `SamConfig`): transformers' SAM configuration (ViT-L for F-LMM).
        mask_head (`dict`): U-Net sizes, see ``DEFAULT_MASK_HEAD``.
        text_proj_dim (`int`): output width of ``text_proj`` (SAM's prompt width, 256).
        template (`dict`): prompts, see ``DEFAULT_TEMPLATE``.
        image_processor (`dict`): the LMM's image preprocessing, see ``DEFAULT_IMAGE_PROCESSOR``.
        sam_image_size, sam_pixel_mean, sam_pixel_std: SAM's preprocessing (Meta's defaults).
        mask_threshold (`float`, 0.5): threshold on the sigmoid of SAM's logits (F-LMM: logits > 0).
        max_new_tokens (`int`): generation length of ``predict_forward``.
        maskport (`dict`): provenance.
    """

    model_type = "maskport_flmm"
    sub_configs = {"lmm_config": AutoConfig, "sam_config": SamConfig}

    def __init__(self, lmm_config=None, sam_config=None, mask_head: dict | None = None, text_proj_dim: int | None = None,
                 template: dict | None = None, image_processor: dict | None = None, sam_image_size: int | None = None,
                 sam_pixel_mean=None, sam_pixel_std=None, mask_threshold: float = 0.5, max_new_tokens: int = 512,
                 maskport: dict | None = None, **kwargs):
        self.lmm_config = _sub_config(lmm_config if lmm_config is not None else {"model_type": "llava"}, "lmm_config")
        self.sam_config = sam_config if isinstance(sam_config, SamConfig) else SamConfig(**copy.deepcopy(sam_config or {}))
        self.mask_head = _merged(DEFAULT_MASK_HEAD, mask_head)
        base = self.lmm_config.model_type
        self.template = _merged(TEMPLATES.get(base, DEFAULT_TEMPLATE), template)
        self.image_processor = _merged(IMAGE_PROCESSORS.get(base, DEFAULT_IMAGE_PROCESSOR), image_processor)
        for key, value in sam_head_settings(self.sam_config, sam_image_size, sam_pixel_mean, sam_pixel_std, False,
                                            mask_threshold, max_new_tokens, text_proj_dim).items():
            setattr(self, key, value)
        self.text_proj_dim = self.text_hidden_fcs_out_dim
        self.maskport = dict(maskport) if maskport is not None else {"family": "flmm", "version": None,
                                                                    "mapping_version": None}
        super().__init__(**kwargs)


__all__ = ["FLMMConfig"]
