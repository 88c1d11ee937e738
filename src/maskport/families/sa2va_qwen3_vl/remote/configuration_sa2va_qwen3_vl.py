"""Configuration of a maskport export of Sa2VA on Qwen3-VL (family ``sa2va-qwen3-vl``).

This file is copied verbatim into every export folder and loaded with ``trust_remote_code=True`` on machines
that do not have maskport installed: it may import only torch, transformers, numpy and PIL, and its sibling ``sam2_image``
(the SAM2 settings shared by the families' exports).

The configuration holds two sub-configurations (transformers' ``sub_configs`` mechanism, so that
``save_pretrained``/``from_pretrained`` and the attention-implementation dispatch recurse into them):

- ``mllm_config``: a ``Qwen3VLConfig`` (the MLLM, ``Sa2VAQwen3VLModel.mllm``);
- ``sam2_config``: a ``Sam2VideoConfig`` (transformers' native SAM2 video model, image parts as ``Sam2Model``; ``Sa2VAQwen3VLModel.sam2``);

plus the plain-data settings ``predict_forward`` needs (special tokens, chat template, image-processor
settings, SAM2 preprocessing, thresholds) and the provenance written by maskport.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import PretrainedConfig, Qwen3VLConfig, Sam2VideoConfig

from .sam2_image import sam2_head_settings
from .sam2_video import sam2_video_config

# Sa2VA's added tokens, in the order Sa2VA adds them to the tokenizer (so the ids match training).
DEFAULT_SPECIAL_TOKENS = ["[SEG]", "<p>", "</p>", "<vp>", "</vp>"]

# The prompt Sa2VA's released Qwen3-VL HF code feeds the model: it builds
# ``[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]`` and renders it with the
# Qwen3-VL processor's chat template, which (unlike Qwen2.5-VL's) adds no default system prompt. Rendered:
#   <|im_start|>user\n<|vision_start|><|image_pad|>...<|vision_end|>{text}<|im_end|>\n
#   <|im_start|>assistant\n
DEFAULT_TEMPLATE: dict[str, Any] = {
    "system": "<|im_start|>system\n{system}<|im_end|>\n",
    "default_system": "",
    "user": "<|im_start|>user\n{input}<|im_end|>\n",
    "assistant_prefix": "<|im_start|>assistant\n",
    "suffix": "<|im_end|>",
    "stop_words": ["<|im_end|>", "<|endoftext|>"],
    "image_placeholder": "<image>",
    "vision_start": "<|vision_start|>",
    "image_token": "<|image_pad|>",
    "vision_end": "<|vision_end|>",
}

# xtuner-style template keys (Sa2VA training configs) -> our keys.
_XTUNER_KEYS = {"SYSTEM": "system", "INSTRUCTION": "user", "SUFFIX": "suffix", "STOP_WORDS": "stop_words"}

# Qwen3-VL image processing as Sa2VA's HF inference code (``models_qwen3vl``) runs it:
# ``qwen_vl_utils.process_vision_info(messages)`` first resizes the PIL image (``pre_resize``: smart_resize with
# qwen_vl_utils' default factor 28 -- Sa2VA does not pass Qwen3-VL's image_patch_size=16 -- and its own pixel bounds,
# PIL bicubic), then the processor's Qwen2-VL-style image processor (patch 16, merge 2: factor 32, mean/std 0.5) is
# called with min_pixels=512*28*28, max_pixels=2048*28*28.
DEFAULT_IMAGE_PROCESSOR: dict[str, Any] = {
    "min_pixels": 512 * 28 * 28,
    "max_pixels": 2048 * 28 * 28,
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "pre_resize": {"factor": 28, "min_pixels": 4 * 28 * 28, "max_pixels": 16384 * 28 * 28},
}



def normalize_template(template: dict | None) -> dict[str, Any]:
    """Fill a (possibly partial or xtuner-style) template dict into the full set of keys used here.

    - xtuner keys (``SYSTEM``, ``INSTRUCTION``, ``SUFFIX``, ``STOP_WORDS``) are renamed to ours;
    - when ``user`` is given but ``assistant_prefix`` is not, ``user`` is taken to already end with the
      assistant prefix (xtuner's ``INSTRUCTION`` does), so ``assistant_prefix`` becomes ``""``;
    - when ``system`` is given but ``default_system`` is not, no system text is rendered (xtuner semantics).
    """
    if template is None:
        return copy.deepcopy(DEFAULT_TEMPLATE)
    given = {}
    for k, v in dict(template).items():
        given[_XTUNER_KEYS.get(k, k)] = v
    out = copy.deepcopy(DEFAULT_TEMPLATE)
    if "user" in given and "assistant_prefix" not in given:
        out["assistant_prefix"] = ""
    if "system" in given and "default_system" not in given:
        out["default_system"] = ""
    out.update(copy.deepcopy(given))
    if isinstance(out.get("stop_words"), str):
        out["stop_words"] = [out["stop_words"]]
    return out


def normalize_image_processor(settings: dict | None) -> dict[str, Any]:
    out = copy.deepcopy(DEFAULT_IMAGE_PROCESSOR)
    if settings:
        out.update(copy.deepcopy(dict(settings)))
    return out


class Sa2VAQwen3VLConfig(PretrainedConfig):
    r"""Configuration of ``Sa2VAQwen3VLModel``.

    Args:
        mllm_config (`dict` or `Qwen3VLConfig`, *optional*): the Qwen3-VL configuration.
        sam2_config (`dict` or `Sam2VideoConfig`, *optional*): transformers' SAM2 configuration.
        seg_token (`str`, defaults to ``"[SEG]"``): the segmentation token.
        seg_token_id (`int`, *optional*): its id in the exported tokenizer (``predict_forward`` otherwise asks
            the tokenizer).
        special_tokens (`list[str]`): the tokens Sa2VA added to the tokenizer, in order.
        template (`dict`): chat-template pieces (``system`` with ``{system}``, ``default_system``, ``user`` with
            ``{input}``, ``assistant_prefix``, ``suffix``, ``stop_words``, ``image_placeholder``, ``vision_start``,
            ``image_token``, ``vision_end``); see ``DEFAULT_TEMPLATE``.
        image_processor (`dict`): Qwen2-VL-style image-processor settings (``min_pixels``, ``max_pixels``, ``patch_size``,
            ``temporal_patch_size``, ``merge_size``, ``image_mean``, ``image_std``) and ``pre_resize`` (the
            qwen_vl_utils resize Sa2VA applies first; ``None`` disables it).
        sam2_image_size (`int`, *optional*): side of the square SAM2 input; read from ``sam2_config`` when unset
            (1024 for the released SAM2 models).
        sam2_pixel_mean / sam2_pixel_std (`list[float]`): SAM2 input normalisation (ImageNet).
        sam2_multimask_output (`bool`, defaults to `True`): Sa2VA runs SAM2's mask decoder in multi-mask mode
            (``SAM2Base._use_multimask(is_init_cond_frame=True, point_inputs=None)`` is true for the hiera
            configs it uses) and keeps the mask with the highest predicted IoU.
        mask_threshold (`float`, defaults to 0.5): threshold on the sigmoid of the mask logits.
        max_new_tokens (`int`, defaults to 2048): generation length (Sa2VA's value).
        text_hidden_fcs_out_dim (`int`, *optional*): output size of ``text_hidden_fcs`` (SAM2's prompt embedding
            size); read from ``sam2_config`` when unset (256).
        maskport (`dict`): provenance (``version``, ``family``, ``mapping_version``, ...).
    """

    model_type = "maskport_sa2va_qwen3_vl"
    sub_configs = {"mllm_config": Qwen3VLConfig, "sam2_config": Sam2VideoConfig}

    def __init__(
        self,
        mllm_config: dict | Qwen3VLConfig | None = None,
        sam2_config: dict | Sam2VideoConfig | None = None,
        seg_token: str = "[SEG]",
        seg_token_id: int | None = None,
        special_tokens: list[str] | None = None,
        template: dict | None = None,
        image_processor: dict | None = None,
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
            mllm_config = Qwen3VLConfig(**copy.deepcopy(mllm_config))
        elif mllm_config is None:
            mllm_config = Qwen3VLConfig()
        sam2_config = sam2_video_config(sam2_config)
        self.mllm_config = mllm_config
        self.sam2_config = sam2_config

        self.seg_token = seg_token
        self.seg_token_id = seg_token_id
        self.special_tokens = list(special_tokens) if special_tokens is not None else list(DEFAULT_SPECIAL_TOKENS)
        self.template = normalize_template(template)
        self.image_processor = normalize_image_processor(image_processor)

        for key, value in sam2_head_settings(
                sam2_config, sam2_image_size, sam2_pixel_mean, sam2_pixel_std, sam2_multimask_output, mask_threshold,
                max_new_tokens, text_hidden_fcs_out_dim).items():
            setattr(self, key, value)
        self.maskport = dict(maskport) if maskport is not None else {
            "family": "sa2va-qwen3-vl", "version": None, "mapping_version": None}
        super().__init__(**kwargs)

    @property
    def text_hidden_size(self) -> int:
        return self.mllm_config.text_config.hidden_size


__all__ = ["Sa2VAQwen3VLConfig"]
