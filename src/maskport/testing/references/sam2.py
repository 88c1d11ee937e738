"""Reference implementations of Sa2VA's language-prompted SAM2 mask head, for tests.

``meta_language_*`` follow Meta's ``SAM2Base`` as Sa2VA drives it (``SAM2TrainRunner.get_sam2_embeddings`` +
``inject_language_embd``): ``forward_image`` -> ``_prepare_backbone_features`` -> add ``no_mem_embed`` to the
lowest-resolution level (``directly_add_no_mem_embed``) -> feature maps -> prompt encoder with one empty point
(label -1, no boxes) -> language embeddings appended to the sparse tokens -> mask decoder with the two
high-resolution levels.

``hf_language_*`` compute the same with transformers' ``Sam2Model`` pieces, the way ``Sam2Model.forward`` does for
a call without points or boxes, plus the extra language tokens:

- image features: ``get_image_features`` (vision encoder, then ``conv_s0``/``conv_s1`` on levels 0/1, like Meta's
  ``forward_image``), ``no_memory_embedding`` added to the last level, reshaped with ``backbone_feature_sizes``.
- sparse tokens: transformers' prompt encoder takes points as ``(B, point_batch, N, 2)``; with
  ``input_boxes=None`` it pads one ``(0, 0)`` point labelled -1, exactly like Meta's ``_embed_points(pad=boxes is
  None)``. Both therefore produce two ``not_a_point_embed`` tokens ([the empty point, the pad]); the language
  tokens go after them, on the token axis (dim 2 in HF, dim 1 in Meta).
- dense PE: ``get_image_wide_positional_embeddings()`` (= Meta's ``get_dense_pe()``), repeated over the batch
  because transformers' decoder indexes it per image.

Neither applies Meta's ``_forward_sam_heads`` post-processing (``NO_OBJ_SCORE`` where the object score is <= 0,
best-IoU choice among 3 masks); :func:`select_like_forward_sam_heads` does, for whoever needs it.
"""

from __future__ import annotations

import torch

NO_OBJ_SCORE = -1024.0  # sam2.modeling.sam2_base.NO_OBJ_SCORE


def meta_language_outputs(meta_model, pixel_values: torch.Tensor, language_embeddings: torch.Tensor, *,
                          multimask_output: bool = False) -> dict:
    """Meta's path. ``language_embeddings``: ``(B, N, hidden_dim)``. Returns a dict with ``image_embeddings``
    (``[feat_s0, feat_s1, lowres+no_mem]``), ``sparse_embeddings`` ``(B, 2+N, C)``, ``low_res_masks``
    ``(B, M, 4h, 4w)``, ``iou_scores`` ``(B, M)``, ``object_score_logits`` ``(B, 1)``."""
    m = meta_model
    backbone_out = m.forward_image(pixel_values)
    _, vision_feats, _, feat_sizes = m._prepare_backbone_features(backbone_out)
    B = vision_feats[-1].size(1)
    C = m.hidden_dim
    H, W = feat_sizes[-1]
    if not m.directly_add_no_mem_embed:
        raise NotImplementedError("Sa2VA's path needs directly_add_no_mem_embed")
    pix_feat = (vision_feats[-1] + m.no_mem_embed).permute(1, 2, 0).view(B, C, H, W)
    high_res = [x.permute(1, 2, 0).view(x.size(1), x.size(2), *s) for x, s in zip(vision_feats[:-1], feat_sizes[:-1])]

    device = pixel_values.device
    coords = torch.zeros(B, 1, 2, device=device)
    labels = -torch.ones(B, 1, dtype=torch.int32, device=device)
    sparse, dense = m.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    sparse = torch.cat([sparse, language_embeddings.to(sparse.dtype)], dim=1)
    masks, ious, _, obj = m.sam_mask_decoder(
        image_embeddings=pix_feat,
        image_pe=m.sam_prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask_output,
        repeat_image=False,
        high_res_features=high_res,
    )
    return dict(image_embeddings=[*high_res, pix_feat], sparse_embeddings=sparse, low_res_masks=masks,
                iou_scores=ious, object_score_logits=obj)


def hf_language_outputs(hf_sam2_model, pixel_values: torch.Tensor, language_embeddings: torch.Tensor, *,
                        multimask_output: bool = False) -> dict:
    """The same through transformers' ``Sam2Model``; same dict layout as :func:`meta_language_outputs`."""
    m = hf_sam2_model
    B = pixel_values.shape[0]
    feats = list(m.get_image_features(pixel_values, return_dict=True).fpn_hidden_states)  # (HW, B, C) each
    feats[-1] = feats[-1] + m.no_memory_embedding
    image_embeddings = [f.permute(1, 2, 0).reshape(B, -1, *size) for f, size in zip(feats, m.backbone_feature_sizes)]

    device, dtype = image_embeddings[-1].device, image_embeddings[-1].dtype
    points = torch.zeros(B, 1, 1, 2, dtype=dtype, device=device)
    labels = -torch.ones(B, 1, 1, dtype=torch.int32, device=device)
    sparse, dense = m.prompt_encoder(input_points=points, input_labels=labels, input_boxes=None, input_masks=None)
    sparse = torch.cat([sparse, language_embeddings[:, None].to(sparse.dtype)], dim=2)  # (B, 1, 2+N, C)
    image_pe = m.get_image_wide_positional_embeddings().repeat(B, 1, 1, 1)
    masks, ious, _, obj = m.mask_decoder(
        image_embeddings=image_embeddings[-1],
        image_positional_embeddings=image_pe,
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask_output,
        high_resolution_features=image_embeddings[:-1],
    )
    return dict(image_embeddings=image_embeddings, sparse_embeddings=sparse[:, 0], low_res_masks=masks[:, 0],
                iou_scores=ious[:, 0], object_score_logits=obj[:, 0])


def meta_language_mask_logits(meta_model, pixel_values, language_embeddings, *, multimask_output=False):
    """Low-resolution mask logits ``(B, M, H/4, W/4)`` (M = 1, or 3 with ``multimask_output``), Meta's path."""
    return meta_language_outputs(meta_model, pixel_values, language_embeddings,
                                 multimask_output=multimask_output)["low_res_masks"]


def hf_language_mask_logits(hf_sam2_model, pixel_values, language_embeddings, *, multimask_output=False):
    """Low-resolution mask logits ``(B, M, H/4, W/4)``, transformers' ``Sam2Model`` path."""
    return hf_language_outputs(hf_sam2_model, pixel_values, language_embeddings,
                               multimask_output=multimask_output)["low_res_masks"]


def select_like_forward_sam_heads(outputs: dict) -> torch.Tensor:
    """Meta's ``_forward_sam_heads`` on top of the decoder outputs (with ``pred_obj_scores``): masks of images
    whose object score is <= 0 become ``NO_OBJ_SCORE``; with 3 masks, keep the best-IoU one. ``(B, 1, h, w)``."""
    masks, ious, obj = outputs["low_res_masks"], outputs["iou_scores"], outputs["object_score_logits"]
    masks = torch.where((obj > 0)[:, None, None], masks, NO_OBJ_SCORE)
    if masks.shape[1] > 1:
        best = torch.argmax(ious, dim=-1)
        masks = masks[torch.arange(masks.shape[0], device=masks.device), best].unsqueeze(1)
    return masks
