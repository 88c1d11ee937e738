"""The mapping table of family ``flmm``, top to bottom: F-LMM training checkpoint (trainable parts only) + frozen
base LMM folder + Meta's SAM -> ``FLMMModel`` (``mllm.*`` = the base LMM's native transformers class, ``sam.*`` =
``SamModel``, ``mask_head.*``, ``text_layer_weights``, ``text_proj.*``). Every key spelled out:
``docs/families/flmm.mapping.tsv``.

Sources: ``ckpt`` (the training checkpoint: ``mask_head.*`` in mmseg's UNet names, ``text_layer_weights``,
``text_proj.*``, ``sam.model.prompt_encoder.*``, ``sam.model.mask_decoder.*``), ``base`` (the frozen LMM folder,
keys in transformers' native layout), ``sam`` (Meta's ``sam_vit_l_0b3195.pth``: the image encoder, and the
prompt encoder's random-Fourier matrix, a buffer).

mmseg's UNet names -> ours (``remote/modeling_flmm.py``'s ``FLMMMaskHead``):

- ``encoder.0.0.convs.{j}`` (stage 0: no pooling) and ``encoder.{i}.1.convs.{j}`` (stages i >= 1: index 0 is the
  parameter-free max-pool) -> ``encoder.{i}.convs.{j}``;
- mmcv ``ConvModule`` ``conv`` / ``gn`` -> ``conv`` / ``norm``;
- ``decoder.{k}.upsample.interp_upsample.1`` (``InterpConv``: index 0 is the parameter-free upsampling) ->
  ``decoder.{k}.upsample``; ``decoder.{k}.conv_block.convs.{j}`` -> ``decoder.{k}.block.convs.{j}``;
- ``conv_seg`` keeps its name.
"""

from __future__ import annotations

from ...convert.rules import CopyRest, DropIfEqual, Duplicate, Rename
from ...heads import sam as sammap

C = "ckpt:"
FROZEN_COPY = ("a frozen SAM tensor the checkpoint's module state kept (a buffer, or the frozen image encoder); "
               "the export takes Meta's")


def _conv(target: str, source: str) -> list:
    return [Rename(f"{target}.conv.weight", f"{C}{source}.conv.weight"),
            Rename(f"{target}.norm.{{p}}", f"{C}{source}.gn.{{p}}")]


def rules(*, base_ties_lm_head: bool = False) -> list:
    """The mapping table, top to bottom. Targets are keys of ``FLMMModel``.

    ``base_ties_lm_head``: the base ties ``lm_head`` to the input embeddings and saves no ``lm_head.weight``
    (Qwen2.5-VL-3B): the export holds the embedding matrix under both names (untied, the same values)."""
    tied = [Duplicate(("mllm.model.language_model.embed_tokens.weight", "mllm.lm_head.weight"),
                      "base:model.language_model.embed_tokens.weight")] if base_ties_lm_head else []
    return [
        # 1. the U-Net on the attention maps (mmseg UNet + F-LMM's conv_seg)
        *_conv("mask_head.encoder.0.convs.{j}", "mask_head.encoder.0.0.convs.{j}"),
        *_conv("mask_head.encoder.{i}.convs.{j}", "mask_head.encoder.{i}.1.convs.{j}"),
        *_conv("mask_head.decoder.{k}.upsample", "mask_head.decoder.{k}.upsample.interp_upsample.1"),
        *_conv("mask_head.decoder.{k}.block.convs.{j}", "mask_head.decoder.{k}.conv_block.convs.{j}"),
        Rename("mask_head.conv_seg.{p}", C + "mask_head.conv_seg.{p}"),
        # 2. the per-layer weights of the hidden states and their projection into SAM's prompt space
        Rename("text_layer_weights", C + "text_layer_weights"),
        Rename("text_proj.{p}", C + "text_proj.{p}"),
        # 3. SAM: Meta's image encoder; F-LMM's trained prompt encoder and mask decoder
        *sammap.sam_rules(target_prefix="sam.", prompt_encoder_from=C + "sam.model.",
                          mask_decoder_from=C + "sam.model."),
        DropIfEqual(C + "sam.model.{rest}", equals="sam:{rest}", reason=FROZEN_COPY, optional=True),
        # 4. the frozen LMM, unchanged
        *tied,
        CopyRest(target="mllm.{rest}", source="base:{rest}"),
    ]
