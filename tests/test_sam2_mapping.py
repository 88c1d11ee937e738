"""Oracle tests of the Meta SAM2 -> transformers Sam2VideoModel table (image parts named as in ``Sam2Model``).

Meta's ``sam2`` package is the independent implementation: a tiny randomised ``SAM2Base`` is converted with the
rules, loaded strictly into ``transformers.Sam2VideoModel`` (as the exports build it) and both run Sa2VA's
language-prompted mask path (``maskport.testing.references.sam2``); the video parts are checked against Meta's
video predictor in ``tests/test_sam2_video.py``. Full-size official configs are checked shape-only on the ``meta``
device.

The tiny model uses ``image_size=256`` (Meta's and transformers' code both take any multiple of 16 whose
stride-4 map the first window divides; 1024 is only the official value): feature maps 64/32/16, SAM head on 16x16.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from unittest import mock

import pytest
import torch

pytest.importorskip("sam2")
hydra_utils = pytest.importorskip("hydra.utils")
omegaconf = pytest.importorskip("omegaconf")

import sam2  # noqa: E402
from transformers import Sam2Model  # noqa: E402

from maskport.convert.plan import build_plan  # noqa: E402
from maskport.convert.sources import StateDictSource  # noqa: E402
from maskport.errors import PlanError, UnreadableFile, UnsupportedCheckpoint, WrongFamily  # noqa: E402
from maskport.heads.sam2 import (  # noqa: E402
    SAM2_PRESETS,
    SAM2_RULES,
    MetaSam2Spec,
    detect_sam2_preset,
    hf_sam2_config,
    hf_sam2_video_config,
    sam2_rules,
    spec_from_meta_config,
)
from maskport.heads.remote.sam2_video import build_sam2_video  # noqa: E402
from maskport.testing.references.sam2 import (  # noqa: E402
    hf_language_mask_logits,
    hf_language_outputs,
    meta_language_mask_logits,
    meta_language_outputs,
    select_like_forward_sam_heads,
)

TOL = 5e-6      # mask logits / IoU / object scores (measured: <= 7.2e-7 at logit magnitudes ~5, fp32 CPU)
TOL_EMB = 1e-6  # image embeddings (measured: bit-identical)
CKPT_PREFIX = "grounding_encoder.sam2_model."

# --------------------------------------------------------------------------------------------------
# A tiny SAM2 (modelled on sam2.1_hiera_t.yaml; every module present, all dims small)
# --------------------------------------------------------------------------------------------------

_M = "sam2.modeling."
TINY_MODEL_CFG = {
    "_target_": _M + "sam2_base.SAM2Base",
    "image_encoder": {
        "_target_": _M + "backbones.image_encoder.ImageEncoder",
        "scalp": 1,
        "trunk": {
            "_target_": _M + "backbones.hieradet.Hiera",
            "embed_dim": 16, "num_heads": 2,            # dims 16/32/64/128, heads 2/4/8/16 (head dim 8)
            "stages": [1, 2, 2, 1],
            "global_att_blocks": [2, 4],
            "window_pos_embed_bkg_spatial_size": [7, 7],
            "window_spec": [8, 6, 4, 2],                # 6 on a 32x32 map: exercises window padding
        },
        "neck": {
            "_target_": _M + "backbones.image_encoder.FpnNeck",
            "position_encoding": {"_target_": _M + "position_encoding.PositionEmbeddingSine",
                                  "num_pos_feats": 32, "normalize": True, "scale": None, "temperature": 10000},
            "d_model": 32,                              # = SAM prompt/decoder width (Sa2VA's text_hidden_fcs output)
            "backbone_channel_list": [128, 64, 32, 16],
            "fpn_top_down_levels": [2, 3],
            "fpn_interp_model": "nearest",
        },
    },
    "memory_attention": {
        "_target_": _M + "memory_attention.MemoryAttention",
        "d_model": 32, "pos_enc_at_input": True, "num_layers": 1,
        "layer": {
            "_target_": _M + "memory_attention.MemoryAttentionLayer",
            "activation": "relu", "dim_feedforward": 64, "dropout": 0.1, "pos_enc_at_attn": False, "d_model": 32,
            "pos_enc_at_cross_attn_keys": True, "pos_enc_at_cross_attn_queries": False,
            "self_attention": {"_target_": _M + "sam.transformer.RoPEAttention", "rope_theta": 10000.0,
                               "feat_sizes": [16, 16], "embedding_dim": 32, "num_heads": 1,
                               "downsample_rate": 1, "dropout": 0.1},
            "cross_attention": {"_target_": _M + "sam.transformer.RoPEAttention", "rope_theta": 10000.0,
                                "feat_sizes": [16, 16], "rope_k_repeat": True, "embedding_dim": 32,
                                "num_heads": 1, "downsample_rate": 1, "dropout": 0.1, "kv_in_dim": 16},
        },
    },
    "memory_encoder": {
        "_target_": _M + "memory_encoder.MemoryEncoder",
        "out_dim": 16, "in_dim": 32,
        "position_encoding": {"_target_": _M + "position_encoding.PositionEmbeddingSine",
                              "num_pos_feats": 16, "normalize": True, "scale": None, "temperature": 10000},
        "mask_downsampler": {"_target_": _M + "memory_encoder.MaskDownSampler", "embed_dim": 32,
                             "kernel_size": 3, "stride": 2, "padding": 1},
        "fuser": {"_target_": _M + "memory_encoder.Fuser", "num_layers": 2,
                  "layer": {"_target_": _M + "memory_encoder.CXBlock", "dim": 32, "kernel_size": 7,
                            "padding": 3, "layer_scale_init_value": 1e-6, "use_dwconv": True}},
    },
    "num_maskmem": 7,
    "image_size": 256,
    "sigmoid_scale_for_mem_enc": 20.0,
    "sigmoid_bias_for_mem_enc": -10.0,
    "use_mask_input_as_output_without_sam": True,
    "directly_add_no_mem_embed": True,
    "no_obj_embed_spatial": True,
    "use_high_res_features_in_sam": True,
    "multimask_output_in_sam": True,
    "iou_prediction_use_sigmoid": True,
    "use_obj_ptrs_in_encoder": True,
    "add_tpos_enc_to_obj_ptrs": True,
    "proj_tpos_enc_in_obj_ptrs": True,
    "use_signed_tpos_enc_to_obj_ptrs": True,
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


def _instantiate(cfg: dict, *, device: str = "cpu"):
    if device == "meta":
        # Hiera computes its drop-path rates with linspace(...).item(), which a meta tensor cannot answer
        linspace = torch.linspace
        with torch.device("meta"), mock.patch.object(
                torch, "linspace", lambda *a, **k: linspace(*a, **{**k, "device": "cpu"})):
            return hydra_utils.instantiate(cfg, _recursive_=True)
    return hydra_utils.instantiate(cfg, _recursive_=True)


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Every float parameter and buffer random and non-trivial (norm weights around 1, biases around 0, matrices
    ~ 1/sqrt(fan_in) but at least 0.05) so that any swapped or mis-laid tensor changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g, dtype=torch.float32)
            if name.endswith("positional_encoding_gaussian_matrix"):
                t.copy_(noise)
            elif t.dim() == 1 and name.endswith("weight"):
                t.copy_(1.0 + 0.1 * noise)
            elif t.dim() == 1:
                t.copy_(0.1 * noise)
            else:
                t.copy_(max(t[0].numel() ** -0.5, 0.05) * noise)


def _materialise(plan) -> dict[str, torch.Tensor]:
    """Run a plan's steps in memory (what the writer streams to disk)."""
    out: dict[str, torch.Tensor] = {}
    for ps in plan.steps:
        xs = [plan.sources[r.source].load(r.key) for r in ps.step.inputs]
        for t, y, info in zip(ps.step.targets, ps.step.compute(xs), ps.output_infos):
            assert t not in out
            out[t] = y.detach().to(info.dtype).clone()
    return out


def _expected(config, *, prefix: str = "") -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = build_sam2_video(config) if config.model_type == "sam2_video" else Sam2Model(config)
    return {prefix + k: tuple(v.shape) for k, v in model.state_dict().items()}


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    meta = _instantiate(TINY_MODEL_CFG).eval()
    _randomise(meta, seed=1)
    spec = spec_from_meta_config({"model": TINY_MODEL_CFG})
    config = hf_sam2_video_config(spec)
    src = StateDictSource("sam2", "tiny.pt", meta.state_dict(), "tiny randomised SAM2")
    plan = build_plan(sam2_rules(target_prefix=""), {"sam2": src}, out_dtype=torch.float32,
                      expected=_expected(config))
    converted = _materialise(plan)
    hf = build_sam2_video(config).eval()
    result = hf.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    g = torch.Generator().manual_seed(2)
    pixels = torch.randn(2, 3, 256, 256, generator=g)
    language = torch.randn(2, 2, 32, generator=g)  # B=2 images, N=2 language tokens of width d_model
    return dict(meta=meta, spec=spec, config=config, src=src, plan=plan, converted=converted, hf=hf,
                pixels=pixels, language=language)


@pytest.fixture(scope="module")
def outputs(tiny):
    """(Meta, transformers) outputs of the language-prompted path, single- and multi-mask, computed once."""
    out = {}
    with torch.no_grad():
        for multimask in (False, True):
            out[multimask] = tuple(fn(model, tiny["pixels"], tiny["language"], multimask_output=multimask)
                                   for fn, model in ((meta_language_outputs, tiny["meta"]),
                                                     (hf_language_outputs, tiny["hf"])))
    return out


# --------------------------------------------------------------------------------------------------
# Oracle: tiny randomised model, Meta vs transformers
# --------------------------------------------------------------------------------------------------


def test_tiny_spec_and_config(tiny):
    spec: MetaSam2Spec = tiny["spec"]
    assert spec.variant == "sam2.1" and spec.image_size == 256 and spec.d_model == 32
    assert spec.stage_dims == [16, 32, 64, 128] and spec.stage_heads == [2, 4, 8, 16]
    assert spec.feature_sizes[:3] == [64, 32, 16]
    assert spec.multimask_without_points  # min_pt 0 <= 0 clicks <= max_pt 1
    vc = tiny["config"].vision_config
    assert vc.backbone_feature_sizes == [[64, 64], [32, 32], [16, 16]]
    assert tiny["config"].mask_decoder_config.dynamic_multimask_via_stability is False


def test_every_meta_tensor_accounted_for(tiny):
    plan, src = tiny["plan"], tiny["src"]
    used = {r.key for ps in plan.steps for r in ps.step.inputs}
    assert not plan.drops  # the video parts are kept too
    assert used == set(src.keys())
    # the video parts land on transformers' Sam2VideoModel names, the layer-scale gamma on 'scale'
    meta = tiny["meta"].state_dict()
    conv = tiny["converted"]
    for ours, theirs in (("memory_encoder.memory_fuser.layers.1.scale", "memory_encoder.fuser.layers.1.gamma"),
                         ("memory_temporal_positional_encoding", "maskmem_tpos_enc"),
                         ("memory_encoder.mask_downsampler.final_conv.weight",
                          "memory_encoder.mask_downsampler.encoder.12.weight"),
                         ("memory_encoder.mask_downsampler.layers.3.layer_norm.bias",
                          "memory_encoder.mask_downsampler.encoder.10.bias"),
                         ("temporal_positional_encoding_projection_layer.weight", "obj_ptr_tpos_proj.weight"),
                         ("occlusion_spatial_embedding_parameter", "no_obj_embed_spatial"),
                         ("object_pointer_proj.proj_out.bias", "obj_ptr_proj.layers.2.bias")):
        assert torch.equal(conv[ours], meta[theirs]), ours


def test_non_rename_transforms(tiny):
    meta, conv = tiny["meta"].state_dict(), tiny["converted"]
    pe = meta["sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]
    assert torch.equal(conv["shared_image_embedding.positional_embedding"], pe)
    assert torch.equal(conv["prompt_encoder.shared_embedding.positional_embedding"], pe)
    assert (conv["shared_image_embedding.positional_embedding"].data_ptr()
            != conv["prompt_encoder.shared_embedding.positional_embedding"].data_ptr())
    point = torch.cat([meta[f"sam_prompt_encoder.point_embeddings.{k}.weight"] for k in range(4)], dim=0)
    assert torch.equal(conv["prompt_encoder.point_embed.weight"], point)


def test_image_embeddings_equal(tiny, outputs):
    a, b = outputs[False]
    assert [tuple(x.shape) for x in b["image_embeddings"]] == [(2, 4, 64, 64), (2, 8, 32, 32), (2, 32, 16, 16)]
    for x, y in zip(a["image_embeddings"], b["image_embeddings"]):
        assert x.abs().max() > 1.0
        assert _maxdiff(x, y) <= TOL_EMB
    # the sparse prompt tokens: [not-a-point (empty click), not-a-point (pad: no boxes), language x N]
    assert _maxdiff(a["sparse_embeddings"], b["sparse_embeddings"]) == 0.0
    nap = tiny["meta"].sam_prompt_encoder.not_a_point_embed.weight[0]
    assert torch.equal(b["sparse_embeddings"][:, 0], nap.expand(2, -1))
    assert torch.equal(b["sparse_embeddings"][:, 1], nap.expand(2, -1))
    assert torch.equal(b["sparse_embeddings"][:, 2:], tiny["language"])


@pytest.mark.parametrize("multimask", [False, True])
def test_language_mask_logits_match(outputs, multimask):
    a, b = outputs[multimask]
    logits_meta, logits_hf = a["low_res_masks"], b["low_res_masks"]
    m = 3 if multimask else 1
    assert logits_hf.shape == (2, m, 64, 64)
    assert logits_meta.abs().max() > 0.1  # non-trivial outputs, so the tolerance means something
    assert _maxdiff(logits_meta, logits_hf) <= TOL
    assert _maxdiff(a["iou_scores"], b["iou_scores"]) <= TOL
    assert _maxdiff(a["object_score_logits"], b["object_score_logits"]) <= TOL
    assert _maxdiff(select_like_forward_sam_heads(a), select_like_forward_sam_heads(b)) <= TOL


def test_dynamic_multimask_setting_carries_over(tiny, outputs):
    spec = dataclasses.replace(tiny["spec"], dynamic_multimask_via_stability=True)
    hf = build_sam2_video(hf_sam2_video_config(spec)).eval()
    hf.load_state_dict(tiny["converted"], strict=True)
    meta = tiny["meta"]
    meta.sam_mask_decoder.dynamic_multimask_via_stability = True
    try:
        with torch.no_grad():
            a = meta_language_mask_logits(meta, tiny["pixels"], tiny["language"])
            b = hf_language_mask_logits(hf, tiny["pixels"], tiny["language"])
    finally:
        meta.sam_mask_decoder.dynamic_multimask_via_stability = False
    assert _maxdiff(a, b) <= TOL
    assert _maxdiff(outputs[False][1]["low_res_masks"], b) > 1e-2  # random weights are "unstable": the fallback branch really ran


def test_strict_load_and_plan_catch_gaps(tiny):
    # a missing target tensor fails a strict load ...
    partial = dict(tiny["converted"])
    partial.pop("prompt_encoder.point_embed.weight")
    with pytest.raises(RuntimeError, match="Missing key"):
        build_sam2_video(tiny["config"]).load_state_dict(partial, strict=True)
    # ... and the plan already refuses a table that does not produce it
    rules = [r for r in sam2_rules(target_prefix="") if "point_embeddings" not in getattr(r, "sources", ("",))[0]]
    with pytest.raises(PlanError, match="point_embed.weight .* is missing"):
        build_plan(rules, {"sam2": tiny["src"]}, out_dtype=torch.float32,
                   expected=_expected(tiny["config"]))
    # an unknown Meta tensor is never ignored silently
    extra = StateDictSource("sam2", "x.pt", {**tiny["meta"].state_dict(), "new_module.weight": torch.zeros(2)}, "x")
    with pytest.raises(PlanError, match="sam2:new_module.weight is unaccounted"):
        build_plan(sam2_rules(target_prefix=""), {"sam2": extra}, out_dtype=torch.float32)


def test_target_prefix(tiny):
    rules = sam2_rules()  # default: under "sam2." as in a model with self.sam2 = Sam2VideoModel(...)
    plan = build_plan(rules, {"sam2": tiny["src"]}, out_dtype=torch.bfloat16,
                      expected=_expected(tiny["config"], prefix="sam2."))
    assert all(t.startswith("sam2.") for t in plan.targets)
    assert all(info.dtype == torch.bfloat16 for info in plan.targets.values())


def test_mask_decoder_from_training_checkpoint(tiny, outputs):
    meta = tiny["meta"]
    tuned = copy.deepcopy(meta)
    _randomise(tuned.sam_mask_decoder, seed=7)  # "fine-tuned" decoder (incl. conv_s0/conv_s1)
    decoder = {CKPT_PREFIX + "sam_mask_decoder." + k: v for k, v in tuned.sam_mask_decoder.state_dict().items()}
    ckpt = StateDictSource("ckpt", "iter_1.pth", decoder, "fake Sa2VA training checkpoint")
    plan = build_plan(sam2_rules(target_prefix="", mask_decoder_from="ckpt:" + CKPT_PREFIX),
                      {"sam2": tiny["src"], "ckpt": ckpt}, out_dtype=torch.float32,
                      expected=_expected(tiny["config"]))
    used = {r for ps in plan.steps for r in ps.step.inputs}
    superseded = {r.key: why for r, why in plan.drops if r.source == "sam2" and "superseded" in why}
    meta_decoder = {k for k in tiny["src"].keys() if k.startswith("sam_mask_decoder.")}
    assert set(superseded) == meta_decoder
    assert {r.key for r in used if r.source == "ckpt"} == set(decoder)
    assert not any(r.source == "sam2" and r.key.startswith("sam_mask_decoder.") for r in used)
    assert all("'ckpt'" in why for why in superseded.values())

    converted = _materialise(plan)
    assert torch.equal(converted["mask_decoder.iou_token.weight"],
                       decoder[CKPT_PREFIX + "sam_mask_decoder.iou_token.weight"])
    hf = build_sam2_video(tiny["config"]).eval()
    hf.load_state_dict(converted, strict=True)
    with torch.no_grad():
        a = meta_language_mask_logits(tuned, tiny["pixels"], tiny["language"])
        b = hf_language_mask_logits(hf, tiny["pixels"], tiny["language"])
    assert _maxdiff(a, b) <= TOL
    assert _maxdiff(outputs[False][1]["low_res_masks"], b) > 1e-2  # the tuned decoder is really the one in use

    with pytest.raises(ValueError):
        sam2_rules(mask_decoder_from="grounding_encoder.sam2_model.")


def test_detect_rejects_what_is_not_an_official_sam2(tiny):
    with pytest.raises(WrongFamily, match="--sam2-config"):
        detect_sam2_preset(tiny["src"])  # a valid SAM2, but no official size
    with pytest.raises(UnreadableFile):
        detect_sam2_preset(StateDictSource("sam2", "e.pt", {}, "empty"))
    hf_layout = StateDictSource("sam2", "h.pt", tiny["hf"].state_dict(), "HF Sam2Model")
    with pytest.raises(WrongFamily, match="transformers Sam2Model already"):
        detect_sam2_preset(hf_layout)
    nested = StateDictSource("sam2", "n.pt", {CKPT_PREFIX + k: v for k, v in tiny["meta"].state_dict().items()}, "")
    with pytest.raises(WrongFamily, match="grounding_encoder.sam2_model."):
        detect_sam2_preset(nested)


def test_hf_config_rejects_what_sam2model_cannot_express(tiny):
    for change in (dict(use_high_res_features_in_sam=False), dict(pred_obj_scores_mlp=False),
                   dict(directly_add_no_mem_embed=False), dict(fpn_interp_model="bilinear")):
        with pytest.raises(UnsupportedCheckpoint, match=next(iter(change))):
            hf_sam2_config(dataclasses.replace(tiny["spec"], **change))


# --------------------------------------------------------------------------------------------------
# Official presets, full size, shapes only
# --------------------------------------------------------------------------------------------------

_CONFIG_DIR = os.path.join(os.path.dirname(sam2.__file__), "configs")
_SIZES = {"t": "tiny", "s": "small", "b+": "base_plus", "l": "large"}
_YAMLS = {f"{v}_hiera_{name}": os.path.join(_CONFIG_DIR, v, f"{v}_hiera_{short}.yaml")
          for v in ("sam2", "sam2.1") for short, name in _SIZES.items()}


def _yaml_model(path: str) -> dict:
    return omegaconf.OmegaConf.to_container(omegaconf.OmegaConf.load(path), resolve=True)["model"]


def test_presets_are_meta_yaml_files():
    assert set(SAM2_PRESETS) == set(_YAMLS)
    for name, path in _YAMLS.items():
        assert spec_from_meta_config(_yaml_model(path)) == SAM2_PRESETS[name], name


@pytest.mark.parametrize("name", sorted(_YAMLS))
def test_full_size_detection_and_plan(name):
    meta = _instantiate(_yaml_model(_YAMLS[name]), device="meta")
    src = StateDictSource("sam2", f"{name}.pt", meta.state_dict(), "shape-only")
    found, spec = detect_sam2_preset(src)
    assert found == name and spec == SAM2_PRESETS[name]
    plan = build_plan(sam2_rules(target_prefix=""), {"sam2": src}, out_dtype=torch.bfloat16,
                      expected=_expected(hf_sam2_video_config(spec)))
    used = {r.key for ps in plan.steps for r in ps.step.inputs}
    assert used | {r.key for r, _ in plan.drops} == set(src.keys())
    n_ops = {}
    for ps in plan.steps:
        n_ops[ps.step.op_name] = n_ops.get(ps.step.op_name, 0) + len(ps.step.inputs)
    assert n_ops["concat(dim=0)"] == 4 and n_ops["duplicate(x2)"] == 1
    assert not plan.drops  # 160 video tensors (157 in SAM2 v1) kept since the video head
    video = hf_sam2_video_config(spec)
    v1 = not name.startswith("sam2.1")
    assert video.enable_temporal_pos_encoding_for_object_pointers is not v1
    assert video.enable_occlusion_spatial_embedding is not v1


def test_rules_table_is_only_sam2_sourced():
    assert all(getattr(r, "source", getattr(r, "sources", ("sam2:",))[0]).startswith("sam2:") for r in SAM2_RULES)


@pytest.mark.parametrize("name", sorted(_YAMLS))
def test_meta_yaml_read_safely_gives_the_preset(name):
    """``--sam2-config`` takes Meta's own hydra YAML (parsed with yaml.safe_load, no OmegaConf)."""
    from maskport.heads.sam2 import read_sam2_config

    assert spec_from_meta_config(read_sam2_config(_YAMLS[name])) == SAM2_PRESETS[name]


def test_sam2_config_reader_refuses_what_is_not_plain_data(tmp_path):
    from maskport.heads.sam2 import read_sam2_config

    bad = tmp_path / "evil.yaml"
    bad.write_text("model: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(UnreadableFile, match="not valid YAML") as exc:
        read_sam2_config(bad)
    assert "\n" not in str(exc.value)
    big = tmp_path / "big.yaml"
    big.write_text("x: " + "a" * (2 << 20))
    with pytest.raises(UnreadableFile, match="limit"):
        read_sam2_config(big)
    lst = tmp_path / "list.json"
    lst.write_text("[1, 2]")
    with pytest.raises(UnreadableFile, match="not a model config mapping"):
        read_sam2_config(lst)
