"""The SAM (v1) image mask head of maskport exports: SAM's input preprocessing, its mask decoder prompted by
language embeddings (one prompt per ``[SEG]``), and the masks' post-processing, as LISA (and Meta's
``segment_anything``) run them.

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

# Meta's Sam(pixel_mean=..., pixel_std=...) in segment_anything/build_sam.py: ImageNet's, on the 0-255 scale
SAM_PIXEL_MEAN = [123.675, 116.28, 103.53]
SAM_PIXEL_STD = [58.395, 57.12, 57.375]


def sam_head_settings(sam_config, sam_image_size=None, sam_pixel_mean=None, sam_pixel_std=None,
                      sam_multimask_output=False, mask_threshold=0.5, max_new_tokens=512,
                      text_hidden_fcs_out_dim=None) -> dict[str, Any]:
    """The SAM/mask settings every export config of a family using this head carries, checked: SAM's input size
    comes from its configuration (vision encoder and prompt encoder agree), so a different ``sam_image_size`` is
    an error; Meta's 0-255 mean/std by default; a single mask per prompt (LISA: ``multimask_output=False``);
    ``text_hidden_fcs`` ends in SAM's prompt size unless told otherwise."""
    vision_size = _side(sam_config.vision_config.image_size)
    prompt_cfg = sam_config.prompt_encoder_config
    prompt_size = _side(prompt_cfg.image_size)
    if vision_size != prompt_size:
        raise ValueError(f"sam_config disagrees with itself: vision_config.image_size={vision_size}, "
                         f"prompt_encoder_config.image_size={prompt_size}")
    if sam_image_size is not None and int(sam_image_size) != vision_size:
        raise ValueError(f"sam_image_size={sam_image_size} disagrees with sam_config (image_size={vision_size})")
    mean = list(sam_pixel_mean) if sam_pixel_mean is not None else list(SAM_PIXEL_MEAN)
    std = list(sam_pixel_std) if sam_pixel_std is not None else list(SAM_PIXEL_STD)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"sam_pixel_mean/std must be 3 values each (std > 0), got {mean} / {std}")
    return {
        "sam_image_size": vision_size,
        "sam_pixel_mean": [float(x) for x in mean],
        "sam_pixel_std": [float(x) for x in std],
        "sam_multimask_output": bool(sam_multimask_output),
        "mask_threshold": float(mask_threshold),
        "max_new_tokens": int(max_new_tokens),
        "text_hidden_fcs_out_dim": int(text_hidden_fcs_out_dim if text_hidden_fcs_out_dim is not None
                                       else prompt_cfg.hidden_size),
    }


def _side(size) -> int:
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def resize_longest_side_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """``(new_h, new_w)`` with the longer side ``long_side``, each side rounded half up, as Meta's
    ``ResizeLongestSide.get_preprocess_shape`` computes it (float scale, ``int(x + 0.5)``)."""
    scale = long_side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


class SamImageHeadMixin:
    """SAM half of LISA's mask path, for a model with ``self.sam`` (transformers' ``SamModel``) and a config with
    ``sam_image_size``, ``sam_pixel_mean``/``std`` (0-255 scale) and ``sam_multimask_output``. Provides
    :meth:`masks_from_prompts`, the mask-head interface the ``seg_token`` module calls."""

    def sam_preprocess(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """``([1, 3, S, S] SAM input, (h, w) of the resized image inside it)``, as LISA and Meta's
        ``SamPredictor.set_image`` prepare an image:

        1. ``ResizeLongestSide(S).apply_image``: the uint8 ``H x W x 3`` image resized so that its longer side is
           ``S`` (:func:`resize_longest_side_shape`), by PIL's bilinear filter on the uint8 image (Meta calls
           torchvision's ``resize(to_pil_image(image), (h, w))``, which for a PIL image is
           ``image.resize((w, h), Image.BILINEAR)``, skipped when the size is already right); the result back to
           uint8.
        2. ``Sam.preprocess``: ``(x - mean) / std`` on the 0-255 scale in float32, then zero padding at the bottom
           and right to ``S x S``.

        Cast to SAM's device and dtype at the end (LISA: ``.bfloat16()`` after preprocessing)."""
        size = int(self.config.sam_image_size)
        rgb = to_rgb(image)
        h, w = resize_longest_side_shape(rgb.height, rgb.width, size)
        if (h, w) != (rgb.height, rgb.width):
            rgb = rgb.resize((w, h), resample=Image.BILINEAR)
        x = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1).float()
        mean = torch.tensor(self.config.sam_pixel_mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.config.sam_pixel_std, dtype=torch.float32)[:, None, None]
        x = F.pad((x - mean) / std, (0, size - w, 0, size - h))
        device, dtype = module_device_dtype(self.sam)
        return x.unsqueeze(0).to(device=device, dtype=dtype), (h, w)

    @torch.no_grad()
    def sam_mask_logits(self, sam_pixel_values: torch.Tensor, language_embeddings: torch.Tensor,
                        multimask_output: bool = False) -> torch.Tensor:
        """Low-resolution SAM mask logits prompted by language embeddings.

        Args:
            sam_pixel_values: ``[B, 3, S, S]`` normalised, padded SAM input (:meth:`sam_preprocess`).
            language_embeddings: ``[B, N, D]``, ``D`` = SAM's prompt size; each of the ``N`` embeddings is an
                independent prompt (one mask each) and the ONLY sparse token of its prompt.
            multimask_output: ``False`` (default; LISA): the decoder's single-mask output. ``True``: the three
                multi-mask outputs, of which the one with the highest predicted IoU is returned.

        Returns:
            ``[B, N, h, w]`` float32 logits, ``h = w = 4 * S / patch`` (256 for SAM at 1024).

        Against LISA's ``model_forward`` / ``evaluate`` (SAM from Meta's ``segment_anything``):

        1. ``self.sam.get_image_embeddings(x)`` = ``visual_model.image_encoder(x)`` (ViT + neck).
        2. ``get_image_wide_positional_embeddings()`` = ``prompt_encoder.get_dense_pe()``.
        3. LISA's ``prompt_encoder(points=None, boxes=None, masks=None, text_embeds=emb.unsqueeze(1))`` (its own
           patch of Meta's ``PromptEncoder``) returns ``sparse = cat([empty (N, 0, D), text_embeds], dim=1)`` (no
           padding point: with neither points nor boxes nothing is padded) and ``dense = no_mask_embed`` broadcast to
           the image grid: here the language embeddings alone as sparse tokens, ``no_mask_embed`` as dense.
        4. ``self.sam.mask_decoder(image_embeddings, image_pe, sparse [B, N, 1, D], dense, multimask_output)`` =
           ``mask_decoder(image_embeddings=emb_i, image_pe=..., sparse, dense, multimask_output)``: Meta repeats the
           image once per prompt (its batch of ``N``); transformers holds the prompts on the "point batch" axis and
           repeats the image the same way. Tokens are ``[iou, mask_0..3, sparse...]`` in both.
        """
        sam = self.sam
        device, dtype = module_device_dtype(sam)
        pixel_values = sam_pixel_values.to(device=device, dtype=dtype)
        batch = pixel_values.shape[0]
        if language_embeddings.dim() != 3 or language_embeddings.shape[0] != batch:
            raise ValueError(f"language_embeddings must be [B={batch}, N, D], got {tuple(language_embeddings.shape)}")
        width = sam.prompt_encoder.hidden_size
        if language_embeddings.shape[2] != width:
            raise ValueError(f"language_embeddings must be {width} wide (SAM's prompt size), "
                             f"got {language_embeddings.shape[2]}")
        n_prompts = language_embeddings.shape[1]
        grid = sam.prompt_encoder.image_embedding_size
        if n_prompts == 0:
            return torch.zeros((batch, 0, 4 * grid[0], 4 * grid[1]), dtype=torch.float32, device=device)

        image_embeddings = sam.get_image_embeddings(pixel_values)            # [B, D, g, g]
        image_pe = sam.get_image_wide_positional_embeddings().repeat(batch, 1, 1, 1)
        sparse = language_embeddings.to(device=device, dtype=dtype).unsqueeze(2)  # [B, N, 1, D]
        dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, grid[0], grid[1])
        masks, iou = sam.mask_decoder(
            image_embeddings=image_embeddings,
            image_positional_embeddings=image_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )                                                                   # [B, N, M, 4g, 4g], [B, N, M]
        if masks.shape[2] > 1:
            best = iou.argmax(dim=-1)                                       # [B, N]
            index = best[:, :, None, None, None].expand(-1, -1, 1, masks.shape[-2], masks.shape[-1])
            masks = masks.gather(2, index)
        return masks[:, :, 0].float()

    def sam_postprocess(self, logits: torch.Tensor, input_size: tuple[int, int],
                        original_size: tuple[int, int]) -> torch.Tensor:
        """Meta's ``Sam.postprocess_masks`` (LISA calls it): ``[..., h, w]`` low-resolution logits -> bilinear to
        ``S x S`` -> crop the padding off (``input_size``, the resized image) -> bilinear to ``original_size``
        ``(H, W)``. In float32."""
        size = int(self.config.sam_image_size)
        lead = logits.shape[:-2]
        x = logits.reshape(-1, 1, *logits.shape[-2:]).float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        x = x[..., : input_size[0], : input_size[1]]
        x = F.interpolate(x, size=tuple(original_size), mode="bilinear", align_corners=False)
        return x.reshape(*lead, *x.shape[-2:])

    def masks_from_prompts(self, image: Image.Image, prompt_embeddings: torch.Tensor, threshold: float,
                           return_probabilities: bool) -> tuple[list, list]:
        """One mask per prompt embedding (``[N, D]``, the projected ``[SEG]`` states): SAM -> Meta's
        post-processing back to the image's H x W -> sigmoid -> ``> threshold``. Returns (masks, probabilities),
        each a list of ``(1, H, W)`` arrays.

        LISA's rule is ``logits > 0``, which is ``sigmoid(logits) > 0.5``; at ``threshold == 0.5`` the masks are
        computed as ``logits > 0`` (in float32 a logit within ~6e-8 of zero has a sigmoid that rounds to exactly
        0.5, where the two would otherwise disagree)."""
        pixel_values, input_size = self.sam_preprocess(image)
        with onloaded(self.sam):
            logits = self.sam_mask_logits(pixel_values, prompt_embeddings.unsqueeze(0),
                                          multimask_output=bool(self.config.sam_multimask_output))[0]
        logits = self.sam_postprocess(logits, input_size, (image.height, image.width))  # [N, H, W]
        masks, probabilities = [], []
        for x in logits:
            x = x[None]
            p = x.sigmoid()
            masks.append(((x > 0) if float(threshold) == 0.5 else (p > threshold)).cpu().numpy())
            if return_probabilities:
                probabilities.append(p.cpu().numpy().astype(np.float32))
        return masks, probabilities


__all__ = ["SAM_PIXEL_MEAN", "SAM_PIXEL_STD", "SamImageHeadMixin", "resize_longest_side_shape", "sam_head_settings"]
