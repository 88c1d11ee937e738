"""The SAM (v1) image head, converter side: Meta's segment-anything checkpoint (``sam_vit_{b,l,h}_*.pth``) ->
transformers' native ``SamModel``, the ``--sam`` input a family using this head declares, and opening it.

Families: LISA (and its forks: GLaMM, PixelLM, ...) fine-tune SAM ViT-H's mask decoder; F-LMM fine-tunes SAM
ViT-L's prompt encoder and mask decoder and saves neither the image encoder nor anything else of SAM.

The table :data:`SAM_RULES` reads the source named ``sam`` (Meta's key names: a plain state dict, or one under
``'model'``) and writes ``SamModel`` keys without a prefix; a family embeds it with :func:`sam_rules`
(``target_prefix="sam."`` by default), which can also take the mask decoder (LISA) or the mask decoder and
prompt encoder (F-LMM) from a training checkpoint (``mask_decoder_from="ckpt:base_model.model.model.visual_model."``).

Layout differences, Meta (``segment_anything.modeling``) -> transformers (``SamModel``):

- ``image_encoder.*`` -> ``vision_encoder.*``; ``patch_embed.proj`` -> ``patch_embed.projection``; ``pos_embed``
  (``(1, H/p, W/p, C)``, absolute) keeps its layout.
- ``image_encoder.blocks.{i}`` -> ``vision_encoder.layers.{i}``; ``norm1``/``norm2`` -> ``layer_norm1``/``layer_norm2``;
  ``attn.qkv`` (one fused ``(3C, C)`` projection, q/k/v stacked in that order, the same in both), ``attn.proj``,
  the decomposed relative positions ``attn.rel_pos_h``/``rel_pos_w`` (``(2*window-1, head_dim)`` on windowed blocks,
  ``(2*H/p-1, head_dim)`` on the global ones) and ``mlp.lin1``/``lin2`` keep their names and layouts.
- ``image_encoder.neck.{0,1,2,3}`` (a Sequential: 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d; no conv bias)
  -> ``vision_encoder.neck.{conv1,layer_norm1,conv2,layer_norm2}``.
- ``prompt_encoder.pe_layer.positional_encoding_gaussian_matrix``: one random-Fourier buffer in Meta's code;
  ``SamModel`` holds it twice (``shared_image_embedding.positional_embedding`` for the dense image PE,
  ``prompt_encoder.shared_embedding.positional_embedding`` for point coordinates): one tensor duplicated into both.
- ``prompt_encoder.point_embeddings.{0..3}`` (neg, pos, box corner 1, box corner 2) -> ``prompt_encoder.point_embed.{0..3}``:
  both keep four ``(1, C)`` embeddings (unlike ``Sam2Model``, which concatenates them), a rename.
- ``prompt_encoder.mask_downscaling.{0,1,3,4,6}`` (Sequential: conv, LayerNorm2d, GELU, conv, LayerNorm2d, GELU,
  1x1 conv) -> ``prompt_encoder.mask_embed.{conv1,layer_norm1,conv2,layer_norm2,conv3}``.
- ``mask_decoder.transformer.layers.{i}.norm{1..4}`` -> ``layer_norm{1..4}``; ``norm_final_attn`` ->
  ``layer_norm_final_attn``; attention ``q/k/v/out_proj`` and the ``mlp.lin1/lin2`` keep their names.
- ``mask_decoder.output_upscaling.{0,1,3}`` (Sequential: ConvT, LayerNorm2d, GELU, ConvT, GELU) ->
  ``mask_decoder.{upscale_conv1,upscale_layer_norm,upscale_conv2}``.
- Meta's ``MLP.layers.{0..n-1}`` (``output_hypernetworks_mlps.{k}``, ``iou_prediction_head``) -> transformers'
  ``SamFeedForward`` ``proj_in`` / ``layers.{i-1}`` / ``proj_out``.
- ``iou_token``, ``mask_tokens``, ``no_mask_embed``, ``not_a_point_embed`` keep their names.

Numerics: the two-way transformer's ``norm1..4`` use torch's LayerNorm default eps (1e-5) in Meta's code, while
``SamMaskDecoderConfig`` defaults to 1e-6; :func:`hf_sam_config` sets 1e-5 (the default would move mask logits by
~1e-4). Every other norm is 1e-6 in both.

Nothing is dropped: every tensor of Meta's SAM is part of ``SamModel`` (Meta's ``pixel_mean``/``pixel_std`` are
non-persistent buffers, not in the checkpoint; the export config carries them as ``sam_pixel_mean``/``std``).

The module also describes Meta's hyper-parameters (:class:`MetaSamSpec`), the three official presets
(:data:`SAM_PRESETS`), recognises a checkpoint's preset from its tensor shapes (:func:`detect_sam_preset`) and
builds the matching ``transformers.SamConfig`` (:func:`hf_sam_config`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..convert.rules import Duplicate, Rename, Rule, Take, parse_ref, prefixed
from ..errors import MissingInput, UnreadableFile, UnsupportedCheckpoint, WrongFamily
from ..convert.options import MMENGINE_TO_HF, InputOption

__all__ = [
    "SAM_RULES",
    "SAM_MASK_DECODER_PATTERN",
    "SAM_PROMPT_ENCODER_PATTERN",
    "sam_rules",
    "MetaSamSpec",
    "SAM_PRESETS",
    "detect_sam_preset",
    "sam_spec_of",
    "hf_sam_config",
    "sam_inputs",
    "open_sam_checkpoint",
    "open_sam",
    "sam_spec_from_shapes",
]


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------

S = "sam:"  # Meta's checkpoint
SAM_MASK_DECODER_PATTERN = "mask_decoder."
SAM_PROMPT_ENCODER_PATTERN = "prompt_encoder."
_PE_MATRIX = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"


def _mlp(meta: str, hf: str, num_layers: int) -> list[Rule]:
    """Meta's ``MLP.layers.{0..n-1}`` -> transformers' ``SamFeedForward`` (``proj_in``, ``layers.*``, ``proj_out``)."""
    out: list[Rule] = [Rename(f"{hf}.proj_in.{{p}}", f"{S}{meta}.layers.0.{{p}}")]
    for i in range(1, num_layers - 1):
        out.append(Rename(f"{hf}.layers.{i - 1}.{{p}}", f"{S}{meta}.layers.{i}.{{p}}"))
    out.append(Rename(f"{hf}.proj_out.{{p}}", f"{S}{meta}.layers.{num_layers - 1}.{{p}}"))
    return out


SAM_RULES: list[Rule] = [
    # ---- image encoder: ViT --------------------------------------------------------------------------
    Rename("vision_encoder.patch_embed.projection.{p}", S + "image_encoder.patch_embed.proj.{p}"),
    Rename("vision_encoder.pos_embed", S + "image_encoder.pos_embed"),                          # (1, H/p, W/p, C)
    Rename("vision_encoder.layers.{i}.layer_norm1.{p}", S + "image_encoder.blocks.{i}.norm1.{p}"),
    Rename("vision_encoder.layers.{i}.attn.qkv.{p}", S + "image_encoder.blocks.{i}.attn.qkv.{p}"),  # (3C, C)
    Rename("vision_encoder.layers.{i}.attn.proj.{p}", S + "image_encoder.blocks.{i}.attn.proj.{p}"),
    Rename("vision_encoder.layers.{i}.attn.rel_pos_{hw}", S + "image_encoder.blocks.{i}.attn.rel_pos_{hw}"),
    Rename("vision_encoder.layers.{i}.layer_norm2.{p}", S + "image_encoder.blocks.{i}.norm2.{p}"),
    Rename("vision_encoder.layers.{i}.mlp.lin{n}.{p}", S + "image_encoder.blocks.{i}.mlp.lin{n}.{p}"),
    # ---- image encoder: neck (Sequential: 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d) --------------------
    Rename("vision_encoder.neck.conv1.{p}", S + "image_encoder.neck.0.{p}"),
    Rename("vision_encoder.neck.layer_norm1.{p}", S + "image_encoder.neck.1.{p}"),
    Rename("vision_encoder.neck.conv2.{p}", S + "image_encoder.neck.2.{p}"),
    Rename("vision_encoder.neck.layer_norm2.{p}", S + "image_encoder.neck.3.{p}"),
    # ---- prompt encoder --------------------------------------------------------------------------------
    # one random-Fourier matrix in Meta's code; transformers keeps it twice (dense image PE + point PE)
    Duplicate(("shared_image_embedding.positional_embedding", "prompt_encoder.shared_embedding.positional_embedding"),
              S + "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
    # four (1,C) embeddings (neg, pos, box corner 1, box corner 2), four in both
    Rename("prompt_encoder.point_embed.{k}.weight", S + "prompt_encoder.point_embeddings.{k}.weight"),
    Rename("prompt_encoder.not_a_point_embed.weight", S + "prompt_encoder.not_a_point_embed.weight"),
    Rename("prompt_encoder.no_mask_embed.weight", S + "prompt_encoder.no_mask_embed.weight"),
    # mask_downscaling Sequential: conv, LayerNorm2d, GELU, conv, LayerNorm2d, GELU, 1x1 conv
    Rename("prompt_encoder.mask_embed.conv1.{p}", S + "prompt_encoder.mask_downscaling.0.{p}"),
    Rename("prompt_encoder.mask_embed.layer_norm1.{p}", S + "prompt_encoder.mask_downscaling.1.{p}"),
    Rename("prompt_encoder.mask_embed.conv2.{p}", S + "prompt_encoder.mask_downscaling.3.{p}"),
    Rename("prompt_encoder.mask_embed.layer_norm2.{p}", S + "prompt_encoder.mask_downscaling.4.{p}"),
    Rename("prompt_encoder.mask_embed.conv3.{p}", S + "prompt_encoder.mask_downscaling.6.{p}"),
    # ---- mask decoder: output tokens ------------------------------------------------------------------
    Rename("mask_decoder.iou_token.weight", S + "mask_decoder.iou_token.weight"),
    Rename("mask_decoder.mask_tokens.weight", S + "mask_decoder.mask_tokens.weight"),
    # ---- mask decoder: two-way transformer (attention q/k/v/out_proj and mlp.lin1/lin2 keep their names) ---
    *(Rename(f"mask_decoder.transformer.layers.{{i}}.{attn}.{{proj}}.{{p}}",
             f"{S}mask_decoder.transformer.layers.{{i}}.{attn}.{{proj}}.{{p}}")
      for attn in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")),
    Rename("mask_decoder.transformer.layers.{i}.mlp.lin{n}.{p}", S + "mask_decoder.transformer.layers.{i}.mlp.lin{n}.{p}"),
    Rename("mask_decoder.transformer.layers.{i}.layer_norm{n}.{p}", S + "mask_decoder.transformer.layers.{i}.norm{n}.{p}"),
    Rename("mask_decoder.transformer.final_attn_token_to_image.{proj}.{p}",
           S + "mask_decoder.transformer.final_attn_token_to_image.{proj}.{p}"),
    Rename("mask_decoder.transformer.layer_norm_final_attn.{p}", S + "mask_decoder.transformer.norm_final_attn.{p}"),
    # ---- mask decoder: upscaling (Sequential: ConvT, LayerNorm2d, GELU, ConvT, GELU) ------------------------
    Rename("mask_decoder.upscale_conv1.{p}", S + "mask_decoder.output_upscaling.0.{p}"),
    Rename("mask_decoder.upscale_layer_norm.{p}", S + "mask_decoder.output_upscaling.1.{p}"),
    Rename("mask_decoder.upscale_conv2.{p}", S + "mask_decoder.output_upscaling.3.{p}"),
    # ---- mask decoder: heads (3-layer MLPs) -----------------------------------------------------------
    *_mlp("mask_decoder.output_hypernetworks_mlps.{k}", "mask_decoder.output_hypernetworks_mlps.{k}", 3),
    *_mlp("mask_decoder.iou_prediction_head", "mask_decoder.iou_prediction_head", 3),
]


def _source_key(r: Rule) -> str | None:
    src = getattr(r, "source", None)
    return parse_ref(src)[1] if isinstance(src, str) else None


def _split_from(arg: str, what: str) -> tuple[str, str]:
    if ":" not in arg:
        raise ValueError(f"{what} {arg!r} must be 'source:key_prefix', e.g. 'ckpt:base_model.model.model.visual_model.'")
    src, key_prefix = arg.split(":", 1)
    if not src:
        raise ValueError(f"{what} {arg!r} names no source before ':'")
    if key_prefix and not key_prefix.endswith("."):
        raise ValueError(f"{what} key prefix {key_prefix!r} must be empty or end with '.'")
    return src, key_prefix


def _redirect(rule: Rule, src: str, key_prefix: str, why: str) -> Rule:
    """One Meta-sourced rename redirected to ``src:key_prefix<meta key>``: the new tensor supersedes Meta's."""
    if not isinstance(rule, Rename):  # every redirected rule is a plain rename today
        raise TypeError(f"cannot redirect {rule.describe()} to '{src}:{key_prefix}'")
    key = parse_ref(rule.source)[1]
    return Take(rule.target, f"{src}:{key_prefix}{key}", replaces=(rule.source,), why=why)


def sam_rules(*, target_prefix: str = "sam.", source: str = "sam", mask_decoder_from: str | None = None,
              prompt_encoder_from: str | None = None) -> list[Rule]:
    """The SAM table with targets under ``target_prefix``, reading Meta's tensors from the source ``source``.

    Args:
        target_prefix: put before every target key (``"sam."`` for a model whose ``self.sam`` is the ``SamModel``;
            ``""`` for a bare ``SamModel``).
        source: the name of the source holding Meta's keys (``"sam"``: the ``--sam`` checkpoint; a family whose
            released folder carries SAM under some prefix presents it under this name, e.g. with a
            ``RenamedSource``).
        mask_decoder_from: ``"source:key_prefix"``, e.g. ``"ckpt:base_model.model.model.visual_model."`` (LISA):
            read every ``mask_decoder.*`` tensor from that source under that prefix. Each one supersedes
            (:class:`~maskport.convert.rules.Take`) Meta's tensor of the same name, so both are accounted for; a
            decoder tensor missing there is a plan error, not a silent fallback.
        prompt_encoder_from: the same for the parameters of ``prompt_encoder.*`` (F-LMM trains them). The
            random-Fourier matrix ``prompt_encoder.pe_layer.positional_encoding_gaussian_matrix`` stays Meta's: it
            is a buffer, which no training changes and trainable-only checkpoints (F-LMM's) do not hold; a family
            whose checkpoint holds a copy drops that copy with a reason.
    """
    redirects = []
    for arg, pattern, what in ((mask_decoder_from, SAM_MASK_DECODER_PATTERN, "mask_decoder_from"),
                               (prompt_encoder_from, SAM_PROMPT_ENCODER_PATTERN, "prompt_encoder_from")):
        if arg is not None:
            src, key_prefix = _split_from(arg, what)
            if src == source and not key_prefix:
                raise ValueError(f"{what} {arg!r} is Meta's own checkpoint; leave it None to keep Meta's {pattern[:-1]}")
            why = f"superseded by the fine-tuned {pattern[:-1]} in '{src}' (keys under '{key_prefix}{pattern}')"
            redirects.append((pattern, src, key_prefix, why))
    out: list[Rule] = []
    for r in SAM_RULES:
        key = _source_key(r)
        match = next((x for x in redirects if key is not None and key.startswith(x[0]) and key != _PE_MATRIX), None)
        out.append(_redirect(r, *match[1:]) if match else r)
    if source != "sam":
        out = [_resource(r, source) for r in out]
    return prefixed(target_prefix, out) if target_prefix else out


def _resource(r: Rule, source: str) -> Rule:
    """Meta's tensors (``sam:``) read from ``source`` instead (redirected ones keep their source)."""
    changes: dict[str, Any] = {}
    v = getattr(r, "source", None)
    if isinstance(v, str) and v.startswith(S):
        changes["source"] = source + ":" + v[len(S):]
    if hasattr(r, "replaces"):
        changes["replaces"] = tuple(source + ":" + x[len(S):] if x.startswith(S) else x for x in r.replaces)
    return dataclasses.replace(r, **changes) if changes else r


# --------------------------------------------------------------------------------------------------
# Meta's hyper-parameters
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetaSamSpec:
    """The hyper-parameters of Meta's ``Sam`` that decide its weights' shapes and its math.

    Defaults are those of Meta's ``_build_sam`` (``segment_anything/build_sam.py``), shared by all three presets;
    the image encoder's size is per preset.
    """

    # image encoder (ImageEncoderViT)
    embed_dim: int = 1280
    depth: int = 32
    num_heads: int = 16
    global_attn_indexes: tuple[int, ...] = (7, 15, 23, 31)
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    mlp_ratio: float = 4.0
    use_abs_pos: bool = True
    use_rel_pos: bool = True
    qkv_bias: bool = True
    # prompt encoder / mask decoder (PromptEncoder, MaskDecoder, TwoWayTransformer)
    prompt_embed_dim: int = 256   # also the image encoder's out_chans
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256

    @property
    def grid(self) -> int:
        """Side of the image embedding (``image_size // patch_size``, 64 for the official models)."""
        return self.image_size // self.patch_size


SAM_PRESETS: dict[str, MetaSamSpec] = {  # segment_anything/build_sam.py: build_sam_vit_{b,l,h}
    "vit_b": MetaSamSpec(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": MetaSamSpec(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": MetaSamSpec(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}


# --------------------------------------------------------------------------------------------------
# Preset detection from shapes
# --------------------------------------------------------------------------------------------------

_BLOCK = re.compile(r"^image_encoder\.blocks\.(\d+)\.")


def _shapes_of(source) -> dict[str, tuple[int, ...]]:
    if hasattr(source, "keys") and hasattr(source, "info"):
        return {k: tuple(source.info(k).shape) for k in source.keys()}
    if isinstance(source, Mapping):
        return {k: tuple(v.shape) for k, v in source.items() if hasattr(v, "shape")}
    raise TypeError(f"expected a TensorSource or a state dict, got {type(source).__name__}")


def _signature(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """What the tensor shapes say about the image encoder (everything of it, with relative positions on)."""
    blocks = sorted({int(m.group(1)) for k in shapes if (m := _BLOCK.match(k))})
    if blocks != list(range(len(blocks))):
        raise WrongFamily(f"SAM checkpoint with non-contiguous image-encoder blocks {blocks[:5]}...; damaged file?")
    patch = shapes["image_encoder.patch_embed.proj.weight"]
    embed_dim, patch_size = patch[0], patch[2]
    grid = shapes["image_encoder.pos_embed"][1] if "image_encoder.pos_embed" in shapes else None
    sig: dict[str, Any] = dict(embed_dim=embed_dim, depth=len(blocks), patch_size=patch_size,
                               image_size=grid * patch_size if grid else None,
                               prompt_embed_dim=shapes["prompt_encoder.no_mask_embed.weight"][1],
                               use_rel_pos="image_encoder.blocks.0.attn.rel_pos_h" in shapes)
    mlp = shapes.get("image_encoder.blocks.0.mlp.lin1.weight")
    sig["mlp_ratio"] = mlp[0] / embed_dim if mlp else None
    if sig["use_rel_pos"] and grid:
        lengths = [shapes[f"image_encoder.blocks.{i}.attn.rel_pos_h"][0] for i in blocks]
        sig["num_heads"] = embed_dim // shapes["image_encoder.blocks.0.attn.rel_pos_h"][1]
        sig["global_attn_indexes"] = tuple(i for i, n in enumerate(lengths) if n == 2 * grid - 1)
        windowed = {n for n in lengths if n != 2 * grid - 1}
        sig["window_size"] = (next(iter(windowed)) + 1) // 2 if len(windowed) == 1 else tuple(sorted(windowed))
    mask_tokens = shapes.get("mask_decoder.mask_tokens.weight")
    sig["num_multimask_outputs"] = mask_tokens[0] - 1 if mask_tokens else None
    return sig


def _spec_signature(spec: MetaSamSpec) -> dict[str, Any]:
    return dict(embed_dim=spec.embed_dim, depth=spec.depth, patch_size=spec.patch_size, image_size=spec.image_size,
                prompt_embed_dim=spec.prompt_embed_dim, use_rel_pos=spec.use_rel_pos, mlp_ratio=spec.mlp_ratio,
                num_heads=spec.num_heads, global_attn_indexes=tuple(spec.global_attn_indexes),
                window_size=spec.window_size, num_multimask_outputs=spec.num_multimask_outputs)


_CORE = ("image_encoder.patch_embed.proj.weight", "image_encoder.pos_embed", "image_encoder.blocks.0.attn.qkv.weight",
         "image_encoder.neck.0.weight", "prompt_encoder.no_mask_embed.weight", "mask_decoder.iou_token.weight")


def detect_sam_preset(source) -> tuple[str, MetaSamSpec]:
    """Which official SAM (``vit_b``, ``vit_l``, ``vit_h``) a Meta checkpoint is, from its tensor names and shapes.

    The image encoder leaves everything in the shapes: width (patch embedding), depth (blocks), heads (the
    relative-position tables are ``head_dim`` wide), which blocks attend globally (their tables span the whole
    ``2*64-1`` grid, the windowed ones ``2*14-1``). The mask decoder's number of heads leaves no trace; it is
    Meta's fixed 8.

    Raises:
        UnreadableFile: the source holds no tensors.
        WrongFamily: not Meta's SAM layout, or a SAM that no official preset fits.
    """
    shapes = _shapes_of(source)
    where = getattr(source, "path", None) or "the SAM checkpoint"
    if not shapes:
        raise UnreadableFile(f"{where}: holds no tensors; expected Meta's SAM checkpoint (e.g. sam_vit_h_4b8939.pth)")
    missing = [k for k in _CORE if k not in shapes]
    if missing:
        keys = list(shapes)
        hint = ""
        if any(k.startswith("vision_encoder.layers.") for k in keys):
            hint = " It looks like a transformers SamModel already (vision_encoder.layers.*): nothing to convert."
        elif any(k.startswith("image_encoder.trunk.") for k in keys):
            hint = " It looks like SAM2 (Hiera image encoder), not SAM."
        else:
            nested = sorted({k[: k.index("image_encoder.blocks.")] for k in keys if "image_encoder.blocks." in k})
            if nested:
                hint = (f" Its SAM tensors sit under the prefix {nested[0]!r} (a training or released LISA-style "
                        "checkpoint?); pass Meta's released sam_vit_*.pth instead.")
            elif any(".mask_decoder." in k or k.startswith("mask_decoder.") for k in keys):
                hint = " It holds a mask decoder but no image encoder (an F-LMM-style checkpoint?)."
        raise WrongFamily(f"{where}: not Meta's SAM checkpoint layout (missing {missing[0]}; first keys: "
                          f"{keys[:3]}).{hint}")
    sig = _signature(shapes)
    for name, spec in SAM_PRESETS.items():
        if _spec_signature(spec) == sig:
            return name, spec
    described = ", ".join(f"{k}={v}" for k, v in sig.items())
    raise WrongFamily(f"{where}: a SAM checkpoint that matches none of the official presets "
                      f"({', '.join(SAM_PRESETS)}); found {described}")


def sam_spec_of(source) -> tuple[str, MetaSamSpec]:
    """The architecture of a SAM in Meta's layout: an official preset (:func:`detect_sam_preset`), or else the
    :class:`MetaSamSpec` its tensor shapes describe (:func:`sam_spec_from_shapes`), named ``"custom"`` (e.g. a small
    SAM built for tests, or a distilled one).

    Raises :class:`~maskport.errors.WrongFamily` when the source is not Meta's SAM layout at all."""
    try:
        return detect_sam_preset(source)
    except WrongFamily as exc:
        if "matches none of the official presets" not in str(exc):
            raise
    return "custom", sam_spec_from_shapes(source)


# --------------------------------------------------------------------------------------------------
# spec -> transformers.SamConfig
# --------------------------------------------------------------------------------------------------


def hf_sam_config(preset_or_spec: str | MetaSamSpec):
    """The ``transformers.SamConfig`` whose ``SamModel`` computes what Meta's ``Sam`` computes for a preset name
    (``"vit_b"``, ``"vit_l"``, ``"vit_h"``) or a :class:`MetaSamSpec`.

    Raises :class:`~maskport.errors.UnsupportedCheckpoint` for settings ``SamModel`` cannot express.
    """
    from transformers import SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

    if isinstance(preset_or_spec, str):
        if preset_or_spec not in SAM_PRESETS:
            raise UnsupportedCheckpoint(f"unknown SAM preset {preset_or_spec!r}; expected one of {', '.join(SAM_PRESETS)}")
        spec = SAM_PRESETS[preset_or_spec]
    elif isinstance(preset_or_spec, MetaSamSpec):
        spec = preset_or_spec
    else:
        raise TypeError(f"expected a preset name or a MetaSamSpec, got {type(preset_or_spec).__name__}")
    problems = []
    if spec.image_size % spec.patch_size:
        problems.append(f"image_size {spec.image_size} is not a multiple of patch_size {spec.patch_size}")
    if spec.prompt_embed_dim % 2:
        problems.append(f"prompt_embed_dim {spec.prompt_embed_dim} is odd (the random-Fourier PE has dim/2 rows)")
    if spec.embed_dim % spec.num_heads:
        problems.append(f"embed_dim {spec.embed_dim} is not a multiple of num_heads {spec.num_heads}")
    if any(not 0 <= i < spec.depth for i in spec.global_attn_indexes):
        problems.append(f"global_attn_indexes {spec.global_attn_indexes} outside 0..{spec.depth - 1}")
    if problems:
        raise UnsupportedCheckpoint("this SAM cannot be expressed as transformers' SamModel: " + "; ".join(problems))
    vision = SamVisionConfig(
        hidden_size=spec.embed_dim,
        output_channels=spec.prompt_embed_dim,
        num_hidden_layers=spec.depth,
        num_attention_heads=spec.num_heads,
        num_channels=3,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        hidden_act="gelu",            # Meta's ImageEncoderViT: act_layer=nn.GELU
        layer_norm_eps=1e-6,          # _build_sam: norm_layer=partial(LayerNorm, eps=1e-6); LayerNorm2d eps 1e-6
        qkv_bias=spec.qkv_bias,
        mlp_ratio=float(spec.mlp_ratio),
        use_abs_pos=spec.use_abs_pos,
        use_rel_pos=spec.use_rel_pos,
        window_size=spec.window_size,
        global_attn_indexes=list(spec.global_attn_indexes),
        num_pos_feats=spec.prompt_embed_dim // 2,  # PositionEmbeddingRandom(embed_dim // 2)
    )
    prompt = SamPromptEncoderConfig(
        hidden_size=spec.prompt_embed_dim,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        mask_input_channels=spec.mask_in_chans,
        num_point_embeddings=4,       # pos, neg, box corner 1, box corner 2
        hidden_act="gelu",            # PromptEncoder(activation=nn.GELU)
        layer_norm_eps=1e-6,
    )
    decoder = SamMaskDecoderConfig(
        hidden_size=spec.prompt_embed_dim,
        hidden_act="relu",            # TwoWayTransformer(activation=nn.ReLU) in its MLP blocks
        mlp_dim=spec.decoder_mlp_dim,
        num_hidden_layers=spec.decoder_depth,
        num_attention_heads=spec.decoder_num_heads,
        attention_downsample_rate=spec.attention_downsample_rate,
        num_multimask_outputs=spec.num_multimask_outputs,
        iou_head_depth=spec.iou_head_depth,
        iou_head_hidden_dim=spec.iou_head_hidden_dim,
        # TwoWayAttentionBlock's norm1..4 are torch's nn.LayerNorm with its default eps 1e-5 in Meta's code; this
        # sets SamTwoWayAttentionBlock.layer_norm1..4 (transformers' default 1e-6 would move logits by ~1e-4)
        layer_norm_eps=1e-5,
    )
    return SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)


# --------------------------------------------------------------------------------------------------
# The input a family using this head declares, and opening it
# --------------------------------------------------------------------------------------------------


def sam_inputs(*released_commands: str) -> tuple[InputOption, ...]:
    """The input of a family using this head: ``--sam`` (Meta's checkpoint) on the training-checkpoint command and
    on the family's released-folder import command(s) given here (those whose folders lack SAM's image encoder)."""
    return (
        InputOption("sam", "path", "Meta's SAM checkpoint the run started from (e.g. sam_vit_h_4b8939.pth for LISA, "
                    "sam_vit_l_0b3195.pth for F-LMM).", commands=(MMENGINE_TO_HF, *released_commands)),
    )


def open_sam_checkpoint(path: str | Path, *, name: str = "sam", allow_unsafe_pickle: bool = False):
    """Meta's SAM checkpoint as a source: a ``.pth`` holding a plain state dict (as released) or a
    ``{'model': state_dict}`` dict, read with the engine's safe loader (no arbitrary pickles), or a safetensors
    file. Tensor data is read on demand."""
    from ..convert.sources import open_state_dict_file

    return open_state_dict_file(path, name=name, label="SAM checkpoint", example="sam_vit_h_4b8939.pth",
                                allow_unsafe_pickle=allow_unsafe_pickle)


def open_sam(options, notes: list[str]):
    """Meta's SAM checkpoint (``--sam``) as a source named ``sam``, its preset name and transformers' ``SamConfig``
    (the architecture is recognised from the tensor shapes)."""
    if options.sam is None:
        raise MissingInput("--sam is required: Meta's SAM checkpoint the run started from (e.g. sam_vit_h_4b8939.pth)")
    sam = open_sam_checkpoint(options.sam, allow_unsafe_pickle=options.allow_unsafe_pickle)
    preset, spec = detect_sam_preset(sam)
    notes.append(f"SAM {preset} recognised from the tensor shapes of {Path(options.sam).name}")
    return sam, preset, hf_sam_config(spec)


def sam_spec_from_shapes(source) -> MetaSamSpec:
    """A :class:`MetaSamSpec` read from a Meta-layout SAM checkpoint's tensor shapes, for a SAM that is none of the
    official presets (e.g. a test's tiny SAM). Everything but the mask decoder's number of attention heads leaves a
    trace in the shapes; that one is Meta's fixed 8.

    Raises :class:`~maskport.errors.WrongFamily` when the shapes are not a SAM's (or describe something
    ``MetaSamSpec`` cannot, e.g. mixed window sizes)."""
    shapes = _shapes_of(source)
    missing = [k for k in _CORE if k not in shapes]
    if missing:
        raise WrongFamily(f"not Meta's SAM checkpoint layout (missing {missing[0]})")
    sig = _signature(shapes)
    if not sig["use_rel_pos"] or not isinstance(sig.get("window_size"), int) or sig["image_size"] is None:
        raise WrongFamily(f"a SAM checkpoint this converter cannot describe: {sig}")
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"^mask_decoder\.transformer\.layers\.(\d+)\.", k))}
    return MetaSamSpec(
        embed_dim=sig["embed_dim"], depth=sig["depth"], num_heads=sig["num_heads"],
        global_attn_indexes=tuple(sig["global_attn_indexes"]), image_size=sig["image_size"],
        patch_size=sig["patch_size"], window_size=sig["window_size"], mlp_ratio=sig["mlp_ratio"],
        prompt_embed_dim=sig["prompt_embed_dim"],
        mask_in_chans=_dim0(shapes, "prompt_encoder.mask_downscaling.3.weight", MetaSamSpec.mask_in_chans),
        decoder_depth=len(layers) or MetaSamSpec.decoder_depth,
        decoder_mlp_dim=_dim0(shapes, "mask_decoder.transformer.layers.0.mlp.lin1.weight", MetaSamSpec.decoder_mlp_dim),
        num_multimask_outputs=sig["num_multimask_outputs"] or MetaSamSpec.num_multimask_outputs,
        iou_head_hidden_dim=_dim0(shapes, "mask_decoder.iou_prediction_head.layers.0.weight",
                                  MetaSamSpec.iou_head_hidden_dim),
    )


def _dim0(shapes, key: str, default: int) -> int:
    """A tensor's first dimension, or the default of Meta's builder when the view does not hold it (a SAM whose
    decoder comes from another source)."""
    return shapes[key][0] if key in shapes else default
