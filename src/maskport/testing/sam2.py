"""Tiny Meta SAM2 for the fixtures: a hydra-style model config (:func:`tiny_meta_sam2_config`), Meta's ``SAM2Base``
built from it (:func:`build_meta_sam2`, no download) and a seeded, perturbed instance (:func:`make_meta_sam2`).
``sam2``/``hydra`` are imported inside the functions. Reference forwards of Sa2VA's language-prompted mask head
(Meta's path and transformers' ``Sam2Model`` path) are in :mod:`maskport.testing.references.sam2`."""

from __future__ import annotations

import copy

import torch

from .common import perturb_

def tiny_meta_sam2_config(image_size: int = 256) -> dict:
    """Hydra-style (``_target_``) Meta SAM2 model config, modelled on ``sam2/configs/sam2/sam2_hiera_t.yaml``.

    Shrunk: Hiera embed_dim 16 / 1 head / stages [1, 2, 2, 1] (channels 16-32-64-128), global attention in
    block 4, window_spec [8, 4, 8, 4]; FPN ``d_model`` 32 (so the SAM prompt/mask-decoder dim and the
    output dim of ``text_hidden_fcs`` is 32, not 256); memory attention 1 layer, d_model 32, ffn 64;
    memory encoder out_dim 16; num_maskmem 7.  All SAM2.0 flags of ``sam2_hiera_t`` are kept (high-res
    features in SAM, multimask, obj scores + MLP, obj ptrs, ...).

    ``image_size`` defaults to 256 instead of SAM2's native 1024: Meta's code derives every size from
    it (prompt encoder embedding size = image_size // 16, mask input size = 4x that, RoPE ``feat_sizes``
    of the memory attention are set to image_size // 16 here), and a 256 input keeps the frozen Hiera
    forward cheap on CPU.  The mask decoder's internal sizes (8 heads, mlp 2048, iou head 256) are
    hard-coded by ``SAM2Base._build_sam_heads`` and therefore real.
    """
    d_model = 32
    mem_dim = 16
    feat = image_size // 16
    rope = lambda **kw: dict(  # noqa: E731
        _target_="sam2.modeling.sam.transformer.RoPEAttention",
        rope_theta=10000.0,
        feat_sizes=[feat, feat],
        embedding_dim=d_model,
        num_heads=1,
        downsample_rate=1,
        dropout=0.1,
        **kw,
    )
    return {
        "model": {
            "_target_": "sam2.modeling.sam2_base.SAM2Base",
            "image_encoder": {
                "_target_": "sam2.modeling.backbones.image_encoder.ImageEncoder",
                "scalp": 1,
                "trunk": {
                    "_target_": "sam2.modeling.backbones.hieradet.Hiera",
                    "embed_dim": 16,
                    "num_heads": 1,
                    "stages": [1, 2, 2, 1],
                    "global_att_blocks": [4],
                    "window_pos_embed_bkg_spatial_size": [4, 4],
                    "window_spec": [8, 4, 8, 4],
                },
                "neck": {
                    "_target_": "sam2.modeling.backbones.image_encoder.FpnNeck",
                    "position_encoding": {
                        "_target_": "sam2.modeling.position_encoding.PositionEmbeddingSine",
                        "num_pos_feats": d_model,
                        "normalize": True,
                        "scale": None,
                        "temperature": 10000,
                    },
                    "d_model": d_model,
                    "backbone_channel_list": [128, 64, 32, 16],
                    "fpn_top_down_levels": [2, 3],
                    "fpn_interp_model": "nearest",
                },
            },
            "memory_attention": {
                "_target_": "sam2.modeling.memory_attention.MemoryAttention",
                "d_model": d_model,
                "pos_enc_at_input": True,
                "layer": {
                    "_target_": "sam2.modeling.memory_attention.MemoryAttentionLayer",
                    "activation": "relu",
                    "dim_feedforward": 64,
                    "dropout": 0.1,
                    "pos_enc_at_attn": False,
                    "self_attention": rope(),
                    "d_model": d_model,
                    "pos_enc_at_cross_attn_keys": True,
                    "pos_enc_at_cross_attn_queries": False,
                    "cross_attention": rope(rope_k_repeat=True, kv_in_dim=mem_dim),
                },
                "num_layers": 1,
            },
            "memory_encoder": {
                "_target_": "sam2.modeling.memory_encoder.MemoryEncoder",
                "out_dim": mem_dim,
                "in_dim": d_model,
                "position_encoding": {
                    "_target_": "sam2.modeling.position_encoding.PositionEmbeddingSine",
                    "num_pos_feats": mem_dim,
                    "normalize": True,
                    "scale": None,
                    "temperature": 10000,
                },
                "mask_downsampler": {
                    "_target_": "sam2.modeling.memory_encoder.MaskDownSampler",
                    "embed_dim": d_model,
                    "kernel_size": 3,
                    "stride": 2,
                    "padding": 1,
                },
                "fuser": {
                    "_target_": "sam2.modeling.memory_encoder.Fuser",
                    "layer": {
                        "_target_": "sam2.modeling.memory_encoder.CXBlock",
                        "dim": d_model,
                        "kernel_size": 7,
                        "padding": 3,
                        "layer_scale_init_value": 1e-6,
                        "use_dwconv": True,
                    },
                    "num_layers": 1,
                },
            },
            "num_maskmem": 7,
            "image_size": image_size,
            "sigmoid_scale_for_mem_enc": 20.0,
            "sigmoid_bias_for_mem_enc": -10.0,
            "use_mask_input_as_output_without_sam": True,
            "directly_add_no_mem_embed": True,
            "use_high_res_features_in_sam": True,
            "multimask_output_in_sam": True,
            "iou_prediction_use_sigmoid": True,
            "use_obj_ptrs_in_encoder": True,
            "add_tpos_enc_to_obj_ptrs": False,
            "only_obj_ptrs_in_the_past_for_eval": True,
            "pred_obj_scores": True,
            "pred_obj_scores_mlp": True,
            "fixed_no_obj_ptr": True,
            "multimask_output_for_tracking": True,
            "use_multimask_token_for_obj_ptr": True,
            "multimask_min_pt_num": 0,
            "multimask_max_pt_num": 1,
            "use_mlp_for_obj_ptr_proj": True,
            "compile_image_encoder": False,
        }
    }


def build_meta_sam2(cfg: dict):
    """Instantiate Meta's ``SAM2Base`` (and sub-modules) from a hydra-style dict; no download."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    conf = OmegaConf.create(copy.deepcopy(cfg))
    model = instantiate(conf.model, _recursive_=True)
    return model


def make_meta_sam2(cfg: dict, seed: int):
    torch.manual_seed(seed + 1)
    sam2 = build_meta_sam2(cfg)
    gen = torch.Generator().manual_seed(seed + 2)
    # Meta's init leaves many zeros/ones (norms, biases, pos embeds); make every tensor distinctive.
    perturb_(sam2.parameters(), gen, 0.02)
    return sam2.float().eval()

