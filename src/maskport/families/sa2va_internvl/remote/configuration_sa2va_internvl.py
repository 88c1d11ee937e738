"""Configuration of a maskport export of Sa2VA on InternVL (family ``sa2va-internvl``).

Copied verbatim into every export folder and loaded with ``trust_remote_code=True`` on machines without
maskport: it may import only torch, transformers, numpy and PIL, and its sibling ``sam2_image``
(the SAM2 settings shared by the families' exports).

Two sub-configurations (transformers' ``sub_configs``): ``mllm_config``, an ``InternVLConfig`` (transformers'
native InternVL: InternViT vision tower, projector, and a Qwen2 or Llama language model -- InternLM2 is exported
in Llama's layout), and ``sam2_config``, a ``Sam2VideoConfig``. The rest is plain data ``predict_forward`` needs.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import InternVLConfig, PretrainedConfig, Sam2VideoConfig

from .sam2_image import sam2_head_settings
from .sam2_video import sam2_video_config

DEFAULT_SPECIAL_TOKENS = ["[SEG]", "<p>", "</p>", "<vp>", "</vp>"]

# xtuner's templates as Sa2VA's InternVL models use them (PROMPT_TEMPLATE.<name>): Sa2VA's inference renders only
# INSTRUCTION (no system turn) after ``past_text``.
TEMPLATES: dict[str, dict[str, Any]] = {
    "internlm2_chat": {
        "system": "<|im_start|>system\n{system}<|im_end|>\n",
        "user": "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
        "suffix": "<|im_end|>",
        "stop_words": ["<|im_end|>"],
    },
    "qwen_chat": {
        "system": "<|im_start|>system\n{system}<|im_end|>\n",
        "user": "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
        "suffix": "<|im_end|>",
        "stop_words": ["<|im_end|>", "<|endoftext|>"],
    },
    "phi3_chat": {
        "system": "<|system|>\n{system}<|end|>\n",
        "user": "<|user|>\n{input}<|end|>\n<|assistant|>\n",
        "suffix": "<|end|>",
        "stop_words": ["<|end|>"],
    },
}
_XTUNER_KEYS = {"SYSTEM": "system", "INSTRUCTION": "user", "SUFFIX": "suffix", "STOP_WORDS": "stop_words"}

# InternVL's image handling as Sa2VA runs it: dynamic tiling into 448 px tiles (1..12, plus a thumbnail when
# there is more than one tile), ImageNet normalisation, 256 ``<IMG_CONTEXT>`` tokens per tile between
# ``<img>``/``</img>``.
DEFAULT_IMAGE_PROCESSOR: dict[str, Any] = {
    "image_size": 448,
    "min_dynamic_patch": 1,
    "max_dynamic_patch": 12,
    "use_thumbnail": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "img_start_token": "<img>",
    "img_context_token": "<IMG_CONTEXT>",
    "img_end_token": "</img>",
    "image_placeholder": "<image>",
}



def normalize_template(template: dict | str | None) -> dict[str, Any]:
    """A template name (``internlm2_chat``, ``qwen_chat``, ``phi3_chat``) or dict (xtuner's upper-case keys or
    ours) -> our keys: ``system``, ``user`` (with ``{input}``, ending with the assistant prefix), ``suffix``,
    ``stop_words``."""
    if template is None:
        template = "internlm2_chat"
    if isinstance(template, str):
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}; known: {sorted(TEMPLATES)}")
        template = TEMPLATES[template]
    out = {}
    for k, v in dict(template).items():
        out[_XTUNER_KEYS.get(k, k)] = copy.deepcopy(v)
    if isinstance(out.get("stop_words"), str):
        out["stop_words"] = [out["stop_words"]]
    if "user" not in out or "{input}" not in out["user"]:
        raise ValueError(f"template needs a 'user'/'INSTRUCTION' entry with {{input}}, got {template!r}")
    return out


class Sa2VAInternVLConfig(PretrainedConfig):
    r"""Configuration of ``Sa2VAInternVLModel``.

    Args:
        mllm_config (`dict` or `InternVLConfig`): transformers' InternVL configuration (its ``image_token_id``
            is the id of ``<IMG_CONTEXT>``, ``image_seq_length`` the tokens per tile).
        sam2_config (`dict` or `Sam2VideoConfig`): transformers' SAM2 configuration.
        seg_token / seg_token_id / special_tokens: ``[SEG]``, its id, and Sa2VA's added tokens in order.
        template (`dict` or `str`): the chat template Sa2VA trained with (see ``TEMPLATES``).
        image_processor (`dict`): tiling settings (see ``DEFAULT_IMAGE_PROCESSOR``).
        add_bos_token (`bool`): whether the prompt starts with the tokenizer's BOS token (Sa2VA encodes the prompt
            with ``tokenizer.encode``, which adds it for InternLM2 and not for Qwen2).
        sam2_image_size, sam2_pixel_mean, sam2_pixel_std, sam2_multimask_output, mask_threshold, max_new_tokens,
        text_hidden_fcs_out_dim, maskport: as in the Qwen2.5-VL export.
    """

    model_type = "maskport_sa2va_internvl"
    sub_configs = {"mllm_config": InternVLConfig, "sam2_config": Sam2VideoConfig}

    def __init__(
        self,
        mllm_config: dict | InternVLConfig | None = None,
        sam2_config: dict | Sam2VideoConfig | None = None,
        seg_token: str = "[SEG]",
        seg_token_id: int | None = None,
        special_tokens: list[str] | None = None,
        template: dict | str | None = None,
        image_processor: dict | None = None,
        add_bos_token: bool = False,
        sam2_image_size: int | None = None,
        sam2_pixel_mean: list[float] | None = None,
        sam2_pixel_std: list[float] | None = None,
        sam2_multimask_output: bool = True,
        mask_threshold: float = 0.5,
        max_new_tokens: int = 2048,
        text_hidden_fcs_out_dim: int | None = None,
        maskport: dict | None = None,
        **kwargs,
    ):
        if isinstance(mllm_config, dict):
            mllm_config = InternVLConfig(**copy.deepcopy(mllm_config))
        elif mllm_config is None:
            mllm_config = InternVLConfig()
        sam2_config = sam2_video_config(sam2_config)
        self.mllm_config = mllm_config
        self.sam2_config = sam2_config
        self.seg_token = seg_token
        self.seg_token_id = seg_token_id
        self.special_tokens = list(special_tokens) if special_tokens is not None else list(DEFAULT_SPECIAL_TOKENS)
        self.template = normalize_template(template)
        ip = copy.deepcopy(DEFAULT_IMAGE_PROCESSOR)
        ip.update(copy.deepcopy(dict(image_processor or {})))
        self.image_processor = ip
        self.add_bos_token = bool(add_bos_token)
        for key, value in sam2_head_settings(
                sam2_config, sam2_image_size, sam2_pixel_mean, sam2_pixel_std, sam2_multimask_output, mask_threshold,
                max_new_tokens, text_hidden_fcs_out_dim).items():
            setattr(self, key, value)
        self.maskport = dict(maskport) if maskport is not None else {"family": "sa2va-internvl"}
        super().__init__(**kwargs)

    @property
    def text_hidden_size(self) -> int:
        return self.mllm_config.text_config.hidden_size


__all__ = ["Sa2VAInternVLConfig", "TEMPLATES", "normalize_template"]
