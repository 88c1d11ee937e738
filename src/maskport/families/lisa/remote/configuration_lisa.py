"""Configuration of a maskport export of LISA (family ``lisa``: LLaVA v1 + SAM ViT-H + ``[SEG]``).

Copied verbatim into every export folder and loaded with ``trust_remote_code=True`` on machines without maskport:
it may import only torch, transformers, numpy and PIL, and its sibling ``sam_image`` (the SAM settings shared by
the exports that use the SAM v1 head).

Two sub-configurations (transformers' ``sub_configs``):

- ``mllm_config``: a ``LlavaConfig`` (transformers' native LLaVA: CLIP ViT-L/14 at 224 px, ``vision_feature_layer``
  -2, the ``default`` strategy that drops CLS, a Llama decoder). LISA's projector is ONE linear; transformers'
  ``LlavaMultiModalProjector`` has two with an activation between them: the export sets ``projector_hidden_act``
  to ``linear`` (the identity) and ``linear_2`` to the identity matrix with a zero bias, which reproduces LISA's
  projector exactly for finite inputs (each output is ``1 * x_i`` plus exact zeros);
- ``sam_config``: a ``SamConfig`` (transformers' native SAM).

plus the plain-data settings ``predict_forward`` needs (LISA's conversation template, its added tokens, CLIP image
processing, SAM preprocessing and thresholds) and the provenance written by maskport.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import LlavaConfig, PretrainedConfig, SamConfig

from .sam_image import sam_head_settings

# LISA's conversation template ``llava_v1`` (``conv_templates["llava_v1"]``, SeparatorStyle.TWO) and the way its
# chat.py builds a turn: "<image>\n" + text, "<image>" replaced by "<im_start><image><im_end>", then
#   system + " " + "USER: " + turn + " " + "ASSISTANT:"
DEFAULT_TEMPLATE: dict[str, Any] = {
    "name": "llava_v1",
    "system": ("A chat between a curious human and an artificial intelligence assistant. "
               "The assistant gives helpful, detailed, and polite answers to the human's questions."),
    "roles": ["USER", "ASSISTANT"],
    "sep": " ",
    "sep2": "</s>",
    "image_placeholder": "<image>",
    "im_start": "<im_start>",
    "im_end": "<im_end>",
    "stop_words": ["</s>"],
}

# CLIPImageProcessor of openai/clip-vit-large-patch14 as LISA runs it (transformers 4.31, PIL): shortest edge 224
# (bicubic), centre crop 224, 1/255, CLIP mean/std
DEFAULT_IMAGE_PROCESSOR: dict[str, Any] = {
    "shortest_edge": 224,
    "crop_size": 224,
    "resample": 3,
    "rescale_factor": 1 / 255,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}


class LisaConfig(PretrainedConfig):
    r"""Configuration of ``LisaModel``.

    Args:
        mllm_config (`dict` or `LlavaConfig`): the LLaVA configuration (``image_token_id``: the id the prompt uses
            for the image placeholder positions; their embeddings are replaced by image features).
        sam_config (`dict` or `SamConfig`): transformers' SAM configuration.
        seg_token (`str`): ``[SEG]``; ``seg_token_id`` its id in the exported tokenizer.
        added_tokens (`list[str]`): the tokens LISA added to the Llama tokenizer (``[SEG]``, ``<im_start>``,
            ``<im_end>``); LISA's slow tokenizer strips the whitespace around them, ``predict_forward`` does too.
        template (`dict`): LISA's conversation template (see ``DEFAULT_TEMPLATE``).
        image_processor (`dict`): CLIP image processing (see ``DEFAULT_IMAGE_PROCESSOR``).
        sam_image_size / sam_pixel_mean / sam_pixel_std / sam_multimask_output / mask_threshold / max_new_tokens /
            text_hidden_fcs_out_dim: the SAM head's settings (``sam_image.sam_head_settings``); LISA:
            ResizeLongestSide(1024), Meta's 0-255 mean/std, ``multimask_output=False``, ``logits > 0``, 512 tokens.
        maskport (`dict`): provenance.
    """

    model_type = "maskport_lisa"
    sub_configs = {"mllm_config": LlavaConfig, "sam_config": SamConfig}

    def __init__(
        self,
        mllm_config: dict | LlavaConfig | None = None,
        sam_config: dict | SamConfig | None = None,
        seg_token: str = "[SEG]",
        seg_token_id: int | None = None,
        added_tokens: list[str] | None = None,
        template: dict | None = None,
        image_processor: dict | None = None,
        sam_image_size: int | None = None,
        sam_pixel_mean: list[float] | None = None,
        sam_pixel_std: list[float] | None = None,
        sam_multimask_output: bool = False,
        mask_threshold: float = 0.5,
        max_new_tokens: int = 512,
        text_hidden_fcs_out_dim: int | None = None,
        maskport: dict | None = None,
        **kwargs,
    ):
        if isinstance(mllm_config, dict):
            mllm_config = LlavaConfig(**copy.deepcopy(mllm_config))
        elif mllm_config is None:
            mllm_config = LlavaConfig(projector_hidden_act="linear", vision_feature_layer=-2,
                                      vision_feature_select_strategy="default")
        if isinstance(sam_config, dict):
            sam_config = SamConfig(**copy.deepcopy(sam_config))
        elif sam_config is None:
            sam_config = SamConfig()
        self.mllm_config = mllm_config
        self.sam_config = sam_config
        self.seg_token = seg_token
        self.seg_token_id = seg_token_id
        self.added_tokens = list(added_tokens) if added_tokens is not None else ["[SEG]", "<im_start>", "<im_end>"]
        tpl = copy.deepcopy(DEFAULT_TEMPLATE)
        tpl.update(copy.deepcopy(dict(template or {})))
        self.template = tpl
        ip = copy.deepcopy(DEFAULT_IMAGE_PROCESSOR)
        ip.update(copy.deepcopy(dict(image_processor or {})))
        self.image_processor = ip
        for key, value in sam_head_settings(sam_config, sam_image_size, sam_pixel_mean, sam_pixel_std,
                                            sam_multimask_output, mask_threshold, max_new_tokens,
                                            text_hidden_fcs_out_dim).items():
            setattr(self, key, value)
        self.maskport = dict(maskport) if maskport is not None else {"family": "lisa", "version": None,
                                                                      "mapping_version": None}
        super().__init__(**kwargs)

    @property
    def text_hidden_size(self) -> int:
        return self.mllm_config.text_config.hidden_size


__all__ = ["DEFAULT_IMAGE_PROCESSOR", "DEFAULT_TEMPLATE", "LisaConfig"]
