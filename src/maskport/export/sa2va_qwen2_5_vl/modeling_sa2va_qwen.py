"""Sa2VA on Qwen2.5-VL, as exported by maskport (family ``sa2va-qwen2_5-vl``).

This file is copied verbatim into every export folder and loaded with
``AutoModel.from_pretrained(folder, trust_remote_code=True)`` on machines without maskport: it may import only
torch, transformers, numpy, PIL and its sibling ``configuration_sa2va_qwen``.

Module tree (the converter writes weights under exactly these names)::

    mllm             transformers.Qwen2_5_VLForConditionalGeneration   mllm.model.language_model.*,
                                                                          mllm.model.visual.*, mllm.lm_head.weight
    sam2             transformers.Sam2Model                              sam2.*
    text_hidden_fcs  Linear(C, C) -> ReLU -> Linear(C, D) -> Dropout(0)  text_hidden_fcs.{0,2}.{weight,bias}

Inference follows ByteDance's released Sa2VA Qwen2.5-VL HF code (``Sa2VAChatModelQwen.predict_forward``);
``predict_forward`` documents every step and the few places where this export deliberately differs.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import PreTrainedModel, Qwen2_5_VLForConditionalGeneration, Sam2Model

from .configuration_sa2va_qwen import Sa2VAQwenConfig

_VIDEO_UNSUPPORTED = ("video input is not supported by this export yet; pass frames one by one as images")
_MASK_PROMPTS_UNSUPPORTED = ("mask_prompts (visual prompts, <vp>) are not supported by this export yet; "
                             "describe the region in text instead")


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


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of a PIL image; transparent pixels are composited on white (as ``qwen_vl_utils`` does)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.split()[3])
        return background
    return image.convert("RGB")


def build_prompt(template: dict, text: str, past_text: str = "", image_tokens: int | None = None) -> str:
    """The full prompt string for one user turn.

    ``image_tokens`` is the number of ``<|image_pad|>`` tokens (``grid_t*grid_h*grid_w // merge_size**2``), or
    ``None`` for a text-only turn. As in Sa2VA's Qwen code, every ``<image>`` placeholder is removed from the
    text and the vision block is put at the start of the user turn (Sa2VA passes the message content as
    ``[image, text]`` to the Qwen2.5-VL chat template, which renders the image first).
    """
    placeholder = template.get("image_placeholder", "<image>")
    body = (past_text or "") + (text or "").replace(placeholder, "")
    if image_tokens is not None:
        body = (template["vision_start"] + template["image_token"] * int(image_tokens)
                + template["vision_end"] + body)
    system_text = template.get("default_system") or ""
    system = template.get("system") or ""
    if "{system}" in system:
        system = system.replace("{system}", system_text) if system_text else ""
    # str.replace, not str.format: user text may contain braces
    return system + template["user"].replace("{input}", body) + template.get("assistant_prefix", "")


def select_seg_hidden_states(hidden_states, sequences: torch.Tensor, prompt_length: int,
                             seg_token_id: int) -> torch.Tensor:
    """Last-layer hidden states of the ``[SEG]`` tokens the model generated, one row per ``[SEG]``.

    ``hidden_states`` is ``generate(..., output_hidden_states=True, return_dict_in_generate=True).hidden_states``:
    a tuple over generation steps; step 0 holds the prompt (``[B, prompt_length, C]`` per layer), each later
    step the one token fed back (``[B, 1, C]``); in each step the last entry is the last layer (after the final
    norm). Concatenating the last layer of every step gives one row per token *fed to the model*: the prompt
    and every generated token except the last one (which is never fed back). Row ``i`` is therefore the hidden
    state of input token ``sequences[0, i]`` -- the hidden state "at" that token, as Sa2VA trains with
    (``hidden_states[-1][input_ids == seg_id]``) and as its HF code picks at inference
    (``get_seg_hidden_states(cat(last layers), sequences[0][:-1], seg_id)``).

    Differences from Sa2VA's Qwen code, both deliberate:

    - only generated positions count: Sa2VA's mask covers the prompt too, so a literal ``[SEG]`` in the user
      text would produce an extra mask that matches no ``[SEG]`` of the answer;
    - a ``[SEG]`` generated as the very last token (the ``max_new_tokens`` cut-off) has no hidden state, since
      it was never fed back; like Sa2VA we drop it, so the answer then shows one ``[SEG]`` more than there are
      masks.

    Only batch element 0 is read (``predict_forward`` runs one sample at a time).
    """
    if not hidden_states:
        return sequences.new_zeros((0, 0), dtype=torch.float32)
    last = torch.cat([step[-1][0] for step in hidden_states], dim=0)  # [n_fed, C]
    fed_ids = sequences[0, : last.shape[0]].to(last.device)
    is_seg = fed_ids == seg_token_id
    is_seg[: min(prompt_length, is_seg.shape[0])] = False
    return last[is_seg]


# --------------------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------------------
class Sa2VAQwenModel(PreTrainedModel):
    """Sa2VA (Qwen2.5-VL + SAM2) for referring segmentation and grounded chat; see ``predict_forward``."""

    config_class = Sa2VAQwenConfig
    # must not collide with a child's name ("mllm", "sam2") or a prefix transformers strips/adds ("model")
    base_model_prefix = "sa2va_qwen"
    main_input_name = "input_ids"
    _no_split_modules = ["Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock", "Sam2Model"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    supports_gradient_checkpointing = False
    # Older transformers versions read this class attribute for key renaming; ours are already final.
    _checkpoint_conversion_mapping: dict = {}

    def __init__(self, config: Sa2VAQwenConfig):
        super().__init__(config)
        self.mllm = Qwen2_5_VLForConditionalGeneration(config.mllm_config)
        self.sam2 = Sam2Model(config.sam2_config)
        in_dim = config.mllm_config.text_config.hidden_size
        out_dim = config.text_hidden_fcs_out_dim
        self.text_hidden_fcs = nn.Sequential(
            nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim), nn.Dropout(0.0))
        self.post_init()
        # transformers 5 registers key renamings for Qwen2.5-VL (legacy ``model.layers.*`` / ``visual.*`` <->
        # native ``model.language_model.*`` / ``model.visual.*``). They are applied, scoped to ``mllm.``, when
        # loading, and -- for a model that was not itself loaded through a renaming -- *reversed* when saving,
        # so ``save_pretrained`` would write ``mllm.model.layers.*`` / ``mllm.visual.*`` instead of the module
        # names. Our files always use the module names (that is what maskport writes), so saving must not
        # rename: an empty list here means "no conversion to revert". ``from_pretrained`` replaces it with the
        # conversions it actually used (none for a maskport export; the legacy ones for a folder saved in the
        # legacy layout, which then round-trips in that layout).
        self._weight_conversions = []

    # ---- plumbing ----------------------------------------------------------------------------------------------
    def get_input_embeddings(self):
        return self.mllm.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.mllm.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.mllm.get_output_embeddings()

    def forward(self, *args, **kwargs):
        raise NotImplementedError("Sa2VAQwenModel has no training forward; use predict_forward(image=..., "
                                  "text=..., tokenizer=...) or the submodules mllm / sam2 / text_hidden_fcs")

    @staticmethod
    def _module_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
        for p in module.parameters():
            return p.device, p.dtype
        return torch.device("cpu"), torch.float32

    # ---- SAM2 ---------------------------------------------------------------------------------------------------
    def sam2_preprocess(self, image: Image.Image) -> torch.Tensor:
        """``[1, 3, S, S]`` SAM2 input: Sa2VA's ``DirectResize`` (square resize, aspect ratio NOT kept, PIL
        bicubic) to ``sam2_image_size``, then ``/255`` and ImageNet mean/std (Sa2VA's ``preprocess_image``).
        Computed in float32 and cast to SAM2's dtype."""
        size = self.config.sam2_image_size
        resized = to_rgb(image).resize((size, size), resample=Image.BICUBIC)
        x = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        mean = torch.tensor(self.config.sam2_pixel_mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.config.sam2_pixel_std, dtype=torch.float32)[:, None, None]
        x = (x - mean) / std
        device, dtype = self._module_device_dtype(self.sam2)
        return x.unsqueeze(0).to(device=device, dtype=dtype)

    @torch.no_grad()
    def sam2_mask_logits(self, sam2_pixel_values: torch.Tensor, language_embeddings: torch.Tensor,
                         multimask_output: bool = False) -> torch.Tensor:
        """Low-resolution SAM2 mask logits prompted by language embeddings.

        Args:
            sam2_pixel_values: ``[B, 3, S, S]`` normalised SAM2 input (``sam2_preprocess``).
            language_embeddings: ``[B, N, D]``, ``D`` = SAM2's prompt size; each of the ``N`` embeddings is an
                independent prompt (one mask each), as Sa2VA runs one SAM2 call per ``[SEG]``.
            multimask_output: ``False`` (default): the decoder's single-mask output (with transformers'
                ``dynamic_multimask_via_stability`` fallback when ``sam2_config`` enables it). ``True``: the
                three multi-mask outputs, of which the one with the highest predicted IoU is returned, which is
                what Sa2VA does (``predict_forward`` passes ``config.sam2_multimask_output``).

        Returns:
            ``[B, N, h, w]`` float32 logits, ``h = w = S // 4`` (256 for SAM2 at 1024).

        Line by line, against Meta's ``SAM2Base`` (sam2 1.1.0) as Sa2VA drives it for one image:

        1. ``self.sam2.get_image_embeddings(x)`` = ``forward_image(x)`` (image encoder; ``conv_s0``/``conv_s1`` of the
           mask decoder applied to FPN levels 0/1) -> ``_prepare_backbone_features`` (last 3 levels) ->
           ``pix_feat = vision_feats[-1] + no_mem_embed`` (``directly_add_no_mem_embed``; transformers'
           ``no_memory_embedding``) -> reshaped to ``[B, C, H, W]``; levels 0/1 are ``high_res_features``.
        2. ``get_image_wide_positional_embeddings()`` = ``sam_prompt_encoder.get_dense_pe()``.
        3. ``self.sam2.prompt_encoder(points=zeros[B,N,1,2], labels=-ones[B,N,1], boxes=None, masks=None)`` =
           ``sam_prompt_encoder(points=(zeros(B,1,2), -ones(B,1)), boxes=None, masks=None)``: with no boxes both
           pad one more point of label -1, and every label -1 point embeds to exactly ``not_a_point_embed``
           (Meta: ``zeros + not_a_point_embed``; transformers: ``where(label == -1, not_a_point_embed, .)`` then
           ``+ point_embed(0) * 0``), so the sparse tokens are ``[not_a_point, not_a_point]``; dense =
           ``no_mask_embed`` broadcast. transformers' extra ``N`` axis ("point batch") holds the prompts.
        4. ``cat([sparse, language_embedding], dim=tokens)`` = Sa2VA's
           ``sparse_embeddings = torch.cat([sparse_embeddings, language_embd], dim=1)``.
        5. ``self.sam2.mask_decoder(image_embeddings=pix_feat, image_positional_embeddings=dense_pe,
           sparse_prompt_embeddings, dense_prompt_embeddings, multimask_output, high_resolution_features)`` =
           ``sam_mask_decoder(image_embeddings=pix_feat, image_pe=get_dense_pe(), ..., multimask_output,
           repeat_image=False, high_res_features=...)``; transformers repeats the image once per prompt, which
           equals Meta's batch of ``B*N`` with the image expanded. Tokens are
           ``[obj_score, iou, mask_0..3, sparse...]`` in both.
        6. multi-mask: ``argmax`` of the predicted IoUs = ``_forward_sam_heads``' ``best_iou_inds`` selection.
           Sa2VA leaves the object-score gating (``NO_OBJ_SCORE``) commented out; so do we.
        """
        sam = self.sam2
        device, dtype = self._module_device_dtype(sam)
        pixel_values = sam2_pixel_values.to(device=device, dtype=dtype)
        batch = pixel_values.shape[0]
        if language_embeddings.dim() != 3 or language_embeddings.shape[0] != batch:
            raise ValueError(f"language_embeddings must be [B={batch}, N, D], got {tuple(language_embeddings.shape)}")
        n_prompts = language_embeddings.shape[1]
        if n_prompts == 0:
            side = sam.prompt_encoder.mask_input_size
            return torch.zeros((batch, 0, side[0], side[1]), dtype=torch.float32, device=device)

        embeddings = sam.get_image_embeddings(pixel_values)             # [level0, level1, level2 + no_mem]
        image_pe = sam.get_image_wide_positional_embeddings().repeat(batch, 1, 1, 1)
        points = torch.zeros((batch, n_prompts, 1, 2), dtype=dtype, device=device)
        labels = -torch.ones((batch, n_prompts, 1), dtype=torch.int32, device=device)
        sparse, dense = sam.prompt_encoder(input_points=points, input_labels=labels, input_boxes=None,
                                           input_masks=None)          # [B, N, 2, D], [B, D, h, w]
        language = language_embeddings.to(device=device, dtype=sparse.dtype).unsqueeze(2)  # [B, N, 1, D]
        sparse = torch.cat([sparse, language], dim=2)                   # [B, N, 3, D]
        masks, iou, _, _ = sam.mask_decoder(
            image_embeddings=embeddings[-1],
            image_positional_embeddings=image_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            high_resolution_features=embeddings[:-1],
        )                                                               # [B, N, M, h, w], [B, N, M]
        if masks.shape[2] > 1:
            best = iou.argmax(dim=-1)                                   # [B, N]
            index = best[:, :, None, None, None].expand(-1, -1, 1, masks.shape[-2], masks.shape[-1])
            masks = masks.gather(2, index)
        return masks[:, :, 0].float()

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

    def _stop_token_ids(self, tokenizer) -> list[int]:
        ids = []
        for word in self.config.template.get("stop_words") or []:
            tid = tokenizer.convert_tokens_to_ids(word)
            if isinstance(tid, int) and tid >= 0 and tid != tokenizer.unk_token_id and tid not in ids:
                ids.append(tid)
        if not ids and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        return ids

    def _seg_token_id(self, tokenizer) -> int:
        tid = tokenizer.convert_tokens_to_ids(self.config.seg_token)
        if isinstance(tid, int) and tid >= 0 and tid != tokenizer.unk_token_id:
            if self.config.seg_token_id is not None and tid != self.config.seg_token_id:
                raise ValueError(f"the tokenizer maps {self.config.seg_token} to {tid} but the model was exported "
                                 f"with seg_token_id={self.config.seg_token_id}: wrong tokenizer?")
            return tid
        if self.config.seg_token_id is not None:
            return int(self.config.seg_token_id)
        raise ValueError(f"the tokenizer does not know {self.config.seg_token}")

    # ---- inference -----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def predict_forward(
        self,
        image: Image.Image | None = None,
        video: Any = None,
        text: str | None = None,
        past_text: str = "",
        mask_prompts: Any = None,
        tokenizer=None,
        processor=None,
        mask_threshold: float | None = None,
        return_probabilities: bool = False,
        max_new_tokens: int | None = None,
        generation_kwargs: dict | None = None,
    ) -> dict[str, Any]:
        """Answer ``text`` about ``image`` and segment every ``[SEG]`` of the answer.

        Returns ``{"prediction": str, "prediction_masks": [np.bool_ (1, H, W) per [SEG]]}`` (H, W: the input
        image's size), plus ``"prediction_probabilities": [np.float32 (1, H, W)]`` when
        ``return_probabilities``. Text-only calls (``image=None``) return ``prediction_masks == []``.

        Steps (Sa2VA's released Qwen2.5-VL code, ``Sa2VAChatModelQwen.predict_forward``):

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
        """
        if video is not None:
            raise NotImplementedError(_VIDEO_UNSUPPORTED)
        if mask_prompts is not None:
            raise NotImplementedError(_MASK_PROMPTS_UNSUPPORTED)
        if text is None:
            raise ValueError("text is required")
        if tokenizer is None and processor is not None:
            tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("pass tokenizer= (AutoTokenizer.from_pretrained(export_dir)) or processor=")
        if image is not None and not isinstance(image, Image.Image):
            if isinstance(image, np.ndarray):
                image = Image.fromarray(image)
            else:
                raise TypeError(f"image must be a PIL.Image (or an HxWx3 uint8 array), got {type(image).__name__}")
        threshold = self.config.mask_threshold if mask_threshold is None else float(mask_threshold)
        max_new = self.config.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        template = self.config.template
        mllm_device, _ = self._module_device_dtype(self.mllm)

        # 1. MLLM inputs
        mm: dict[str, torch.Tensor] = {}
        n_image_tokens = None
        if image is not None:
            mm = self._mllm_image_inputs(image, processor)
            merge = int(self.config.image_processor["merge_size"])
            n_image_tokens = int(mm["image_grid_thw"].prod(dim=-1).sum().item()) // (merge * merge)
        prompt = build_prompt(template, text, past_text, n_image_tokens)
        enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        input_ids = enc["input_ids"].to(mllm_device)
        attention_mask = enc.get("attention_mask", torch.ones_like(enc["input_ids"])).to(mllm_device)
        mm = {k: v.to(mllm_device) for k, v in mm.items()}

        # 3. generate
        stop_ids = self._stop_token_ids(tokenizer)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_ids[0] if stop_ids else 0)
        gen_kwargs = dict(max_new_tokens=max_new, do_sample=False, num_beams=1,
                          eos_token_id=stop_ids or None, pad_token_id=pad_id, use_cache=True)
        gen_kwargs.update(generation_kwargs or {})
        gen_kwargs.update(output_hidden_states=True, return_dict_in_generate=True)
        out = self.mllm.generate(input_ids=input_ids, attention_mask=attention_mask, **mm, **gen_kwargs)
        prompt_length = input_ids.shape[1]
        prediction = tokenizer.decode(out.sequences[0, prompt_length:], skip_special_tokens=False).strip()
        result: dict[str, Any] = {"prediction": prediction, "prediction_masks": []}
        if return_probabilities:
            result["prediction_probabilities"] = []
        if image is None:
            return result

        seg_id = self._seg_token_id(tokenizer)
        seg_hidden = select_seg_hidden_states(out.hidden_states, out.sequences, prompt_length, seg_id)
        if seg_hidden.shape[0] == 0:
            return result
        fcs_device, fcs_dtype = self._module_device_dtype(self.text_hidden_fcs)
        seg_embeddings = self.text_hidden_fcs(seg_hidden.to(device=fcs_device, dtype=fcs_dtype))  # [n_seg, D]

        # 2 + 4. SAM2
        sam2_pixels = self.sam2_preprocess(image)
        logits = self.sam2_mask_logits(sam2_pixels, seg_embeddings.unsqueeze(0),
                                       multimask_output=self.config.sam2_multimask_output)[0]  # [n_seg, h, w]
        size = self.config.sam2_image_size
        logits = F.interpolate(logits[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)
        logits = F.interpolate(logits, size=(image.height, image.width), mode="bilinear", align_corners=False)
        probs = logits[:, 0].sigmoid()                                   # [n_seg, H, W]
        for p in probs:
            p = p[None]
            result["prediction_masks"].append((p > threshold).cpu().numpy())
            if return_probabilities:
                result["prediction_probabilities"].append(p.cpu().numpy().astype(np.float32))
        return result


__all__ = ["Sa2VAQwenModel", "select_seg_hidden_states", "build_prompt", "smart_resize"]
