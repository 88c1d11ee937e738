"""The SAM2 image mask head of maskport exports: SAM2's input preprocessing, its mask decoder prompted by language
embeddings (one prompt per ``[SEG]``), and the masks' post-processing, as Sa2VA runs them.

Copied verbatim into every export folder whose family uses it (``FamilySpec.heads``), next to the family's
``modeling_*.py``, which imports it relatively (transformers copies such sibling files when loading with
``trust_remote_code=True``). It may import only torch, numpy, PIL and its sibling ``image_utils``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .image_utils import module_device_dtype, onloaded, to_rgb

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


class Sam2ImageHeadMixin:
    """SAM2 half of Sa2VA's ``predict_forward``, for a model with ``self.sam2`` (transformers' ``Sam2Model``) and a
    config with ``sam2_image_size``, ``sam2_pixel_mean``/``std`` and ``sam2_multimask_output``. Provides
    :meth:`masks_from_prompts`, the mask-head interface the ``seg_token`` module calls."""

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

    def masks_from_prompts(self, image: Image.Image, prompt_embeddings: torch.Tensor, threshold: float,
                           return_probabilities: bool) -> tuple[list, list]:
        """One mask per prompt embedding (``[N, D]``, the projected ``[SEG]`` states): SAM2 -> bilinear to
        ``sam2_image_size`` then to the image's H x W (Sa2VA's two resizes) -> sigmoid -> ``> threshold``. Returns
        (masks, probabilities), each a list of ``(1, H, W)`` arrays."""
        with onloaded(self.sam2):
            logits = self.sam2_mask_logits(self.sam2_preprocess(image), prompt_embeddings.unsqueeze(0),
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


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Sam2ImageHeadMixin", "sam2_head_settings"]
