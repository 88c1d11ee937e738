"""Pieces every maskport Sa2VA export shares: the language-prompted SAM2 mask head and the ``[SEG]`` bookkeeping.

This file is copied verbatim into export folders next to the family's ``modeling_*.py``, which imports it with a
relative import (transformers copies such sibling files when loading with ``trust_remote_code=True``). It may
import only torch, numpy and PIL.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def sam2_head_settings(sam2_config, sam2_image_size=None, sam2_pixel_mean=None, sam2_pixel_std=None,
                       sam2_multimask_output=True, mask_threshold=0.5, max_new_tokens=2048,
                       text_hidden_fcs_out_dim=None) -> dict[str, Any]:
    """The SAM2/mask settings every export config carries, checked: SAM2's input side comes from its
    configuration (prompt-encoder grid), so a different ``sam2_image_size`` is an error; ImageNet normalisation by
    default; ``text_hidden_fcs`` ends in SAM2's prompt size unless told otherwise."""
    prompt_cfg = sam2_config.prompt_encoder_config
    size = prompt_cfg.image_size
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    if sam2_image_size is not None and int(sam2_image_size) != size:
        raise ValueError(f"sam2_image_size={sam2_image_size} disagrees with sam2_config "
                         f"(prompt_encoder_config.image_size={size})")
    return {
        "sam2_image_size": size,
        "sam2_pixel_mean": list(sam2_pixel_mean) if sam2_pixel_mean is not None else list(IMAGENET_MEAN),
        "sam2_pixel_std": list(sam2_pixel_std) if sam2_pixel_std is not None else list(IMAGENET_STD),
        "sam2_multimask_output": bool(sam2_multimask_output),
        "mask_threshold": float(mask_threshold),
        "max_new_tokens": int(max_new_tokens),
        "text_hidden_fcs_out_dim": int(text_hidden_fcs_out_dim if text_hidden_fcs_out_dim is not None
                                       else prompt_cfg.hidden_size),
    }


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of a PIL image; transparent pixels are composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.split()[3])
        return background
    return image.convert("RGB")


def as_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        return Image.fromarray(image)
    raise TypeError(f"image must be a PIL.Image (or an HxWx3 uint8 array), got {type(image).__name__}")


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


def module_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in module.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.float32


VIDEO_UNSUPPORTED = "video input is not supported by this export yet; pass frames one by one as images"
MASK_PROMPTS_UNSUPPORTED = ("mask_prompts (visual prompts, <vp>) are not supported by this export yet; "
                            "describe the region in text instead")


class Sa2VAMaskHeadMixin:
    """SAM2 half of Sa2VA's ``predict_forward``, for a model with ``self.sam2`` (transformers' ``Sam2Model``),
    ``self.text_hidden_fcs`` and a config with ``sam2_image_size``, ``sam2_pixel_mean``/``std``,
    ``sam2_multimask_output``, ``mask_threshold``, ``seg_token``, ``seg_token_id`` and ``template['stop_words']``."""

    def sam2_preprocess(self, image: Image.Image) -> torch.Tensor:
        """``[1, 3, S, S]`` SAM2 input: Sa2VA's ``DirectResize`` (square resize, aspect ratio NOT kept, PIL
        bicubic) to ``sam2_image_size``, then ``/255`` and ImageNet mean/std. Computed in float32, cast to SAM2's
        dtype."""
        size = self.config.sam2_image_size
        resized = to_rgb(image).resize((size, size), resample=Image.BICUBIC)
        x = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        mean = torch.tensor(self.config.sam2_pixel_mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.config.sam2_pixel_std, dtype=torch.float32)[:, None, None]
        device, dtype = module_device_dtype(self.sam2)
        return ((x - mean) / std).unsqueeze(0).to(device=device, dtype=dtype)

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
        device, dtype = module_device_dtype(sam)
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

    def check_predict_inputs(self, image, video, text, mask_prompts, tokenizer, processor):
        """``predict_forward``'s argument checks, shared by the families: returns (image as PIL or None, tokenizer)."""
        if video is not None:
            raise NotImplementedError(VIDEO_UNSUPPORTED)
        if mask_prompts is not None:
            raise NotImplementedError(MASK_PROMPTS_UNSUPPORTED)
        if text is None:
            raise ValueError("text is required")
        if tokenizer is None and processor is not None:
            tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("pass tokenizer= (AutoTokenizer.from_pretrained(export_dir)) or processor=")
        return (as_pil(image) if image is not None else None), tokenizer

    def generate_and_segment(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, mm: dict, tokenizer,
                             image, mask_threshold=None, max_new_tokens=None, generation_kwargs=None,
                             return_probabilities: bool = False) -> dict[str, Any]:
        """Steps 3-4 of ``predict_forward``: greedy ``self.mllm.generate`` (stop on the template's stop words;
        ``generation_kwargs`` override the defaults, except the hidden-state settings the masks need), the answer
        decoded with special tokens kept, then :meth:`masks_from_generation` when there is an image."""
        threshold = self.config.mask_threshold if mask_threshold is None else float(mask_threshold)
        max_new = self.config.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        stop_ids = self.stop_token_ids(tokenizer)
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
        masks, probs = self.masks_from_generation(out, prompt_length, image, tokenizer, threshold,
                                                  return_probabilities)
        result["prediction_masks"] = masks
        if return_probabilities:
            result["prediction_probabilities"] = probs
        return result

    def stop_token_ids(self, tokenizer) -> list[int]:
        ids = []
        for word in self.config.template.get("stop_words") or []:
            tid = tokenizer.convert_tokens_to_ids(word)
            if isinstance(tid, int) and tid >= 0 and tid != tokenizer.unk_token_id and tid not in ids:
                ids.append(tid)
        if not ids and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        return ids

    def seg_token_id(self, tokenizer) -> int:
        tid = tokenizer.convert_tokens_to_ids(self.config.seg_token)
        if isinstance(tid, int) and tid >= 0 and tid != tokenizer.unk_token_id:
            if self.config.seg_token_id is not None and tid != self.config.seg_token_id:
                raise ValueError(f"the tokenizer maps {self.config.seg_token} to {tid} but the model was exported "
                                 f"with seg_token_id={self.config.seg_token_id}: wrong tokenizer?")
            return tid
        if self.config.seg_token_id is not None:
            return int(self.config.seg_token_id)
        raise ValueError(f"the tokenizer does not know {self.config.seg_token}")

    def masks_from_generation(self, out, prompt_length: int, image: Image.Image, tokenizer, threshold: float,
                              return_probabilities: bool) -> tuple[list, list]:
        """Steps 3-4 of ``predict_forward`` after ``generate``: ``[SEG]`` hidden states -> ``text_hidden_fcs`` ->
        SAM2 -> bilinear to ``sam2_image_size`` then to the image's H x W (Sa2VA's two resizes) -> sigmoid ->
        ``> threshold``. Returns (masks, probabilities), each a list of ``(1, H, W)`` arrays."""
        seg_hidden = select_seg_hidden_states(out.hidden_states, out.sequences, prompt_length,
                                              self.seg_token_id(tokenizer))
        if seg_hidden.shape[0] == 0:
            return [], []
        fcs_device, fcs_dtype = module_device_dtype(self.text_hidden_fcs)
        seg_embeddings = self.text_hidden_fcs(seg_hidden.to(device=fcs_device, dtype=fcs_dtype))
        logits = self.sam2_mask_logits(self.sam2_preprocess(image), seg_embeddings.unsqueeze(0),
                                       multimask_output=self.config.sam2_multimask_output)[0]
        size = self.config.sam2_image_size
        logits = F.interpolate(logits[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)
        logits = F.interpolate(logits, size=(image.height, image.width), mode="bilinear", align_corners=False)
        probs = logits[:, 0].sigmoid()
        masks, probabilities = [], []
        for p in probs:
            p = p[None]
            masks.append((p > threshold).cpu().numpy())
            if return_probabilities:
                probabilities.append(p.cpu().numpy().astype(np.float32))
        return masks, probabilities


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "MASK_PROMPTS_UNSUPPORTED", "Sa2VAMaskHeadMixin", "VIDEO_UNSUPPORTED",
           "as_pil", "module_device_dtype", "sam2_head_settings", "select_seg_hidden_states", "to_rgb"]
