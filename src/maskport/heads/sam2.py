"""The SAM2 image head, converter side: Meta's SAM2 checkpoint (``sam2_hiera_*.pt``) -> transformers' native
``Sam2Model``, the ``--sam2*`` inputs a family using this head declares, and the input normalisation.

The table :data:`SAM2_RULES` reads the source named ``sam2`` (Meta's key names, as in
``{'model': state_dict}``) and writes ``Sam2Model`` keys without a prefix; a family embeds it with
:func:`sam2_rules` (``target_prefix="sam2."`` by default), which can also take the mask decoder from a
training checkpoint that fine-tuned it (``mask_decoder_from="ckpt:grounding_encoder.sam2_model."``).

Layout differences (everything else is a plain rename):

- ``sam_prompt_encoder.point_embeddings.{0..3}.weight`` are four ``(1, C)`` embeddings in Meta's code and
  one ``(4, C)`` ``prompt_encoder.point_embed.weight`` in transformers: a concat along dim 0, in label order.
- ``sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix`` is one buffer in Meta's code; transformers
  keeps two copies (``shared_image_embedding`` for the dense image PE, ``prompt_encoder.shared_embedding`` for
  point coordinates): one tensor duplicated into both (the engine's rule kind ``Duplicate``).
- Meta's ``MLP.layers.{0,1,...}`` become ``proj_in`` / ``layers.{i-1}`` / ``proj_out``; ``nn.Sequential`` indices
  (``output_upscaling.{0,1,3}``, ``mask_downscaling.{0,1,3,4,6}``) become named modules.
- Positional encodings (``pos_embed``, ``pos_embed_window``) and ``no_mem_embed`` have identical layouts.

Video parts (SAM2's memory, kept so that exports can propagate masks through videos) map to transformers'
``Sam2VideoModel``, whose image parts carry the same names as ``Sam2Model``'s:

- ``memory_attention.layers.{i}``: ``out_proj`` -> ``o_proj``, ``norm{n}`` -> ``layer_norm{n}``; ``norm`` ->
  ``layer_norm``.
- ``memory_encoder``: the mask downsampler's ``Sequential`` (conv, LayerNorm2d, GELU per stride-2 step, a 1x1 conv
  last) -> ``layers.{i}.conv`` / ``layers.{i}.layer_norm`` / ``final_conv``; ``pix_feat_proj`` ->
  ``feature_projection``; ``fuser.layers.{i}.{dwconv,norm,pwconv1,pwconv2}`` ->
  ``memory_fuser.layers.{i}.{depthwise_conv,layer_norm,pointwise_conv1,pointwise_conv2}``; the ConvNeXt layer-scale
  ``gamma`` (the only layer-scale of SAM2; Sa2VA's released folders call it ``g_weight``) -> ``scale``;
  ``out_proj`` -> ``projection``.
- ``maskmem_tpos_enc`` -> ``memory_temporal_positional_encoding`` (same index order: entry ``k - 1`` for a memory
  ``k`` frames back, the last for conditioning frames), ``no_mem_pos_enc`` -> ``no_memory_positional_encoding``,
  ``no_obj_ptr`` -> ``no_object_pointer``, ``obj_ptr_proj`` (3-layer MLP) -> ``object_pointer_proj``,
  ``mask_downsample`` unchanged; SAM2.1's ``obj_ptr_tpos_proj`` -> ``temporal_positional_encoding_projection_layer``
  and ``no_obj_embed_spatial`` -> ``occlusion_spatial_embedding_parameter`` (absent from SAM2 v1 checkpoints, whose
  config then turns both features off: :func:`hf_sam2_video_config`).

The module also describes Meta's model hyper-parameters (:class:`MetaSam2Spec`), the official presets
(:data:`SAM2_PRESETS`), recognises a checkpoint's preset from tensor shapes (:func:`detect_sam2_preset`), reads a
Meta hydra model config (:func:`spec_from_meta_config`) and builds the matching ``transformers.Sam2Config``
(:func:`hf_sam2_config`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Mapping

from pathlib import Path

from ..convert.rules import Concat, DropIfEqual, Duplicate, Rename, Rule, Take, parse_ref, prefixed
from ..errors import MissingInput, UnreadableFile, UnsupportedCheckpoint, WrongFamily
from ..convert.options import MMENGINE_TO_HF, InputOption

__all__ = [
    "sam2_inputs",
    "open_sam2",
    "sam2_normalization",
    "SAM2_RULES",
    "SAM2_MASK_DECODER_PATTERN",
    "sam2_rules",
    "MetaSam2Spec",
    "SAM2_PRESETS",
    "detect_sam2_preset",
    "spec_from_meta_config",
    "read_sam2_config",
    "hf_sam2_config",
    "hf_sam2_video_config",
]


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------

S = "sam2:"  # Meta's checkpoint
SAM2_MASK_DECODER_PATTERN = "sam_mask_decoder."


def _mlp(meta: str, hf: str, num_layers: int) -> list[Rule]:
    """Meta's ``MLP.layers.{0..n-1}`` -> transformers' ``Sam2FeedForward`` (``proj_in``, ``layers.*``, ``proj_out``)."""
    out: list[Rule] = [Rename(f"{hf}.proj_in.{{p}}", f"{S}{meta}.layers.0.{{p}}")]
    for i in range(1, num_layers - 1):
        out.append(Rename(f"{hf}.layers.{i - 1}.{{p}}", f"{S}{meta}.layers.{i}.{{p}}"))
    out.append(Rename(f"{hf}.proj_out.{{p}}", f"{S}{meta}.layers.{num_layers - 1}.{{p}}"))
    return out


def _attention(meta: str, hf: str) -> list[Rule]:
    """SAM's two-way-transformer ``Attention``: q/k/v keep their names, ``out_proj`` becomes ``o_proj``."""
    return [
        Rename(f"{hf}.q_proj.{{p}}", f"{S}{meta}.q_proj.{{p}}"),
        Rename(f"{hf}.k_proj.{{p}}", f"{S}{meta}.k_proj.{{p}}"),
        Rename(f"{hf}.v_proj.{{p}}", f"{S}{meta}.v_proj.{{p}}"),
        Rename(f"{hf}.o_proj.{{p}}", f"{S}{meta}.out_proj.{{p}}"),
    ]


SAM2_RULES: list[Rule] = [
    # ---- image encoder: Hiera trunk ------------------------------------------------------------------
    Rename("vision_encoder.backbone.patch_embed.projection.{p}", S + "image_encoder.trunk.patch_embed.proj.{p}"),
    Rename("vision_encoder.backbone.pos_embed", S + "image_encoder.trunk.pos_embed"),                # (1,C,h,w)
    Rename("vision_encoder.backbone.pos_embed_window", S + "image_encoder.trunk.pos_embed_window"),  # (1,C,w0,w0)
    Rename("vision_encoder.backbone.blocks.{i}.layer_norm1.{p}", S + "image_encoder.trunk.blocks.{i}.norm1.{p}"),
    Rename("vision_encoder.backbone.blocks.{i}.attn.qkv.{p}", S + "image_encoder.trunk.blocks.{i}.attn.qkv.{p}"),
    Rename("vision_encoder.backbone.blocks.{i}.attn.proj.{p}", S + "image_encoder.trunk.blocks.{i}.attn.proj.{p}"),
    Rename("vision_encoder.backbone.blocks.{i}.layer_norm2.{p}", S + "image_encoder.trunk.blocks.{i}.norm2.{p}"),
    Rename("vision_encoder.backbone.blocks.{i}.mlp.proj_in.{p}", S + "image_encoder.trunk.blocks.{i}.mlp.layers.0.{p}"),
    Rename("vision_encoder.backbone.blocks.{i}.mlp.proj_out.{p}", S + "image_encoder.trunk.blocks.{i}.mlp.layers.1.{p}"),
    # the first block of stages 1..3 widens the channels: a linear projection of the skip path
    Rename("vision_encoder.backbone.blocks.{i}.proj.{p}", S + "image_encoder.trunk.blocks.{i}.proj.{p}"),
    # ---- image encoder: FPN neck (Meta wraps each 1x1 conv in a Sequential named 'conv') ---------------
    Rename("vision_encoder.neck.convs.{i}.{p}", S + "image_encoder.neck.convs.{i}.conv.{p}"),
    # ---- "no memory" embedding: added to the lowest-resolution feature map of a single image ----------
    Rename("no_memory_embedding", S + "no_mem_embed"),                                              # (1,1,C)
    # ---- prompt encoder --------------------------------------------------------------------------------
    # one random-Fourier matrix in Meta's code; transformers keeps it twice (dense image PE + point PE)
    Duplicate(("shared_image_embedding.positional_embedding", "prompt_encoder.shared_embedding.positional_embedding"),
              S + "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
    # four (1,C) embeddings (neg, pos, box corner 1, box corner 2) -> one (4,C) embedding table
    Concat("prompt_encoder.point_embed.weight",
           tuple(S + f"sam_prompt_encoder.point_embeddings.{k}.weight" for k in range(4)), dim=0),
    Rename("prompt_encoder.not_a_point_embed.weight", S + "sam_prompt_encoder.not_a_point_embed.weight"),
    Rename("prompt_encoder.no_mask_embed.weight", S + "sam_prompt_encoder.no_mask_embed.weight"),
    Rename("prompt_encoder.mask_embed.conv1.{p}", S + "sam_prompt_encoder.mask_downscaling.0.{p}"),
    Rename("prompt_encoder.mask_embed.layer_norm1.{p}", S + "sam_prompt_encoder.mask_downscaling.1.{p}"),
    Rename("prompt_encoder.mask_embed.conv2.{p}", S + "sam_prompt_encoder.mask_downscaling.3.{p}"),
    Rename("prompt_encoder.mask_embed.layer_norm2.{p}", S + "sam_prompt_encoder.mask_downscaling.4.{p}"),
    Rename("prompt_encoder.mask_embed.conv3.{p}", S + "sam_prompt_encoder.mask_downscaling.6.{p}"),
    # ---- mask decoder: output tokens ------------------------------------------------------------------
    Rename("mask_decoder.obj_score_token.weight", S + "sam_mask_decoder.obj_score_token.weight"),
    Rename("mask_decoder.iou_token.weight", S + "sam_mask_decoder.iou_token.weight"),
    Rename("mask_decoder.mask_tokens.weight", S + "sam_mask_decoder.mask_tokens.weight"),
    # ---- mask decoder: two-way transformer ------------------------------------------------------------
    *_attention("sam_mask_decoder.transformer.layers.{i}.{attn}", "mask_decoder.transformer.layers.{i}.{attn}"),
    Rename("mask_decoder.transformer.layers.{i}.layer_norm{n}.{p}", S + "sam_mask_decoder.transformer.layers.{i}.norm{n}.{p}"),
    *_mlp("sam_mask_decoder.transformer.layers.{i}.mlp", "mask_decoder.transformer.layers.{i}.mlp", 2),
    *_attention("sam_mask_decoder.transformer.final_attn_token_to_image",
                "mask_decoder.transformer.final_attn_token_to_image"),
    Rename("mask_decoder.transformer.layer_norm_final_attn.{p}", S + "sam_mask_decoder.transformer.norm_final_attn.{p}"),
    # ---- mask decoder: upscaling (Sequential: ConvT, LayerNorm2d, GELU, ConvT, GELU) + high-res convs ----
    Rename("mask_decoder.upscale_conv1.{p}", S + "sam_mask_decoder.output_upscaling.0.{p}"),
    Rename("mask_decoder.upscale_layer_norm.{p}", S + "sam_mask_decoder.output_upscaling.1.{p}"),
    Rename("mask_decoder.upscale_conv2.{p}", S + "sam_mask_decoder.output_upscaling.3.{p}"),
    Rename("mask_decoder.conv_s0.{p}", S + "sam_mask_decoder.conv_s0.{p}"),
    Rename("mask_decoder.conv_s1.{p}", S + "sam_mask_decoder.conv_s1.{p}"),
    # ---- mask decoder: heads (3-layer MLPs) -----------------------------------------------------------
    *_mlp("sam_mask_decoder.output_hypernetworks_mlps.{k}", "mask_decoder.output_hypernetworks_mlps.{k}", 3),
    *_mlp("sam_mask_decoder.iou_prediction_head", "mask_decoder.iou_prediction_head", 3),
    *_mlp("sam_mask_decoder.pred_obj_score_head", "mask_decoder.pred_obj_score_head", 3),
    # ---- video: memory attention (RoPE self- and cross-attention layers over the memory bank) ---------------
    *_attention("memory_attention.layers.{i}.self_attn", "memory_attention.layers.{i}.self_attn"),
    *_attention("memory_attention.layers.{i}.cross_attn_image", "memory_attention.layers.{i}.cross_attn_image"),
    Rename("memory_attention.layers.{i}.linear1.{p}", S + "memory_attention.layers.{i}.linear1.{p}"),
    Rename("memory_attention.layers.{i}.linear2.{p}", S + "memory_attention.layers.{i}.linear2.{p}"),
    Rename("memory_attention.layers.{i}.layer_norm{n}.{p}", S + "memory_attention.layers.{i}.norm{n}.{p}"),
    Rename("memory_attention.layer_norm.{p}", S + "memory_attention.norm.{p}"),
    # ---- video: memory encoder. Meta's mask downsampler is one Sequential of (conv, LayerNorm2d, GELU) x 4
    # (total stride 16 at stride 2, checked by hf_sam2_video_config) then a 1x1 conv at index 12 ------------------
    *[r for i in range(4) for r in (
        Rename(f"memory_encoder.mask_downsampler.layers.{i}.conv.{{p}}",
               S + f"memory_encoder.mask_downsampler.encoder.{3 * i}.{{p}}"),
        Rename(f"memory_encoder.mask_downsampler.layers.{i}.layer_norm.{{p}}",
               S + f"memory_encoder.mask_downsampler.encoder.{3 * i + 1}.{{p}}"))],
    Rename("memory_encoder.mask_downsampler.final_conv.{p}", S + "memory_encoder.mask_downsampler.encoder.12.{p}"),
    Rename("memory_encoder.feature_projection.{p}", S + "memory_encoder.pix_feat_proj.{p}"),
    # ConvNeXt fuser blocks; the layer-scale 'gamma' is transformers' 'scale' (same (C,) layout)
    Rename("memory_encoder.memory_fuser.layers.{i}.scale", S + "memory_encoder.fuser.layers.{i}.gamma"),
    Rename("memory_encoder.memory_fuser.layers.{i}.depthwise_conv.{p}", S + "memory_encoder.fuser.layers.{i}.dwconv.{p}"),
    Rename("memory_encoder.memory_fuser.layers.{i}.layer_norm.{p}", S + "memory_encoder.fuser.layers.{i}.norm.{p}"),
    Rename("memory_encoder.memory_fuser.layers.{i}.pointwise_conv1.{p}", S + "memory_encoder.fuser.layers.{i}.pwconv1.{p}"),
    Rename("memory_encoder.memory_fuser.layers.{i}.pointwise_conv2.{p}", S + "memory_encoder.fuser.layers.{i}.pwconv2.{p}"),
    Rename("memory_encoder.projection.{p}", S + "memory_encoder.out_proj.{p}"),
    # ---- video: memory-bank encodings, object pointers ---------------------------------------------------
    Rename("memory_temporal_positional_encoding", S + "maskmem_tpos_enc"),                         # (7,1,1,mem)
    Rename("no_memory_positional_encoding", S + "no_mem_pos_enc"),                                  # (1,1,C)
    Rename("no_object_pointer", S + "no_obj_ptr"),                                                  # (1,C)
    *_mlp("obj_ptr_proj", "object_pointer_proj", 3),
    Rename("mask_downsample.{p}", S + "mask_downsample.{p}"),
    # SAM2.1 only: the object pointers' temporal encoding projection and the "object absent" spatial memory
    Rename("temporal_positional_encoding_projection_layer.{p}", S + "obj_ptr_tpos_proj.{p}", optional=True),
    Rename("occlusion_spatial_embedding_parameter", S + "no_obj_embed_spatial", optional=True),
]


def _is_decoder_rule(r: Rule) -> bool:
    src = getattr(r, "source", None)
    return isinstance(src, str) and parse_ref(src)[1].startswith(SAM2_MASK_DECODER_PATTERN)


def sam2_rules(*, target_prefix: str = "sam2.", mask_decoder_from: str | None = None) -> list[Rule]:
    """The SAM2 table with targets under ``target_prefix``.

    Args:
        target_prefix: put before every target key (``"sam2."`` for a model whose ``self.sam2`` is the
            ``Sam2Model``; ``""`` for a bare ``Sam2Model``).
        mask_decoder_from: ``"source:key_prefix"``, e.g. ``"ckpt:grounding_encoder.sam2_model."``: read every
            ``sam_mask_decoder.*`` tensor from that source under that prefix (a checkpoint that fine-tuned the
            decoder). Each one supersedes (:class:`~maskport.convert.rules.Take`) the ``sam2:`` tensor of the same
            name, so both are accounted for; a decoder tensor missing there is a plan error, not a silent fallback.
    """
    rules: list[Rule] = list(SAM2_RULES)
    if mask_decoder_from is not None:
        if ":" not in mask_decoder_from:
            raise ValueError(f"mask_decoder_from {mask_decoder_from!r} must be 'source:key_prefix', "
                             "e.g. 'ckpt:grounding_encoder.sam2_model.'")
        src, key_prefix = mask_decoder_from.split(":", 1)
        if key_prefix and not key_prefix.endswith("."):
            raise ValueError(f"mask_decoder_from key prefix {key_prefix!r} must be empty or end with '.'")
        why = (f"superseded by the fine-tuned mask decoder in '{src}' "
               f"(keys under '{key_prefix}{SAM2_MASK_DECODER_PATTERN}')")
        out: list[Rule] = []
        for r in rules:
            if not _is_decoder_rule(r):
                out.append(r)
                continue
            if not isinstance(r, Rename):  # every decoder rule is a plain rename today
                raise TypeError(f"cannot redirect {r.describe()} to {mask_decoder_from!r}")
            key = parse_ref(r.source)[1]
            out.append(Take(r.target, f"{src}:{key_prefix}{key}", replaces=(r.source,), why=why))
        rules = out
    rules = prefixed(target_prefix, rules) if target_prefix else rules
    if mask_decoder_from is not None:
        rules.append(DropIfEqual(f"{src}:{key_prefix}{{rest}}", equals=S + "{rest}", reason=FROZEN_COPY_REASON,
                                 optional=True))
    return rules


FROZEN_COPY_REASON = ("frozen copy (e.g. a persistent buffer) that the training checkpoint keeps beside the trained "
                      "tensors, as DeepSpeed's module state does; the export takes the original")


# --------------------------------------------------------------------------------------------------
# Meta's hyper-parameters
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetaSam2Spec:
    """The hyper-parameters of Meta's ``SAM2Base`` that decide its weights' shapes and its image-path math.

    Defaults are the values shared by the official ``sam2`` configs (``configs/sam2/sam2_hiera_*.yaml``), not
    Meta's code defaults (see :func:`spec_from_meta_config` for those).
    """

    variant: str = "sam2"  # "sam2" | "sam2.1" (2.1 adds no_obj_embed_spatial and obj_ptr_tpos_proj: video-only)
    # Hiera trunk (sam2.modeling.backbones.hieradet.Hiera)
    embed_dim: int = 96
    num_heads: int = 1
    stages: tuple[int, ...] = (2, 3, 16, 3)
    global_att_blocks: tuple[int, ...] = (12, 16, 20)
    window_pos_embed_bkg_spatial_size: tuple[int, int] = (14, 14)
    window_spec: tuple[int, ...] = (8, 4, 14, 7)
    q_pool: int = 3
    q_stride: tuple[int, int] = (2, 2)
    dim_mul: float = 2.0
    head_mul: float = 2.0
    mlp_ratio: float = 4.0
    # FPN neck (sam2.modeling.backbones.image_encoder.FpnNeck / ImageEncoder)
    d_model: int = 256
    backbone_channel_list: tuple[int, ...] = (768, 384, 192, 96)
    fpn_top_down_levels: tuple[int, ...] = (2, 3)
    fpn_interp_model: str = "nearest"
    fuse_type: str = "sum"
    scalp: int = 1
    # SAM heads (SAM2Base)
    image_size: int = 1024
    backbone_stride: int = 16
    use_high_res_features_in_sam: bool = True
    pred_obj_scores: bool = True
    pred_obj_scores_mlp: bool = True
    iou_prediction_use_sigmoid: bool = True
    use_multimask_token_for_obj_ptr: bool = True
    multimask_output_in_sam: bool = True
    multimask_output_for_tracking: bool = True
    multimask_min_pt_num: int = 0
    multimask_max_pt_num: int = 1
    dynamic_multimask_via_stability: bool = False  # Meta's build_sam2(apply_postprocessing=True) turns it on
    dynamic_multimask_stability_delta: float = 0.05
    dynamic_multimask_stability_thresh: float = 0.98
    directly_add_no_mem_embed: bool = True
    # video memory (Sam2VideoModel)
    num_maskmem: int = 7
    mem_dim: int = 64
    use_obj_ptrs_in_encoder: bool = True
    use_mlp_for_obj_ptr_proj: bool = True
    add_tpos_enc_to_obj_ptrs: bool = False
    proj_tpos_enc_in_obj_ptrs: bool = False
    no_obj_embed_spatial: bool = False
    max_obj_ptrs_in_encoder: int = 16
    max_cond_frames_in_attn: int = -1
    memory_temporal_stride_for_eval: int = 1
    only_obj_ptrs_in_the_past_for_eval: bool = True
    fixed_no_obj_ptr: bool = True
    soft_no_obj_ptr: bool = False
    sigmoid_scale_for_mem_enc: float = 20.0
    sigmoid_bias_for_mem_enc: float = -10.0
    non_overlap_masks_for_mem_enc: bool = False
    binarize_mask_from_pts_for_mem_enc: bool = False
    # memory attention (sam2.modeling.memory_attention: MemoryAttention / MemoryAttentionLayer / RoPEAttention)
    mem_attn_d_model: int = 256
    mem_attn_num_layers: int = 4
    mem_attn_dim_feedforward: int = 2048
    mem_attn_num_heads: int = 1
    mem_attn_downsample_rate: int = 1
    mem_attn_activation: str = "relu"
    mem_attn_rope_theta: float = 10000.0
    mem_attn_feat_sizes: tuple[int, int] = (64, 64)
    mem_attn_kv_in_dim: int = 64
    mem_attn_layout: tuple[bool, bool, bool, bool] = (True, False, True, False)  # pos_enc_at_input, _at_attn,
    #                                                    _at_cross_attn_keys, _at_cross_attn_queries
    mem_attn_rope_k_repeat: bool = True
    # memory encoder (sam2.modeling.memory_encoder)
    mem_enc_in_dim: int = 256
    mask_ds_kernel_size: int = 3
    mask_ds_stride: int = 2
    mask_ds_padding: int = 1
    mask_ds_total_stride: int = 16
    fuser_num_layers: int = 2
    fuser_kernel_size: int = 7
    fuser_padding: int = 3
    fuser_use_dwconv: bool = True

    @property
    def stage_dims(self) -> list[int]:
        """Channels per stage, computed as Hiera does (``int(dim * dim_mul)`` at each stage change)."""
        dims, d = [], self.embed_dim
        for i in range(len(self.stages)):
            if i:
                d = int(d * self.dim_mul)
            dims.append(d)
        return dims

    @property
    def stage_heads(self) -> list[int]:
        heads, h = [], self.num_heads
        for i in range(len(self.stages)):
            if i:
                h = int(h * self.head_mul)
            heads.append(h)
        return heads

    @property
    def feature_sizes(self) -> list[int]:
        """Side of each trunk stage's feature map (patch embedding stride 4, then the q-pooled stages)."""
        sizes, s = [], self.image_size // 4
        for i in range(len(self.stages)):
            if 0 < i <= self.q_pool:
                s //= self.q_stride[0]
            sizes.append(s)
        return sizes

    @property
    def multimask_without_points(self) -> bool:
        """What ``SAM2Base._use_multimask(is_init_cond_frame=True, point_inputs=None)`` returns: whether Meta's
        (and Sa2VA's) first-frame SAM head call with no clicks asks for 3 masks and keeps the best-IoU one."""
        return bool(self.multimask_output_in_sam and self.multimask_min_pt_num <= 0 <= self.multimask_max_pt_num)


_BASE_SAM2 = MetaSam2Spec()
_BASE_SAM21 = dataclasses.replace(_BASE_SAM2, variant="sam2.1", add_tpos_enc_to_obj_ptrs=True,
                                  proj_tpos_enc_in_obj_ptrs=True, no_obj_embed_spatial=True)

_TRUNKS: dict[str, dict[str, Any]] = {  # from sam2/configs/sam2{,.1}/sam2{,.1}_hiera_{t,s,b+,l}.yaml
    "tiny": dict(embed_dim=96, num_heads=1, stages=(1, 2, 7, 2), global_att_blocks=(5, 7, 9),
                 window_pos_embed_bkg_spatial_size=(7, 7), window_spec=(8, 4, 14, 7),
                 backbone_channel_list=(768, 384, 192, 96)),
    "small": dict(embed_dim=96, num_heads=1, stages=(1, 2, 11, 2), global_att_blocks=(7, 10, 13),
                  window_pos_embed_bkg_spatial_size=(7, 7), window_spec=(8, 4, 14, 7),
                  backbone_channel_list=(768, 384, 192, 96)),
    "base_plus": dict(embed_dim=112, num_heads=2, stages=(2, 3, 16, 3), global_att_blocks=(12, 16, 20),
                      window_pos_embed_bkg_spatial_size=(14, 14), window_spec=(8, 4, 14, 7),
                      backbone_channel_list=(896, 448, 224, 112)),
    "large": dict(embed_dim=144, num_heads=2, stages=(2, 6, 36, 4), global_att_blocks=(23, 33, 43),
                  window_pos_embed_bkg_spatial_size=(7, 7), window_spec=(8, 4, 16, 8),
                  backbone_channel_list=(1152, 576, 288, 144)),
}

SAM2_PRESETS: dict[str, MetaSam2Spec] = {
    f"{v}_hiera_{size}": dataclasses.replace(base, **trunk)
    for v, base in (("sam2", _BASE_SAM2), ("sam2.1", _BASE_SAM21))
    for size, trunk in _TRUNKS.items()
}


# --------------------------------------------------------------------------------------------------
# Preset detection from shapes
# --------------------------------------------------------------------------------------------------

_BLOCK = re.compile(r"^image_encoder\.trunk\.blocks\.(\d+)\.")


def _shapes_of(source) -> dict[str, tuple[int, ...]]:
    if hasattr(source, "keys") and hasattr(source, "info"):
        return {k: tuple(source.info(k).shape) for k in source.keys()}
    if isinstance(source, Mapping):
        return {k: tuple(v.shape) for k, v in source.items() if hasattr(v, "shape")}
    raise TypeError(f"expected a TensorSource or a state dict, got {type(source).__name__}")


def _signature(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    blocks = sorted({int(m.group(1)) for k in shapes if (m := _BLOCK.match(k))})
    if blocks != list(range(len(blocks))):
        raise WrongFamily(f"SAM2 checkpoint with non-contiguous trunk blocks {blocks[:5]}...; damaged file?")
    # a block with a skip projection starts a new (wider) stage
    starts = [i for i in blocks if f"image_encoder.trunk.blocks.{i}.proj.weight" in shapes]
    bounds = [0, *starts, len(blocks)]
    necks = sorted({int(k.split(".")[3]) for k in shapes if k.startswith("image_encoder.neck.convs.")})
    return dict(
        embed_dim=shapes["image_encoder.trunk.patch_embed.proj.weight"][0],
        stages=tuple(b - a for a, b in zip(bounds, bounds[1:])),
        window_pos_embed_bkg_spatial_size=tuple(shapes["image_encoder.trunk.pos_embed"][2:]),
        window0=shapes["image_encoder.trunk.pos_embed_window"][2],
        d_model=shapes["image_encoder.neck.convs.0.conv.weight"][0],
        backbone_channel_list=tuple(shapes[f"image_encoder.neck.convs.{i}.conv.weight"][1] for i in necks),
        variant="sam2.1" if ("no_obj_embed_spatial" in shapes or "obj_ptr_tpos_proj.weight" in shapes) else "sam2",
    )


def _spec_signature(spec: MetaSam2Spec) -> dict[str, Any]:
    return dict(embed_dim=spec.embed_dim, stages=tuple(spec.stages),
                window_pos_embed_bkg_spatial_size=tuple(spec.window_pos_embed_bkg_spatial_size),
                window0=spec.window_spec[0], d_model=spec.d_model,
                backbone_channel_list=tuple(spec.backbone_channel_list), variant=spec.variant)


def detect_sam2_preset(source) -> tuple[str, MetaSam2Spec]:
    """Which official SAM2 / SAM2.1 model a Meta checkpoint is, from its tensor names and shapes.

    The trunk width and depth, stage boundaries, positional-embedding sizes and neck channels are read from
    shapes; the number of heads, global-attention blocks and window sizes past the first stage leave no trace in
    the weights, so they come from the matched preset.

    Raises:
        UnreadableFile: the source holds no tensors.
        WrongFamily: not Meta's SAM2 layout, or a SAM2 layout that no official preset fits (then describe the
            model with :func:`spec_from_meta_config`).
    """
    shapes = _shapes_of(source)
    where = getattr(source, "path", None) or "the SAM2 checkpoint"
    if not shapes:
        raise UnreadableFile(f"{where}: holds no tensors; expected Meta's SAM2 checkpoint (e.g. sam2_hiera_large.pt)")
    core = ("image_encoder.trunk.patch_embed.proj.weight", "image_encoder.trunk.pos_embed",
            "image_encoder.trunk.pos_embed_window", "image_encoder.neck.convs.0.conv.weight",
            "sam_mask_decoder.iou_token.weight", "sam_prompt_encoder.not_a_point_embed.weight")
    missing = [k for k in core if k not in shapes]
    if missing:
        keys = list(shapes)
        hint = ""
        if any(k.startswith("vision_encoder.backbone.") for k in keys):
            hint = " It looks like a transformers Sam2Model already (vision_encoder.backbone.*): nothing to convert."
        elif any(k.startswith("image_encoder.blocks.") for k in keys) or "mask_decoder.iou_token.weight" in shapes:
            hint = " It looks like SAM (v1, ViT image encoder), not SAM2."
        else:
            nested = sorted({k[: k.index("image_encoder.trunk.")] for k in keys if "image_encoder.trunk." in k})
            if nested:
                hint = (f" Its SAM2 tensors sit under the prefix {nested[0]!r} (a training checkpoint?); "
                        "pass Meta's released sam2_hiera_*.pt instead.")
        raise WrongFamily(f"{where}: not Meta's SAM2 checkpoint layout (missing {missing[0]}; first keys: "
                          f"{keys[:3]}).{hint}")
    sig = _signature(shapes)
    for name, spec in SAM2_PRESETS.items():
        if _spec_signature(spec) == sig:
            return name, spec
    described = ", ".join(f"{k}={v}" for k, v in sig.items())
    raise WrongFamily(
        f"{where}: a SAM2 checkpoint that matches none of the official presets ({', '.join(SAM2_PRESETS)}); "
        f"found {described}. For a custom SAM2, pass its model config with --sam2-config (Meta's hydra "
        "sam2*_hiera_*.yaml, or the same as JSON)."
    )


# --------------------------------------------------------------------------------------------------
# Meta hydra config -> spec
# --------------------------------------------------------------------------------------------------

# Meta's code defaults (used when a key is absent from the config)
_HIERA_DEFAULTS = dict(embed_dim=96, num_heads=1, q_pool=3, q_stride=(2, 2), stages=(2, 3, 16, 3), dim_mul=2.0,
                       head_mul=2.0, window_pos_embed_bkg_spatial_size=(14, 14), window_spec=(8, 4, 14, 7),
                       global_att_blocks=(12, 16, 20), mlp_ratio=4.0)
_BASE_DEFAULTS = dict(num_maskmem=7, image_size=512, backbone_stride=16, use_high_res_features_in_sam=False,
                      multimask_output_in_sam=False, multimask_min_pt_num=1, multimask_max_pt_num=1,
                      multimask_output_for_tracking=False, use_multimask_token_for_obj_ptr=False,
                      iou_prediction_use_sigmoid=False, directly_add_no_mem_embed=False,
                      use_obj_ptrs_in_encoder=False, proj_tpos_enc_in_obj_ptrs=False, pred_obj_scores=False,
                      pred_obj_scores_mlp=False, use_mlp_for_obj_ptr_proj=False, no_obj_embed_spatial=False,
                      add_tpos_enc_to_obj_ptrs=True, max_obj_ptrs_in_encoder=16, max_cond_frames_in_attn=-1,
                      memory_temporal_stride_for_eval=1, only_obj_ptrs_in_the_past_for_eval=False,
                      fixed_no_obj_ptr=False, soft_no_obj_ptr=False, sigmoid_scale_for_mem_enc=1.0,
                      sigmoid_bias_for_mem_enc=0.0, non_overlap_masks_for_mem_enc=False,
                      binarize_mask_from_pts_for_mem_enc=False)


def _plain(cfg: Any) -> Any:
    try:  # an OmegaConf DictConfig (e.g. hydra's compose()) -> plain containers
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return cfg


_CONFIG_MAX_BYTES = 1 << 20  # Meta's model configs are ~4 KB


def read_sam2_config(path: Path) -> dict:
    """Meta's SAM2 model config as plain data: its hydra YAML (``sam2.1_hiera_l.yaml``, parsed with
    ``yaml.safe_load``: no tags, no objects; hydra's ``# @package`` line is a comment) or the same as JSON
    (``.json``). At most 1 MiB. Errors are one line (:class:`~maskport.errors.UnreadableFile`)."""
    from ..io.jsonfile import JsonError, loads_bounded

    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"--sam2-config {path} does not exist")
    size = path.stat().st_size
    if size > _CONFIG_MAX_BYTES:
        raise UnreadableFile(f"--sam2-config {path}: {size} bytes; a SAM2 model config is a few KB "
                             f"(limit {_CONFIG_MAX_BYTES})")
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".json":
        try:
            data = loads_bounded(text)
        except JsonError as exc:
            raise UnreadableFile(f"--sam2-config {path}: {exc}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            first = " ".join(str(exc).split())
            raise UnreadableFile(f"--sam2-config {path}: not valid YAML ({first})") from None
    if not isinstance(data, dict):
        raise UnreadableFile(f"--sam2-config {path}: holds a {type(data).__name__}, not a model config mapping")
    return data


def spec_from_meta_config(cfg: Mapping[str, Any]) -> MetaSam2Spec:
    """A spec from Meta's hydra model config: the yaml's ``model:`` section as a dict (or the whole yaml dict).

    Absent keys take Meta's code defaults (``SAM2Base``: ``image_size=512``, no high-res features, ...), as
    ``hydra.utils.instantiate`` would.
    """
    cfg = _plain(cfg)
    if not isinstance(cfg, Mapping):
        raise TypeError(f"expected the model config as a dict, got {type(cfg).__name__}")
    if "model" in cfg and isinstance(cfg["model"], Mapping):
        cfg = cfg["model"]
    try:
        enc = cfg["image_encoder"]
        trunk, neck = enc["trunk"], enc["neck"]
    except (KeyError, TypeError) as exc:
        raise WrongFamily(f"not a SAM2 model config: no image_encoder.trunk / image_encoder.neck ({exc})") from exc
    if not str(trunk.get("_target_", "hieradet.Hiera")).endswith("Hiera"):
        raise UnsupportedCheckpoint(f"SAM2 trunk {trunk.get('_target_')} is not Hiera; Sam2Model supports Hiera only")

    def t(key):
        return trunk.get(key, _HIERA_DEFAULTS[key])

    def b(key):
        return cfg.get(key, _BASE_DEFAULTS[key])

    for key, default in (("kernel_size", 1), ("stride", 1), ("padding", 0)):
        if neck.get(key, default) != default:
            raise UnsupportedCheckpoint(f"FPN neck {key}={neck[key]} is not supported (transformers' "
                                        f"Sam2Model config assumes {key}={default} for Meta's checkpoints)")
    extra = cfg.get("sam_mask_decoder_extra_args") or {}
    mem_enc = cfg.get("memory_encoder") or {}
    mem_attn = cfg.get("memory_attention") or {}
    video = _video_fields(mem_attn, mem_enc, b, int(neck["d_model"]), int(b("image_size")),
                          int(b("backbone_stride")))
    d_model = int(neck["d_model"])
    variant = "sam2.1" if (b("no_obj_embed_spatial") or b("proj_tpos_enc_in_obj_ptrs")) else "sam2"
    return MetaSam2Spec(
        variant=variant,
        embed_dim=int(t("embed_dim")),
        num_heads=int(t("num_heads")),
        stages=tuple(int(x) for x in t("stages")),
        global_att_blocks=tuple(int(x) for x in (t("global_att_blocks") or ())),
        window_pos_embed_bkg_spatial_size=tuple(int(x) for x in t("window_pos_embed_bkg_spatial_size")),
        window_spec=tuple(int(x) for x in t("window_spec")),
        q_pool=int(t("q_pool")),
        q_stride=tuple(int(x) for x in t("q_stride")),
        dim_mul=float(t("dim_mul")),
        head_mul=float(t("head_mul")),
        mlp_ratio=float(t("mlp_ratio")),
        d_model=d_model,
        backbone_channel_list=tuple(int(x) for x in neck["backbone_channel_list"]),
        fpn_top_down_levels=tuple(int(x) for x in (neck.get("fpn_top_down_levels")
                                                    if neck.get("fpn_top_down_levels") is not None
                                                    else range(len(neck["backbone_channel_list"])))),
        fpn_interp_model=str(neck.get("fpn_interp_model", "bilinear")),
        fuse_type=str(neck.get("fuse_type", "sum")),
        scalp=int(enc.get("scalp", 0)),
        image_size=int(b("image_size")),
        backbone_stride=int(b("backbone_stride")),
        use_high_res_features_in_sam=bool(b("use_high_res_features_in_sam")),
        pred_obj_scores=bool(b("pred_obj_scores")),
        pred_obj_scores_mlp=bool(b("pred_obj_scores_mlp")),
        iou_prediction_use_sigmoid=bool(b("iou_prediction_use_sigmoid")),
        use_multimask_token_for_obj_ptr=bool(b("use_multimask_token_for_obj_ptr")),
        multimask_output_in_sam=bool(b("multimask_output_in_sam")),
        multimask_output_for_tracking=bool(b("multimask_output_for_tracking")),
        multimask_min_pt_num=int(b("multimask_min_pt_num")),
        multimask_max_pt_num=int(b("multimask_max_pt_num")),
        dynamic_multimask_via_stability=bool(extra.get("dynamic_multimask_via_stability", False)),
        dynamic_multimask_stability_delta=float(extra.get("dynamic_multimask_stability_delta", 0.05)),
        dynamic_multimask_stability_thresh=float(extra.get("dynamic_multimask_stability_thresh", 0.98)),
        directly_add_no_mem_embed=bool(b("directly_add_no_mem_embed")),
        num_maskmem=int(b("num_maskmem")),
        mem_dim=int(mem_enc.get("out_dim", d_model)),
        use_obj_ptrs_in_encoder=bool(b("use_obj_ptrs_in_encoder")),
        use_mlp_for_obj_ptr_proj=bool(b("use_mlp_for_obj_ptr_proj")),
        proj_tpos_enc_in_obj_ptrs=bool(b("proj_tpos_enc_in_obj_ptrs")),
        no_obj_embed_spatial=bool(b("no_obj_embed_spatial")),
        **video,
    )


def _video_fields(mem_attn: Mapping, mem_enc: Mapping, b, d_model: int, image_size: int, stride: int) -> dict:
    """The memory attention / memory encoder / tracking settings of a Meta model config (Meta's code defaults for
    absent keys)."""
    layer = mem_attn.get("layer") or {}
    self_attn = layer.get("self_attention") or {}
    cross = layer.get("cross_attention") or {}
    mds = mem_enc.get("mask_downsampler") or {}
    fuser = mem_enc.get("fuser") or {}
    cx = fuser.get("layer") or {}
    pos = mem_enc.get("position_encoding") or {}
    mem_dim = int(mem_enc.get("out_dim", d_model))
    out = dict(
        add_tpos_enc_to_obj_ptrs=bool(b("add_tpos_enc_to_obj_ptrs")),
        max_obj_ptrs_in_encoder=int(b("max_obj_ptrs_in_encoder")),
        max_cond_frames_in_attn=int(b("max_cond_frames_in_attn")),
        memory_temporal_stride_for_eval=int(b("memory_temporal_stride_for_eval")),
        only_obj_ptrs_in_the_past_for_eval=bool(b("only_obj_ptrs_in_the_past_for_eval")),
        fixed_no_obj_ptr=bool(b("fixed_no_obj_ptr")),
        soft_no_obj_ptr=bool(b("soft_no_obj_ptr")),
        sigmoid_scale_for_mem_enc=float(b("sigmoid_scale_for_mem_enc")),
        sigmoid_bias_for_mem_enc=float(b("sigmoid_bias_for_mem_enc")),
        non_overlap_masks_for_mem_enc=bool(b("non_overlap_masks_for_mem_enc")),
        binarize_mask_from_pts_for_mem_enc=bool(b("binarize_mask_from_pts_for_mem_enc")),
        mem_attn_d_model=int(mem_attn.get("d_model", d_model)),
        mem_attn_num_layers=int(mem_attn.get("num_layers", 4)),
        mem_attn_dim_feedforward=int(layer.get("dim_feedforward", 2048)),
        mem_attn_num_heads=int(self_attn.get("num_heads", 1)),
        mem_attn_downsample_rate=int(self_attn.get("downsample_rate", 1)),
        mem_attn_activation=str(layer.get("activation", "relu")),
        mem_attn_rope_theta=float(self_attn.get("rope_theta", 10000.0)),
        mem_attn_feat_sizes=(image_size // stride, image_size // stride),  # Meta recomputes RoPE for the real size
        mem_attn_kv_in_dim=int(cross.get("kv_in_dim", mem_dim) or mem_dim),
        mem_attn_layout=(bool(mem_attn.get("pos_enc_at_input", True)), bool(layer.get("pos_enc_at_attn", False)),
                         bool(layer.get("pos_enc_at_cross_attn_keys", True)),
                         bool(layer.get("pos_enc_at_cross_attn_queries", False))),
        mem_attn_rope_k_repeat=bool(cross.get("rope_k_repeat", True)),
        mem_enc_in_dim=int(mem_enc.get("in_dim", d_model)),
        mask_ds_kernel_size=int(mds.get("kernel_size", 4)),
        mask_ds_stride=int(mds.get("stride", 4)),
        mask_ds_padding=int(mds.get("padding", 0)),
        mask_ds_total_stride=int(mds.get("total_stride", 16)),
        fuser_num_layers=int(fuser.get("num_layers", 2)),
        fuser_kernel_size=int(cx.get("kernel_size", 7)),
        fuser_padding=int(cx.get("padding", 3)),
        fuser_use_dwconv=bool(cx.get("use_dwconv", True)),
    )
    problems = []
    for key, mod in (("cross/self-attention heads", cross.get("num_heads", out["mem_attn_num_heads"])),):
        if int(mod) != out["mem_attn_num_heads"]:
            problems.append(f"{key} differ")
    if int(pos.get("num_pos_feats", mem_dim)) != mem_dim:
        problems.append(f"memory position encoding num_pos_feats={pos.get('num_pos_feats')} != out_dim {mem_dim}")
    if problems:
        raise UnsupportedCheckpoint("this SAM2 memory cannot be expressed as transformers' Sam2VideoModel: "
                                    + "; ".join(problems))
    return out


# --------------------------------------------------------------------------------------------------
# spec -> transformers.Sam2Config
# --------------------------------------------------------------------------------------------------


def hf_sam2_config(spec: MetaSam2Spec):
    """The ``transformers.Sam2Config`` whose ``Sam2Model`` computes what Meta's image path computes for ``spec``.

    Raises :class:`~maskport.errors.UnsupportedCheckpoint` for settings that ``Sam2Model`` hard-codes otherwise
    (it always has the high-res convs, the object-score MLP head, a sigmoid IoU head, adds the no-memory
    embedding directly, uses 3 feature levels and a nearest-neighbour sum FPN).
    """
    from transformers import (Sam2Config, Sam2HieraDetConfig, Sam2MaskDecoderConfig, Sam2PromptEncoderConfig,
                              Sam2VisionConfig)

    problems = []
    required = dict(use_high_res_features_in_sam=True, pred_obj_scores=True, pred_obj_scores_mlp=True,
                    iou_prediction_use_sigmoid=True, directly_add_no_mem_embed=True, scalp=1,
                    fpn_interp_model="nearest", fuse_type="sum")
    for key, want in required.items():
        if getattr(spec, key) != want:
            problems.append(f"{key}={getattr(spec, key)!r} (Sam2Model implements {key}={want!r} only)")
    if len(spec.stages) != 4:
        problems.append(f"{len(spec.stages)} trunk stages (Sam2Model uses 3 of 4 FPN levels)")
    elif len(spec.backbone_channel_list) != 4 or list(spec.backbone_channel_list) != spec.stage_dims[::-1]:
        problems.append(f"neck channels {list(spec.backbone_channel_list)} do not match the trunk's "
                        f"{spec.stage_dims[::-1]}")
    if len(spec.window_spec) != len(spec.stages):
        problems.append(f"window_spec {spec.window_spec} does not have one entry per stage {spec.stages}")
    pool_blocks = [sum(spec.stages[:i]) for i in range(1, min(spec.q_pool, len(spec.stages) - 1) + 1)]
    if set(pool_blocks) & set(spec.global_att_blocks):
        problems.append(f"global attention on the q-pooling blocks {sorted(set(pool_blocks) & set(spec.global_att_blocks))}"
                        " (neither Meta's Hiera nor transformers' can un-window a pooled global block)")
    sizes = spec.feature_sizes
    if not problems and sizes[2] != spec.image_size // spec.backbone_stride:
        problems.append(f"the stride-{spec.backbone_stride} SAM head expects a {spec.image_size // spec.backbone_stride}"
                        f"-pixel feature map but the trunk's level 2 is {sizes[2]}")
    if spec.image_size % 16 or spec.image_size // 4 % spec.window_spec[0]:
        problems.append(f"image_size {spec.image_size} must be a multiple of 16 and of 4 * window_spec[0]")
    if problems:
        raise UnsupportedCheckpoint("this SAM2 cannot be expressed as transformers' Sam2Model: " + "; ".join(problems))

    backbone = Sam2HieraDetConfig(
        hidden_size=spec.embed_dim,
        num_attention_heads=spec.num_heads,
        image_size=[spec.image_size, spec.image_size],
        patch_kernel_size=[7, 7], patch_stride=[4, 4], patch_padding=[3, 3],  # Meta's PatchEmbed
        query_stride=list(spec.q_stride),
        window_positional_embedding_background_size=list(spec.window_pos_embed_bkg_spatial_size),
        num_query_pool_stages=spec.q_pool,
        blocks_per_stage=list(spec.stages),
        embed_dim_per_stage=spec.stage_dims,
        num_attention_heads_per_stage=spec.stage_heads,
        window_size_per_stage=list(spec.window_spec),
        global_attention_blocks=list(spec.global_att_blocks),
        mlp_ratio=float(spec.mlp_ratio),
        hidden_act="gelu",
        layer_norm_eps=1e-6,
    )
    vision = Sam2VisionConfig(
        backbone_config=backbone,
        backbone_channel_list=list(spec.backbone_channel_list),
        backbone_feature_sizes=[[s, s] for s in sizes[:3]],
        fpn_hidden_size=spec.d_model,
        fpn_kernel_size=1, fpn_stride=1, fpn_padding=0,
        fpn_top_down_levels=list(spec.fpn_top_down_levels),
        num_feature_levels=3,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
    )
    prompt = Sam2PromptEncoderConfig(
        hidden_size=spec.d_model,
        image_size=spec.image_size,
        patch_size=spec.backbone_stride,
        mask_input_channels=16,  # SAM2Base._build_sam_heads: mask_in_chans=16
        num_point_embeddings=4,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        scale=1,
    )
    decoder = Sam2MaskDecoderConfig(  # SAM2Base._build_sam_heads hard-codes depth 2, mlp 2048, 8 heads, IoU MLP 256
        hidden_size=spec.d_model,
        hidden_act="gelu",
        mlp_dim=2048,
        num_hidden_layers=2,
        num_attention_heads=8,
        attention_downsample_rate=2,
        num_multimask_outputs=3,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
        dynamic_multimask_via_stability=spec.dynamic_multimask_via_stability,
        dynamic_multimask_stability_delta=spec.dynamic_multimask_stability_delta,
        dynamic_multimask_stability_thresh=spec.dynamic_multimask_stability_thresh,
    )
    return Sam2Config(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)


def hf_sam2_video_config(spec: MetaSam2Spec):
    """The ``transformers.Sam2VideoConfig`` whose ``Sam2VideoModel`` holds every tensor of Meta's ``SAM2Base`` for
    ``spec``: the image parts exactly as :func:`hf_sam2_config` (same names, same sub-configurations), plus the
    memory attention, memory encoder, object pointers and temporal encodings.

    SAM2 v1 checkpoints (no ``obj_ptr_tpos_proj`` / ``no_obj_embed_spatial``) get
    ``enable_temporal_pos_encoding_for_object_pointers=False`` and ``enable_occlusion_spatial_embedding=False``.
    transformers hard-codes the memory cross-attention's key/value width to 64 (every official SAM2); the exports'
    ``sam2_video`` module rebuilds those projections for another ``mem_dim``, so the config records it
    (``memory_encoder_output_channels``).

    Raises :class:`~maskport.errors.UnsupportedCheckpoint` for memory settings ``Sam2VideoModel`` computes
    otherwise (listed in the message).
    """
    from transformers import Sam2VideoConfig, Sam2VideoMaskDecoderConfig, Sam2VideoPromptEncoderConfig

    image = hf_sam2_config(spec)
    problems = []
    required = dict(use_obj_ptrs_in_encoder=True, use_mlp_for_obj_ptr_proj=True, fixed_no_obj_ptr=True,
                    soft_no_obj_ptr=False, only_obj_ptrs_in_the_past_for_eval=True, memory_temporal_stride_for_eval=1,
                    non_overlap_masks_for_mem_enc=False, mem_attn_layout=(True, False, True, False),
                    mem_attn_rope_k_repeat=True, fuser_use_dwconv=True, mem_attn_d_model=spec.d_model,
                    mem_enc_in_dim=spec.d_model, mem_attn_kv_in_dim=spec.mem_dim)
    for key, want in required.items():
        if getattr(spec, key) != want:
            problems.append(f"{key}={getattr(spec, key)!r} (Sam2VideoModel implements {key}={want!r} only)")
    if spec.add_tpos_enc_to_obj_ptrs != spec.proj_tpos_enc_in_obj_ptrs:
        problems.append(f"add_tpos_enc_to_obj_ptrs={spec.add_tpos_enc_to_obj_ptrs} with proj_tpos_enc_in_obj_ptrs="
                        f"{spec.proj_tpos_enc_in_obj_ptrs} (Sam2VideoModel has both or neither)")
    if spec.mask_ds_stride < 2 or spec.mask_ds_stride ** 4 != spec.mask_ds_total_stride:
        problems.append(f"mask downsampler stride {spec.mask_ds_stride} / total stride {spec.mask_ds_total_stride}"
                        " (the mapping table expects 4 stride steps, as in every official config)")
    if spec.mem_dim > spec.d_model or spec.d_model % spec.mem_dim:
        problems.append(f"mem_dim {spec.mem_dim} must divide the hidden size {spec.d_model} (object pointers are "
                        "split into mem_dim-wide tokens)")
    if problems:
        raise UnsupportedCheckpoint("this SAM2 memory cannot be expressed as transformers' Sam2VideoModel: "
                                    + "; ".join(problems))
    side = spec.image_size // spec.backbone_stride
    return Sam2VideoConfig(
        vision_config=image.vision_config,
        prompt_encoder_config=Sam2VideoPromptEncoderConfig(**image.prompt_encoder_config.to_dict()),
        mask_decoder_config=Sam2VideoMaskDecoderConfig(**image.mask_decoder_config.to_dict()),
        num_maskmem=spec.num_maskmem,
        image_size=spec.image_size,
        sigmoid_scale_for_mem_enc=spec.sigmoid_scale_for_mem_enc,
        sigmoid_bias_for_mem_enc=spec.sigmoid_bias_for_mem_enc,
        enable_occlusion_spatial_embedding=spec.no_obj_embed_spatial,
        multimask_output_in_sam=spec.multimask_output_in_sam,
        multimask_min_pt_num=spec.multimask_min_pt_num,
        multimask_max_pt_num=spec.multimask_max_pt_num,
        multimask_output_for_tracking=spec.multimask_output_for_tracking,
        max_object_pointers_in_encoder=spec.max_obj_ptrs_in_encoder,
        max_cond_frame_num=spec.max_cond_frames_in_attn,
        enable_temporal_pos_encoding_for_object_pointers=spec.add_tpos_enc_to_obj_ptrs,
        memory_attention_hidden_size=spec.d_model,
        memory_attention_num_layers=spec.mem_attn_num_layers,
        memory_attention_num_attention_heads=spec.mem_attn_num_heads,
        memory_attention_downsample_rate=spec.mem_attn_downsample_rate,
        memory_attention_feed_forward_hidden_size=spec.mem_attn_dim_feedforward,
        memory_attention_feed_forward_hidden_act=spec.mem_attn_activation,
        memory_attention_rope_feat_sizes=[side, side],
        rope_parameters={"rope_type": "axial", "rope_theta": spec.mem_attn_rope_theta},
        memory_encoder_hidden_size=spec.d_model,
        memory_encoder_output_channels=spec.mem_dim,
        mask_downsampler_embed_dim=spec.d_model,
        mask_downsampler_kernel_size=spec.mask_ds_kernel_size,
        mask_downsampler_stride=spec.mask_ds_stride,
        mask_downsampler_padding=spec.mask_ds_padding,
        mask_downsampler_total_stride=spec.mask_ds_total_stride,
        mask_downsampler_hidden_act="gelu",
        memory_fuser_num_layers=spec.fuser_num_layers,
        memory_fuser_embed_dim=spec.d_model,
        memory_fuser_intermediate_dim=4 * spec.d_model,
        memory_fuser_kernel_size=spec.fuser_kernel_size,
        memory_fuser_padding=spec.fuser_padding,
        memory_fuser_hidden_act="gelu",
    )


# --------------------------------------------------------------------------------------------------
# The inputs a family using this head declares, and opening them
# --------------------------------------------------------------------------------------------------
def sam2_inputs(*released_commands: str) -> tuple[InputOption, ...]:
    """The inputs of a family using this head: ``--sam2`` for training checkpoints; ``--sam2-config`` and
    ``--sam2-normalization`` also on the family's released-folder import command(s)."""
    both = (MMENGINE_TO_HF, *released_commands)
    return (
        InputOption("sam2", "path", "Meta's SAM2 checkpoint the run started from (e.g. sam2_hiera_large.pt)."),
        InputOption("sam2_config", "path", "Meta's SAM2 model config (its hydra sam2*_hiera_*.yaml, or the same as "
                    "JSON), for a non-official SAM2 (default: detected from the tensor shapes, or "
                    "<sam2>.config.json / .config.yaml beside the checkpoint).", commands=both),
        InputOption("sam2_normalization", "choice", "SAM2 input mean/std: 'sa2va' = ImageNet's rounded to "
                    "bfloat16, as Sa2VA's code computes them (masks equal Sa2VA's own predict_forward); 'exact' for "
                    "models trained with float32 preprocessing.", commands=both, choices=("sa2va", "exact"),
                    default="sa2va"),
    )


def sam2_architecture(sam2, options) -> tuple[str, "MetaSam2Spec", Any]:
    """(preset name, spec, transformers ``Sam2Config``) of a SAM2 held inside another folder (a released Sa2VA
    folder's ``grounding_encoder.sam2_model.*``, presented in Meta's names): from ``--sam2-config`` (Meta's YAML or
    JSON) when given, else recognised from the tensor shapes among the official presets."""
    if getattr(options, "sam2_config", None) is not None:
        preset, spec = "custom", spec_from_meta_config(read_sam2_config(Path(options.sam2_config)))
    else:
        preset, spec = detect_sam2_preset(sam2)
    return preset, spec, hf_sam2_video_config(spec)


SAM2_NORMALIZATIONS = ("sa2va", "exact")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def sam2_normalization(mode: str) -> dict[str, list[float]]:
    """The SAM2 input normalisation an export config carries (``sam2_pixel_mean``/``sam2_pixel_std``).

    ``"sa2va"`` (the default): ImageNet's mean/std *rounded to bfloat16*, which is what Sa2VA computes: its SAM2
    wrapper builds the constants with ``dtype=torch.bfloat16`` at inference (``preprocess_image`` of its released
    HF code) and in the image's bf16 dtype in training. Measured: with these values an export's masks equal those
    of Sa2VA's own ``predict_forward`` pixel for pixel; with the exact values 0.1-0.6 % of the pixels differ, at
    mask borders. ``"exact"``: the float values, for models trained with float32 preprocessing."""
    import torch

    if mode not in SAM2_NORMALIZATIONS:
        raise MissingInput(f"--sam2-normalization must be one of {', '.join(SAM2_NORMALIZATIONS)}, got {mode!r}")
    if mode == "exact":
        return {"sam2_pixel_mean": list(_IMAGENET_MEAN), "sam2_pixel_std": list(_IMAGENET_STD)}
    rounded = lambda v: [float(x) for x in torch.tensor(v, dtype=torch.bfloat16).float()]  # noqa: E731
    return {"sam2_pixel_mean": rounded(_IMAGENET_MEAN), "sam2_pixel_std": rounded(_IMAGENET_STD)}


def open_sam2_checkpoint(path: str | Path, *, allow_unsafe_pickle: bool = False):
    """Meta's SAM2 checkpoint (``{'model': {...}}`` as in ``sam2_hiera_large.pt``) or a safetensors file, as a
    source named ``sam2``."""
    from ..convert.sources import open_state_dict_file

    return open_state_dict_file(path, name="sam2", label="SAM2 checkpoint", example="sam2_hiera_large.pt",
                                allow_unsafe_pickle=allow_unsafe_pickle)


def open_sam2(options, notes: list[str]):
    """Meta's SAM2 checkpoint (``--sam2``) as a source, its preset name and transformers' ``Sam2Config``; the
    architecture comes from ``--sam2-config``, a ``.config.json`` beside the checkpoint, or the tensor shapes."""
    if options.sam2 is None:
        raise MissingInput("--sam2 is required: Meta's SAM2 checkpoint the run started from (e.g. sam2_hiera_large.pt)")
    sam2 = open_sam2_checkpoint(options.sam2, allow_unsafe_pickle=options.allow_unsafe_pickle)
    sam2_cfg_path = options.sam2_config
    if sam2_cfg_path is None:
        for suffix in (".config.json", ".config.yaml", ".config.yml"):
            sidecar = Path(options.sam2).with_suffix(suffix)
            if sidecar.is_file():
                sam2_cfg_path = sidecar
                notes.append(f"SAM2 architecture read from {sidecar.name} beside the checkpoint")
                break
    if sam2_cfg_path is not None:
        try:
            preset, spec = "custom", spec_from_meta_config(read_sam2_config(Path(sam2_cfg_path)))
        except (ValueError, TypeError, KeyError) as exc:  # e.g. a training yaml's ${...} interpolations
            raise UnreadableFile(f"SAM2 model config {sam2_cfg_path}: not a usable SAM2 model config "
                                 f"({type(exc).__name__}: {' '.join(str(exc).split())})") from None
    else:
        preset, spec = detect_sam2_preset(sam2)
    return sam2, preset, hf_sam2_video_config(spec)
