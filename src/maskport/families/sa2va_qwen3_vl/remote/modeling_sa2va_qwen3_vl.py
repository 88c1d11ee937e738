"""Sa2VA on Qwen3-VL (DeepStack vision features, patch 16), as exported by maskport (family ``sa2va-qwen3-vl``).

This file is copied verbatim into every export folder and loaded with
``AutoModel.from_pretrained(folder, trust_remote_code=True)`` on machines without maskport: it may import only
torch, transformers, numpy, PIL and its siblings ``configuration_sa2va_qwen3_vl`` and the shared heads ``image_utils``, ``seg_token``, ``sam2_image``
(the SAM2 mask head and ``[SEG]`` bookkeeping shared with the other families' exports).

Module tree (the converter writes weights under exactly these names)::

    mllm             transformers.Qwen3VLForConditionalGeneration   mllm.model.language_model.*,
                                                                          mllm.model.visual.*, mllm.lm_head.weight
    sam2             transformers.Sam2VideoModel                            sam2.*
    text_hidden_fcs  Linear(C, C) -> ReLU -> Linear(C, D) -> Dropout(0)  text_hidden_fcs.{0,2}.{weight,bias}

Inference follows ByteDance's released Sa2VA Qwen3-VL HF code (``Sa2VAChatModelQwen.predict_forward``);
``predict_forward`` documents every step and the few places where this export deliberately differs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import PreTrainedModel, Qwen3VLForConditionalGeneration

from .configuration_sa2va_qwen3_vl import Sa2VAQwen3VLConfig
from .image_utils import module_device_dtype, to_rgb
from .sam2_image import Sam2ImageHeadMixin
from .sam2_video import Sam2VideoHeadMixin, build_sam2_video
from .seg_token import SegTokenMixin, select_seg_hidden_states


# --------------------------------------------------------------------------------------------------------------
# helpers (pure functions, unit-tested on their own)
# --------------------------------------------------------------------------------------------------------------
def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's size rule: both sides multiples of ``factor``, area within [min_pixels, max_pixels], aspect
    ratio kept as well as possible (the rule of ``qwen_vl_utils`` and transformers' Qwen2-VL processor)."""
    if min(height, width) <= 0:
        raise ValueError(f"image has an empty side: {width}x{height}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be below 200, got {max(height, width) / min(height, width):.1f}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def build_prompt(template: dict, text: str, past_text: str = "", image_tokens: int | list | None = None) -> str:
    """The full prompt string for one user turn.

    ``image_tokens`` is the number of ``<|image_pad|>`` tokens (``grid_t*grid_h*grid_w // merge_size**2``), or
    ``None`` for a text-only turn, or a list of such numbers: one vision block per image, back to back (a
    video's key frames, which Sa2VA passes as that many image items before the text). As in Sa2VA's Qwen code, every ``<image>`` placeholder is removed from the
    text and the vision block is put at the start of the user turn (Sa2VA passes the message content as
    ``[image, text]`` to the Qwen3-VL chat template, which renders the image first).
    """
    placeholder = template.get("image_placeholder", "<image>")
    body = (past_text or "") + (text or "").replace(placeholder, "")
    if image_tokens is not None:
        counts = image_tokens if isinstance(image_tokens, (list, tuple)) else [image_tokens]
        body = "".join(template["vision_start"] + template["image_token"] * int(n) + template["vision_end"]
                       for n in counts) + body
    system_text = template.get("default_system") or ""
    system = template.get("system") or ""
    if "{system}" in system:
        system = system.replace("{system}", system_text) if system_text else ""
    # str.replace, not str.format: user text may contain braces
    return system + template["user"].replace("{input}", body) + template.get("assistant_prefix", "")


# --------------------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------------------
class Sa2VAQwen3VLModel(SegTokenMixin, Sam2ImageHeadMixin, Sam2VideoHeadMixin, PreTrainedModel):
    """Sa2VA (Qwen3-VL + SAM2) for referring segmentation and grounded chat; see ``predict_forward``."""

    config_class = Sa2VAQwen3VLConfig
    # must not collide with a child's name ("mllm", "sam2") or a prefix transformers strips/adds ("model")
    base_model_prefix = "sa2va_qwen"
    main_input_name = "input_ids"
    _no_split_modules = ["Qwen3VLTextDecoderLayer", "Qwen3VLVisionBlock", "Sam2VideoModel"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    supports_gradient_checkpointing = False
    # Sa2VA's released Qwen-VL code takes ``mask_prompts`` and silently ignores them (its Qwen models have no
    # visual-prompt path): refuse them instead of answering as if there were none
    mask_prompts_unsupported = ("mask_prompts (visual prompts, <vp>) are not supported by Sa2VA's Qwen-VL models: "
                                "Sa2VA's own code accepts and silently ignores them; describe the region in text "
                                "instead")
    # Older transformers versions read this class attribute for key renaming; ours are already final.
    _checkpoint_conversion_mapping: dict = {}

    def __init__(self, config: Sa2VAQwen3VLConfig):
        super().__init__(config)
        self.mllm = Qwen3VLForConditionalGeneration(config.mllm_config)
        self.sam2 = build_sam2_video(config.sam2_config)
        in_dim = config.mllm_config.text_config.hidden_size
        out_dim = config.text_hidden_fcs_out_dim
        self.text_hidden_fcs = nn.Sequential(
            nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim), nn.Dropout(0.0))
        self.post_init()
        # transformers 5 may register key renamings for a model class (as it does for Qwen2.5-VL's legacy
        # layout) and reverse them when saving a model that was not loaded through them. Our files always use the
        # module names (that is what maskport writes), so saving must not rename: an empty list means "no
        # conversion to revert"; ``from_pretrained`` replaces it with the conversions it actually used.
        self._weight_conversions = []

    # ---- plumbing ----------------------------------------------------------------------------------------------
    def get_input_embeddings(self):
        return self.mllm.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.mllm.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.mllm.get_output_embeddings()

    def forward(self, *args, **kwargs):
        raise NotImplementedError("Sa2VAQwen3VLModel has no training forward; use predict_forward(image=..., "
                                  "text=..., tokenizer=...) or the submodules mllm / sam2 / text_hidden_fcs")

    _module_device_dtype = staticmethod(module_device_dtype)

    # ---- MLLM inputs ---------------------------------------------------------------------------------------------
    def _qwen_image_processor(self, processor=None):
        """The Qwen2-VL image processor: the one of ``processor`` if given, else built from
        ``config.image_processor`` (no files needed). The PIL backend is preferred: it resizes like the
        (then default) slow processor of transformers 4.x that Sa2VA's reference code ran with."""
        if processor is not None and getattr(processor, "image_processor", None) is not None:
            return processor.image_processor
        s = self.config.image_processor
        kwargs = dict(size={"shortest_edge": int(s["min_pixels"]), "longest_edge": int(s["max_pixels"])},
                      patch_size=int(s["patch_size"]), temporal_patch_size=int(s["temporal_patch_size"]),
                      merge_size=int(s["merge_size"]), image_mean=list(s["image_mean"]),
                      image_std=list(s["image_std"]))
        import transformers

        ip = None
        for name in ("Qwen2VLImageProcessorPil", "Qwen2VLImageProcessor"):
            cls = getattr(transformers, name, None)
            if cls is None:
                continue
            try:
                ip = cls(**kwargs)
                break
            except Exception:  # noqa: BLE001 - e.g. a backend whose optional dependency is missing
                continue
        if ip is None:
            raise ImportError("no usable Qwen2-VL image processor in this transformers installation")
        return ip

    def _mllm_image_inputs(self, image: Image.Image, processor=None) -> dict[str, torch.Tensor]:
        """``pixel_values``/``image_grid_thw`` for the MLLM, as Sa2VA's ``process_vision_info`` + processor do:
        optional qwen_vl_utils pre-resize (PIL bicubic), then the Qwen2-VL image processor with
        ``config.image_processor``'s min/max pixels."""
        s = self.config.image_processor
        image = to_rgb(image)
        factor = int(s["patch_size"]) * int(s["merge_size"])
        pre = s.get("pre_resize")
        if pre:
            h, w = smart_resize(image.height, image.width, factor=int(pre.get("factor", factor)),
                                min_pixels=int(pre["min_pixels"]), max_pixels=int(pre["max_pixels"]))
            if (w, h) != image.size:
                image = image.resize((w, h), resample=Image.BICUBIC)
        ip = self._qwen_image_processor(processor)
        out = ip(images=[image], return_tensors="pt", min_pixels=int(s["min_pixels"]),
                 max_pixels=int(s["max_pixels"]))
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    # ---- inference -----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def predict_forward(
        self,
        image: Image.Image | list | None = None,
        video: Any = None,
        text: str | list | None = None,
        past_text: str = "",
        mask_prompts: Any = None,
        tokenizer=None,
        processor=None,
        mask_threshold: float | None = None,
        return_probabilities: bool = False,
        max_new_tokens: int | None = None,
        generation_kwargs: dict | None = None,
        key_frames: str = "official",
        num_key_frames: int | None = None,
    ) -> dict[str, Any]:
        """Answer ``text`` about ``image`` (or ``video``) and segment every ``[SEG]`` of the answer.

        ``video``: a list of frames (PIL images or HxWx3 uint8 arrays), a folder of frame images or a video file
        (PyAV); masks are then ``(T, H, W)`` per ``[SEG]``. ``key_frames='official'`` (default) sends the first 5
        frames through the MLLM, as Sa2VA's released code; ``'uniform'`` sends ``num_key_frames`` (default 5)
        frames spread over the video. See ``sam2_video`` and ``seg_token.predict_video``.

        Returns ``{"prediction": str, "prediction_masks": [np.bool_ (1, H, W) per [SEG]]}`` (H, W: the input
        image's size), plus ``"prediction_probabilities": [np.float32 (1, H, W)]`` when
        ``return_probabilities``. Text-only calls (``image=None``) return ``prediction_masks == []``.

        Steps (Sa2VA's released Qwen3-VL code, ``Sa2VAChatModelQwen.predict_forward``):

        1. Prompt: ``build_prompt`` -- the chat template of ``config.template`` around
           ``past_text + text`` with ``<image>`` removed; with an image, ``<|vision_start|>`` +
           ``<|image_pad|>`` * (grid_t*grid_h*grid_w // merge_size**2) + ``<|vision_end|>`` is put first.
           Image for the MLLM: qwen_vl_utils pre-resize + Qwen2-VL image processor (``_mllm_image_inputs``).
           (Sa2VA ignores ``past_text`` when an image is given; here it always prefixes the user text.)
        2. Image for SAM2: square resize to ``sam2_image_size``, /255, ImageNet normalisation.
        3. Greedy ``mllm.generate`` (``do_sample=False``, stop on ``template["stop_words"]``), hidden states on;
           ``select_seg_hidden_states`` picks the last-layer hidden state at each generated ``[SEG]`` that was
           fed back; ``text_hidden_fcs`` maps it into SAM2's prompt space.
        4. SAM2 (``sam2_mask_logits``, multi-mask + best IoU per ``config.sam2_multimask_output``) -> low-res
           logits -> bilinear (align_corners=False) to ``sam2_image_size`` then to the image's H x W (Sa2VA's two
           resizes: its video predictor returns masks at SAM2 resolution, which it then resizes to the image)
           -> sigmoid -> ``> mask_threshold``.

        ``generation_kwargs`` are passed on to ``generate`` (e.g. ``repetition_penalty``, ``sequence_bias``) and
        override the defaults above, except the hidden-state/return-dict settings the masks need.

        The answer is decoded with special tokens kept (so ``[SEG]`` stays visible) and stripped, like Sa2VA.

        Lists of images and texts (same length; an image may be ``None``) run as one batch (``predict_batch``) and
        return a list of such dicts.
        """
        if video is not None and not isinstance(text, (list, tuple)):  # a video: see predict_video
            _, tokenizer = self.check_predict_inputs(image, video, text, mask_prompts, tokenizer, processor)
            if return_probabilities:
                raise NotImplementedError("return_probabilities is for images; a video returns boolean masks")
            return self.predict_video(video, text, past_text, tokenizer, processor, key_frames, num_key_frames,
                                      mask_threshold, max_new_tokens, generation_kwargs)
        if isinstance(text, (list, tuple)):  # a batch: see predict_batch
            if video is not None or mask_prompts is not None:
                raise NotImplementedError("batched prediction takes images and texts only")
            images = list(image) if isinstance(image, (list, tuple)) else [image] * len(text)
            return self.predict_batch(images, text, tokenizer=tokenizer, processor=processor,
                                      past_texts=[past_text] * len(text), mask_threshold=mask_threshold,
                                      return_probabilities=return_probabilities, max_new_tokens=max_new_tokens,
                                      generation_kwargs=generation_kwargs)
        image, tokenizer = self.check_predict_inputs(image, video, text, mask_prompts, tokenizer, processor)
        mllm_device, _ = self._module_device_dtype(self.mllm)

        # 1. MLLM inputs
        ids, mm = self.prompt_inputs(image, text, past_text, tokenizer, processor)
        input_ids = torch.tensor([ids], dtype=torch.long, device=mllm_device)
        attention_mask = torch.ones_like(input_ids)
        mm = {k: v.to(mllm_device) for k, v in mm.items()}

        # 3-4. generate, then SAM2 for every [SEG]
        return self.generate_and_segment(input_ids, attention_mask, mm, tokenizer, image, mask_threshold,
                                         max_new_tokens, generation_kwargs, return_probabilities)

    def token_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-token inputs Qwen3-VL's M-RoPE needs beside the ids (the processor's ``mm_token_type_ids``: 1 at
        image tokens, 2 at video tokens, 0 elsewhere), computed from the (possibly left-padded) ids."""
        cfg = self.config.mllm_config
        types = (input_ids == cfg.image_token_id).to(torch.int32) + 2 * (input_ids == cfg.video_token_id).to(torch.int32)
        return {"mm_token_type_ids": types}

    def prompt_inputs(self, image, text: str, past_text: str, tokenizer, processor=None):
        """(token ids of the prompt, ``pixel_values``/``image_grid_thw`` or ``{}``) for one sample: step 1 of
        ``predict_forward``."""
        mm: dict[str, torch.Tensor] = {}
        n_image_tokens = None
        if image is not None:
            mm = self._mllm_image_inputs(image, processor)
            merge = int(self.config.image_processor["merge_size"])
            n_image_tokens = int(mm["image_grid_thw"].prod(dim=-1).sum().item()) // (merge * merge)
        prompt = build_prompt(self.config.template, text, past_text, n_image_tokens)
        return list(tokenizer(prompt, add_special_tokens=False)["input_ids"]), mm

    def video_prompt_inputs(self, frames: list, text: str, past_text: str, tokenizer, processor=None):
        """(token ids, ``pixel_values``/``image_grid_thw``) for a video's key frames, as Sa2VA's Qwen code builds
        them: each frame one image item (processed like an image), their vision blocks first, then the text."""
        mms = [self._mllm_image_inputs(f, processor) for f in frames]
        merge = int(self.config.image_processor["merge_size"])
        counts = [int(m["image_grid_thw"].prod(dim=-1).sum().item()) // (merge * merge) for m in mms]
        prompt = build_prompt(self.config.template, text, past_text, counts)
        return list(tokenizer(prompt, add_special_tokens=False)["input_ids"]), self.concat_mm_inputs(mms)

    @staticmethod
    def concat_mm_inputs(mms: list) -> dict[str, torch.Tensor]:
        """The image inputs of several samples as one batch (Qwen3-VL takes patches and grids concatenated)."""
        return {"pixel_values": torch.cat([m["pixel_values"] for m in mms]),
                "image_grid_thw": torch.cat([m["image_grid_thw"] for m in mms])}


__all__ = ["Sa2VAQwen3VLModel", "select_seg_hidden_states", "build_prompt", "smart_resize"]
