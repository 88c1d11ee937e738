"""Oracle tests of the Meta SAM (v1) -> transformers SamModel table and of the SAM image head.

Meta's ``segment_anything`` package is the independent implementation: a tiny randomised ``Sam`` is saved as a
``.pth``, opened, converted with the rules, loaded strictly into ``transformers.SamModel``, and both run LISA's
language-prompted mask path (the language embedding as the only sparse token, ``no_mask_embed`` as the dense
prompt, ``multimask_output=False``). Meta's ``ResizeLongestSide``, ``Sam.preprocess`` and ``Sam.postprocess_masks``
check the head's pre- and post-processing. Full-size official models are checked shape-only on the ``meta`` device.
"""

from __future__ import annotations

import copy
import dataclasses
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

segment_anything = pytest.importorskip("segment_anything")

from segment_anything import build_sam_vit_b, build_sam_vit_h, build_sam_vit_l  # noqa: E402
from segment_anything.modeling import (ImageEncoderViT, MaskDecoder, PromptEncoder, Sam,  # noqa: E402
                                       TwoWayTransformer)
from segment_anything.utils.transforms import ResizeLongestSide  # noqa: E402
from transformers import SamModel  # noqa: E402

from maskport.convert.plan import build_plan  # noqa: E402
from maskport.convert.sources import StateDictSource  # noqa: E402
from maskport.errors import MissingInput, PlanError, UnreadableFile, UnsupportedCheckpoint, WrongFamily  # noqa: E402
from maskport.heads.remote.sam_image import (SAM_PIXEL_MEAN, SAM_PIXEL_STD, SamImageHeadMixin,  # noqa: E402
                                             resize_longest_side_shape, sam_head_settings)
from maskport.heads.sam import (SAM_PRESETS, SAM_RULES, MetaSamSpec, detect_sam_preset, hf_sam_config,  # noqa: E402
                                open_sam, open_sam_checkpoint, sam_inputs, sam_rules)

TOL = 2e-5  # mask logits, fp32 CPU (measured <= 2e-6 at magnitudes ~2; with transformers' default decoder eps: 1e-4)
CKPT_PREFIX = "base_model.model.model.visual_model."  # where LISA's training checkpoint keeps SAM

# --------------------------------------------------------------------------------------------------
# A tiny SAM: 256 px, patch 16 (16x16 grid), window 5 (16 is not a multiple: the windows are padded),
# 3 blocks of which block 1 attends globally, relative positions on; prompt width 32, 4 decoder heads
# --------------------------------------------------------------------------------------------------

IMG, PATCH, EMBED, DEPTH, HEADS, WINDOW, GLOBAL = 256, 16, 64, 3, 4, 5, (1,)
D, DEC_MLP, DEC_HEADS, IOU_HIDDEN = 32, 64, 4, 48
TINY_SPEC = MetaSamSpec(embed_dim=EMBED, depth=DEPTH, num_heads=HEADS, global_attn_indexes=GLOBAL, image_size=IMG,
                        patch_size=PATCH, window_size=WINDOW, prompt_embed_dim=D, decoder_mlp_dim=DEC_MLP,
                        decoder_num_heads=DEC_HEADS, iou_head_hidden_dim=IOU_HIDDEN)


def _tiny_meta_sam() -> Sam:
    grid = IMG // PATCH
    return Sam(
        image_encoder=ImageEncoderViT(img_size=IMG, patch_size=PATCH, embed_dim=EMBED, depth=DEPTH, num_heads=HEADS,
                                      mlp_ratio=4, out_chans=D, qkv_bias=True,
                                      norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                                      window_size=WINDOW, global_attn_indexes=GLOBAL),
        prompt_encoder=PromptEncoder(embed_dim=D, image_embedding_size=(grid, grid), input_image_size=(IMG, IMG),
                                     mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=D, iou_head_depth=3,
                                 iou_head_hidden_dim=IOU_HIDDEN,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=D, mlp_dim=DEC_MLP,
                                                               num_heads=DEC_HEADS)),
        pixel_mean=SAM_PIXEL_MEAN, pixel_std=SAM_PIXEL_STD,
    ).eval()


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Every float parameter and buffer random and non-trivial (norm weights around 1, biases around 0, matrices
    ~ 1/sqrt(fan_in) but at least 0.05; the zero-initialised relative positions too) so that any swapped or
    mis-laid tensor changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict(keep_vars=True).items():
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
        model = SamModel(config)
    return {prefix + k: tuple(v.shape) for k, v in model.state_dict().items()}


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


class _Head(SamImageHeadMixin):
    """The smallest host of the mixin: ``self.sam`` and a config carrying the head's settings."""

    def __init__(self, sam: SamModel, **overrides):
        self.sam = sam
        self.config = SimpleNamespace(**{**sam_head_settings(sam.config), **overrides})


# --------------------------------------------------------------------------------------------------
# Meta's side, LISA's way
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def meta_language_logits(sam: Sam, pixel_values: torch.Tensor, language: torch.Tensor,
                         multimask_output: bool = False) -> torch.Tensor:
    """``[B, N, h, w]`` low-res logits as LISA computes them with Meta's modules: per image, its patched
    ``prompt_encoder(points=None, boxes=None, masks=None, text_embeds=[N, 1, D])`` gives sparse =
    ``cat([empty (N, 0, D), text_embeds], 1)`` and Meta's dense ``no_mask_embed`` grid; then
    ``mask_decoder(image_embeddings=emb[i:i+1], image_pe=get_dense_pe(), ...)``. Multi-mask: best predicted IoU."""
    embeddings = sam.image_encoder(pixel_values)
    out = []
    for i in range(pixel_values.shape[0]):
        text = language[i].unsqueeze(1)                                      # [N, 1, D]
        empty_sparse, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)  # [1, 0, D], [1, D, g, g]
        assert empty_sparse.shape == (1, 0, D)
        sparse = torch.cat([torch.empty((text.shape[0], 0, D), dtype=text.dtype), text], dim=1)
        low_res, iou = sam.mask_decoder(image_embeddings=embeddings[i:i + 1], image_pe=sam.prompt_encoder.get_dense_pe(),
                                        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                        multimask_output=multimask_output)  # [N, M, h, w], [N, M]
        best = iou.argmax(dim=1)
        out.append(low_res[torch.arange(low_res.shape[0]), best])
    return torch.stack(out)


def meta_preprocess(sam: Sam, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
    """LISA's ``chat.py`` / Meta's ``SamPredictor.set_image``: ``ResizeLongestSide.apply_image`` on the uint8
    array, then ``Sam.preprocess`` (normalise on 0-255, pad)."""
    resized = ResizeLongestSide(sam.image_encoder.img_size).apply_image(np.asarray(image.convert("RGB")))
    x = torch.from_numpy(resized).permute(2, 0, 1).contiguous()
    return sam.preprocess(x[None]), tuple(resized.shape[:2])


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    meta = _tiny_meta_sam()
    _randomise(meta, seed=1)
    path = tmp_path_factory.mktemp("sam") / "sam_tiny.pth"
    torch.save(meta.state_dict(), path)  # as Meta releases them: a plain state dict
    src = open_sam_checkpoint(path)
    config = hf_sam_config(TINY_SPEC)
    plan = build_plan(sam_rules(target_prefix=""), {"sam": src}, out_dtype=torch.float32, expected=_expected(config))
    converted = _materialise(plan)
    hf = SamModel(config).eval()
    result = hf.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    g = torch.Generator().manual_seed(2)
    pixels = torch.randn(2, 3, IMG, IMG, generator=g)
    language = torch.randn(2, 3, D, generator=g)  # B=2 images, N=3 prompts each
    return dict(meta=meta, path=path, src=src, config=config, plan=plan, converted=converted, hf=hf,
                pixels=pixels, language=language)


# --------------------------------------------------------------------------------------------------
# (a) the table: every tensor accounted for; LISA's mask path equal to Meta's
# --------------------------------------------------------------------------------------------------


def test_every_tensor_accounted_for(tiny):
    plan, src = tiny["plan"], tiny["src"]
    used = [r.key for ps in plan.steps for r in ps.step.inputs]
    assert len(used) == len(set(used))
    assert set(used) == set(src.keys()) == set(tiny["meta"].state_dict())
    assert not plan.drops  # nothing of Meta's SAM is left out: SamModel has all of it
    assert set(plan.targets) == set(SamModel(tiny["config"]).state_dict())
    assert "image_encoder.blocks.0.attn.rel_pos_h" in used  # the relative positions travel


def test_layout_changes(tiny):
    meta, conv = tiny["meta"].state_dict(), tiny["converted"]
    pe = meta["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]
    assert torch.equal(conv["shared_image_embedding.positional_embedding"], pe)
    assert torch.equal(conv["prompt_encoder.shared_embedding.positional_embedding"], pe)
    assert (conv["shared_image_embedding.positional_embedding"].data_ptr()
            != conv["prompt_encoder.shared_embedding.positional_embedding"].data_ptr())
    for k in range(4):
        assert torch.equal(conv[f"prompt_encoder.point_embed.{k}.weight"], meta[f"prompt_encoder.point_embeddings.{k}.weight"])
    for i, name in enumerate(("conv1", "layer_norm1", "conv2", "layer_norm2")):
        assert torch.equal(conv[f"vision_encoder.neck.{name}.weight"], meta[f"image_encoder.neck.{i}.weight"])
    assert torch.equal(conv["vision_encoder.layers.1.attn.rel_pos_w"], meta["image_encoder.blocks.1.attn.rel_pos_w"])
    assert conv["vision_encoder.layers.1.attn.rel_pos_h"].shape[0] == 2 * (IMG // PATCH) - 1  # global block
    assert conv["vision_encoder.layers.0.attn.rel_pos_h"].shape[0] == 2 * WINDOW - 1
    assert torch.equal(conv["mask_decoder.iou_prediction_head.layers.0.weight"],
                       meta["mask_decoder.iou_prediction_head.layers.1.weight"])
    assert torch.equal(conv["mask_decoder.upscale_conv2.bias"], meta["mask_decoder.output_upscaling.3.bias"])


def test_image_embeddings_equal(tiny):
    with torch.no_grad():
        a = tiny["meta"].image_encoder(tiny["pixels"])
        b = tiny["hf"].get_image_embeddings(tiny["pixels"])
        pe_a = tiny["meta"].prompt_encoder.get_dense_pe()
        pe_b = tiny["hf"].get_image_wide_positional_embeddings()
    assert a.shape == (2, D, IMG // PATCH, IMG // PATCH) and a.abs().max() > 0.5
    assert _maxdiff(a, b) <= 1e-5, _maxdiff(a, b)
    assert _maxdiff(pe_a, pe_b) <= 1e-6


@pytest.mark.parametrize("seed", [3, 4, 5])
@pytest.mark.parametrize("multimask", [False, True])
def test_language_mask_logits_match(tiny, seed, multimask):
    g = torch.Generator().manual_seed(seed)
    language = 2.0 * torch.randn(2, 3, D, generator=g)
    a = meta_language_logits(tiny["meta"], tiny["pixels"], language, multimask_output=multimask)
    b = _Head(tiny["hf"]).sam_mask_logits(tiny["pixels"], language, multimask_output=multimask)
    assert b.shape == (2, 3, 4 * IMG // PATCH, 4 * IMG // PATCH) and b.dtype == torch.float32
    assert a.abs().max() > 0.5  # non-trivial outputs, so the tolerance means something
    assert _maxdiff(a, b) <= TOL, _maxdiff(a, b)
    # each prompt is independent: prompt 1 alone gives the same mask as in the batch of three
    alone = _Head(tiny["hf"]).sam_mask_logits(tiny["pixels"], language[:, 1:2], multimask_output=multimask)
    assert _maxdiff(alone[:, 0], b[:, 1]) <= 1e-5
    # and the prompts really matter
    assert _maxdiff(b[:, 0], b[:, 1]) > 1e-2


def test_decoder_layer_norm_eps_is_metas(tiny):
    """Meta's two-way transformer uses torch's LayerNorm default eps 1e-5; transformers' SamMaskDecoderConfig
    defaults to 1e-6. The config carries 1e-5, and the difference is visible at this tolerance."""
    config = tiny["config"]
    assert config.mask_decoder_config.layer_norm_eps == 1e-5
    assert tiny["meta"].mask_decoder.transformer.layers[0].norm1.eps == 1e-5
    other = copy.deepcopy(config)
    other.mask_decoder_config.layer_norm_eps = 1e-6
    hf = SamModel(other).eval()
    hf.load_state_dict(tiny["converted"], strict=True)
    a = meta_language_logits(tiny["meta"], tiny["pixels"], tiny["language"])
    assert _maxdiff(a, _Head(hf).sam_mask_logits(tiny["pixels"], tiny["language"])) > TOL


def test_mask_logits_edge_cases(tiny):
    head = _Head(tiny["hf"])
    empty = head.sam_mask_logits(tiny["pixels"], torch.zeros(2, 0, D))
    assert empty.shape == (2, 0, 64, 64)
    with pytest.raises(ValueError, match=r"\[B=2, N, D\]"):
        head.sam_mask_logits(tiny["pixels"], torch.zeros(3, D))
    with pytest.raises(ValueError, match="32 wide"):
        head.sam_mask_logits(tiny["pixels"], torch.zeros(2, 1, D + 1))


def test_plan_catches_gaps(tiny):
    rules = [r for r in sam_rules(target_prefix="") if "point_embeddings" not in getattr(r, "source", "")]
    with pytest.raises(PlanError, match=r"point_embed\.0\.weight .* is missing"):
        build_plan(rules, {"sam": tiny["src"]}, out_dtype=torch.float32, expected=_expected(tiny["config"]))
    extra = StateDictSource("sam", "x.pth", {**tiny["meta"].state_dict(), "new_module.weight": torch.zeros(2)}, "x")
    with pytest.raises(PlanError, match="sam:new_module.weight is unaccounted"):
        build_plan(sam_rules(target_prefix=""), {"sam": extra}, out_dtype=torch.float32)
    # a SamModel of another shape (prompt width 16) is refused before anything is written
    other = hf_sam_config(dataclasses.replace(TINY_SPEC, prompt_embed_dim=16))
    with pytest.raises(PlanError, match="shape"):
        build_plan(sam_rules(target_prefix=""), {"sam": tiny["src"]}, out_dtype=torch.float32,
                   expected=_expected(other))


def test_target_prefix_and_source_name(tiny):
    plan = build_plan(sam_rules(), {"sam": tiny["src"]}, out_dtype=torch.bfloat16,
                      expected=_expected(tiny["config"], prefix="sam."))
    assert all(t.startswith("sam.") for t in plan.targets)
    assert all(info.dtype == torch.bfloat16 for info in plan.targets.values())
    # Meta's keys presented under another source name (e.g. a released folder seen through a RenamedSource)
    other = StateDictSource("visual", "v", tiny["meta"].state_dict(), "released SAM")
    plan = build_plan(sam_rules(target_prefix="", source="visual"), {"visual": other}, out_dtype=torch.float32,
                      expected=_expected(tiny["config"]))
    assert {r.source for ps in plan.steps for r in ps.step.inputs} == {"visual"}


# --------------------------------------------------------------------------------------------------
# (b) pre- and post-processing against Meta's on non-square images
# --------------------------------------------------------------------------------------------------


def _image(h: int, w: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    # smooth structure plus noise, so that resampling errors show
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx + yy) * 7) % 256], -1)
    img = np.clip(base + rng.integers(-40, 41, size=(h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(img).convert(mode)


SIZES = [(300, 200), (123, 457), (256, 256), (97, 256), (480, 641), (50, 37)]


@pytest.mark.parametrize("hw", SIZES)
def test_preprocess_equals_meta(tiny, hw):
    image = _image(*hw, seed=hw[0])
    ref, ref_size = meta_preprocess(tiny["meta"], image)
    ours, size = _Head(tiny["hf"]).sam_preprocess(image)
    assert size == ref_size == resize_longest_side_shape(*hw, IMG)
    assert max(size) == IMG
    assert ours.shape == ref.shape == (1, 3, IMG, IMG) and ours.dtype == torch.float32
    assert torch.equal(ours, ref)


def test_preprocess_palette_image_and_shape_rounding(tiny):
    image = _image(300, 200, seed=9).convert("P")
    ref, _ = meta_preprocess(tiny["meta"], image)
    assert torch.equal(_Head(tiny["hf"]).sam_preprocess(image)[0], ref)
    for h, w in ((1000, 333), (333, 1000), (7, 3), (1024, 1023)):
        assert resize_longest_side_shape(h, w, 1024) == ResizeLongestSide.get_preprocess_shape(h, w, 1024)


@pytest.mark.parametrize("hw", [(300, 200), (123, 457), (480, 641)])
def test_postprocess_equals_meta(tiny, hw):
    image = _image(*hw, seed=hw[1])
    _, input_size = meta_preprocess(tiny["meta"], image)
    g = torch.Generator().manual_seed(hw[0])
    low_res = 3.0 * torch.randn(1, 3, 64, 64, generator=g)
    with torch.no_grad():
        ref = tiny["meta"].postprocess_masks(low_res, input_size=input_size, original_size=hw)
    ours = _Head(tiny["hf"]).sam_postprocess(low_res[0], input_size, hw)
    assert ours.shape == (3, *hw)
    assert torch.equal(ours, ref[0])
    assert torch.equal(ours > 0, ref[0] > tiny["meta"].mask_threshold)  # Meta's mask_threshold is 0.0


@pytest.mark.parametrize("hw", [(300, 200), (123, 457)])
def test_masks_from_prompts_equal_meta(tiny, hw):
    """The whole image path: Meta's (LISA's) preprocessing, language-prompted decoder, postprocess_masks and
    ``logits > 0`` vs the head's ``masks_from_prompts``."""
    image = _image(*hw, seed=7)
    g = torch.Generator().manual_seed(11)
    prompts = 2.0 * torch.randn(3, D, generator=g)
    meta = tiny["meta"]
    x, input_size = meta_preprocess(meta, image)
    with torch.no_grad():
        low = meta_language_logits(meta, x, prompts[None])[0]               # [N, h, w]
        ref_logits = meta.postprocess_masks(low[None], input_size=input_size, original_size=hw)[0]
    head = _Head(tiny["hf"])
    masks, probs = head.masks_from_prompts(image, prompts, threshold=0.5, return_probabilities=True)
    assert len(masks) == len(probs) == 3
    for m, p, ref in zip(masks, probs, ref_logits):
        assert m.shape == p.shape == (1, *hw) and m.dtype == np.bool_ and p.dtype == np.float32
        ref_mask = (ref > 0).numpy()
        assert 0.02 < ref_mask.mean() < 0.98  # a real mask, not all on / all off
        # pixel-exact, except possibly where Meta's logit is within float noise (1e-4, 50x the measured logit
        # difference) of the threshold
        differ = m[0] != ref_mask
        assert not differ.any() or ref.abs().numpy()[differ].max() < 1e-4, int(differ.sum())
        assert np.abs(p[0] - ref.sigmoid().numpy()).max() < 1e-4
    # another threshold applies to the probabilities
    high, none = head.masks_from_prompts(image, prompts, threshold=0.9, return_probabilities=False)
    assert none == [] and all((h <= m).all() for h, m in zip(high, masks))
    assert np.array_equal(high[0][0], probs[0][0] > 0.9)


def test_threshold_half_is_logits_above_zero(tiny, monkeypatch):
    """At 0.5 the mask is ``logits > 0`` (LISA's rule) even where float32's sigmoid rounds to exactly 0.5."""
    head = _Head(tiny["hf"])
    tiny_logits = torch.tensor([[-1e-9, 0.0, 1e-9, 1e-7, 1.0]]).reshape(1, 1, 5)
    assert tiny_logits.sigmoid()[0, 0, 2] == 0.5  # the rounding the rule avoids
    monkeypatch.setattr(head, "sam_mask_logits", lambda *a, **k: torch.zeros(1, 1, 64, 64))
    monkeypatch.setattr(head, "sam_postprocess", lambda logits, input_size, size: tiny_logits.expand(1, *size))
    image = Image.new("RGB", (5, 1))
    masks, _ = head.masks_from_prompts(image, torch.zeros(1, D), threshold=0.5, return_probabilities=False)
    assert masks[0].tolist() == [[[False, False, True, True, True]]]


def test_head_settings(tiny):
    s = sam_head_settings(tiny["config"])
    assert s["sam_image_size"] == IMG and s["sam_pixel_mean"] == SAM_PIXEL_MEAN and s["sam_pixel_std"] == SAM_PIXEL_STD
    assert s["sam_multimask_output"] is False and s["text_hidden_fcs_out_dim"] == D
    assert list(tiny["meta"].pixel_mean.flatten().tolist()) == pytest.approx(SAM_PIXEL_MEAN)
    with pytest.raises(ValueError, match="disagrees"):
        sam_head_settings(tiny["config"], sam_image_size=1024)
    with pytest.raises(ValueError, match="3 values"):
        sam_head_settings(tiny["config"], sam_pixel_std=[1.0, 2.0])


# --------------------------------------------------------------------------------------------------
# (c) full-size official models, shapes only
# --------------------------------------------------------------------------------------------------

_BUILDERS = {"vit_b": build_sam_vit_b, "vit_l": build_sam_vit_l, "vit_h": build_sam_vit_h}


@pytest.mark.parametrize("name", sorted(_BUILDERS))
def test_full_size_detection_and_plan(name):
    with torch.device("meta"):
        meta = _BUILDERS[name]()
    src = StateDictSource("sam", f"sam_{name}.pth", meta.state_dict(), "shape-only")
    found, spec = detect_sam_preset(src)
    assert found == name and spec == SAM_PRESETS[name]
    enc = meta.image_encoder
    assert spec.depth == len(enc.blocks) and spec.embed_dim == enc.patch_embed.proj.out_channels
    assert list(spec.global_attn_indexes) == [i for i, b in enumerate(enc.blocks) if b.window_size == 0]
    for config in (hf_sam_config(name), hf_sam_config(spec)):
        plan = build_plan(sam_rules(target_prefix=""), {"sam": src}, out_dtype=torch.bfloat16,
                          expected=_expected(config))
        used = [r.key for ps in plan.steps for r in ps.step.inputs]
        assert sorted(used) == sorted(src.keys()) and not plan.drops
        assert sum(ps.step.op_name.startswith("duplicate") for ps in plan.steps) == 1
        assert len(plan.targets) == len(src.keys()) + 1  # the PE matrix twice


def test_detect_rejects_what_is_not_an_official_sam(tiny):
    with pytest.raises(WrongFamily, match="none of the official presets"):
        detect_sam_preset(tiny["src"])  # a valid SAM, but no official size
    with pytest.raises(UnreadableFile):
        detect_sam_preset(StateDictSource("sam", "e.pth", {}, "empty"))
    with pytest.raises(WrongFamily, match="transformers SamModel already"):
        detect_sam_preset(StateDictSource("sam", "h.pth", tiny["hf"].state_dict(), "HF SamModel"))
    nested = StateDictSource("sam", "n.pth", {CKPT_PREFIX + k: v for k, v in tiny["meta"].state_dict().items()}, "")
    with pytest.raises(WrongFamily, match=CKPT_PREFIX.replace(".", r"\.")):
        detect_sam_preset(nested)
    decoder_only = {k: v for k, v in tiny["meta"].state_dict().items() if not k.startswith("image_encoder.")}
    with pytest.raises(WrongFamily, match="no image encoder"):
        detect_sam_preset(StateDictSource("sam", "f.pth", decoder_only, ""))
    with pytest.raises(WrongFamily, match="SAM2"):
        detect_sam_preset({"image_encoder.trunk.patch_embed.proj.weight": torch.zeros(1)})


def test_hf_config_inputs():
    assert hf_sam_config("vit_h").vision_config.hidden_size == 1280
    with pytest.raises(UnsupportedCheckpoint, match="unknown SAM preset"):
        hf_sam_config("vit_x")
    with pytest.raises(UnsupportedCheckpoint, match="multiple of num_heads"):
        hf_sam_config(dataclasses.replace(TINY_SPEC, num_heads=5))


# --------------------------------------------------------------------------------------------------
# (d) the decoder (LISA) or decoder + prompt encoder (F-LMM) from a training checkpoint
# --------------------------------------------------------------------------------------------------


def test_mask_decoder_from_training_checkpoint(tiny):
    tuned = copy.deepcopy(tiny["meta"])
    _randomise(tuned.mask_decoder, seed=7)  # the "fine-tuned" decoder
    decoder = {CKPT_PREFIX + "mask_decoder." + k: v for k, v in tuned.mask_decoder.state_dict().items()}
    ckpt = StateDictSource("ckpt", "pytorch_model.bin", decoder, "fake LISA training checkpoint")
    plan = build_plan(sam_rules(target_prefix="", mask_decoder_from="ckpt:" + CKPT_PREFIX),
                      {"sam": tiny["src"], "ckpt": ckpt}, out_dtype=torch.float32, expected=_expected(tiny["config"]))
    used = {r for ps in plan.steps for r in ps.step.inputs}
    superseded = {r.key: why for r, why in plan.drops if r.source == "sam"}
    assert set(superseded) == {k for k in tiny["src"].keys() if k.startswith("mask_decoder.")}
    assert all("superseded" in why and "'ckpt'" in why and "mask_decoder" in why for why in superseded.values())
    assert {r.key for r in used if r.source == "ckpt"} == set(decoder)
    assert not any(r.source == "sam" and r.key.startswith("mask_decoder.") for r in used)

    hf = SamModel(tiny["config"]).eval()
    hf.load_state_dict(_materialise(plan), strict=True)
    language = tiny["language"]
    a = meta_language_logits(tuned, tiny["pixels"], language)
    b = _Head(hf).sam_mask_logits(tiny["pixels"], language)
    assert _maxdiff(a, b) <= TOL
    assert _maxdiff(_Head(tiny["hf"]).sam_mask_logits(tiny["pixels"], language), b) > 1e-2  # the tuned one is in use

    # a decoder tensor missing from the training checkpoint is a plan error, not a fallback to Meta's
    partial_ckpt = StateDictSource("ckpt", "p.bin", {k: v for k, v in decoder.items() if "iou_token" not in k}, "")
    with pytest.raises(PlanError, match="iou_token"):
        build_plan(sam_rules(target_prefix="", mask_decoder_from="ckpt:" + CKPT_PREFIX),
                   {"sam": tiny["src"], "ckpt": partial_ckpt}, out_dtype=torch.float32,
                   expected=_expected(tiny["config"]))
    for bad in ("base_model.model.", "ckpt:no_dot", ":x."):
        with pytest.raises(ValueError):
            sam_rules(mask_decoder_from=bad)


def test_prompt_encoder_and_decoder_from_training_checkpoint(tiny):
    """F-LMM: ``sam.model.{prompt_encoder,mask_decoder}.*`` parameters only (its checkpoint holds what
    requires grad; the PE matrix is a buffer, kept from Meta's checkpoint)."""
    prefix = "sam.model."
    tuned = copy.deepcopy(tiny["meta"])
    _randomise(tuned.mask_decoder, seed=8)
    with torch.no_grad():
        for p in tuned.prompt_encoder.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    trained = {f"{prefix}{m}.{k}": v for m in ("prompt_encoder", "mask_decoder")
               for k, v in dict(getattr(tuned, m).named_parameters()).items()}
    assert not any("gaussian" in k for k in trained)
    ckpt = StateDictSource("ckpt", "iter.pth", trained, "fake F-LMM checkpoint")
    plan = build_plan(sam_rules(target_prefix="", mask_decoder_from="ckpt:" + prefix,
                                prompt_encoder_from="ckpt:" + prefix),
                      {"sam": tiny["src"], "ckpt": ckpt}, out_dtype=torch.float32, expected=_expected(tiny["config"]))
    used_sam = {r.key for ps in plan.steps for r in ps.step.inputs if r.source == "sam"}
    assert "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix" in used_sam
    assert not any(k.startswith(("mask_decoder.", "prompt_encoder.point", "prompt_encoder.no_mask")) for k in used_sam)
    converted = _materialise(plan)
    assert torch.equal(converted["prompt_encoder.no_mask_embed.weight"], tuned.prompt_encoder.no_mask_embed.weight)
    hf = SamModel(tiny["config"]).eval()
    hf.load_state_dict(converted, strict=True)
    a = meta_language_logits(tuned, tiny["pixels"], tiny["language"])
    b = _Head(hf).sam_mask_logits(tiny["pixels"], tiny["language"])
    assert _maxdiff(a, b) <= TOL


# --------------------------------------------------------------------------------------------------
# Opening Meta's checkpoint; the declared input
# --------------------------------------------------------------------------------------------------


def test_open_sam_checkpoint_forms(tiny, tmp_path):
    sd = tiny["meta"].state_dict()
    assert set(tiny["src"].keys()) == set(sd)
    key = "mask_decoder.iou_token.weight"
    assert torch.equal(tiny["src"].load(key), sd[key])
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model": sd}, wrapped)
    src = open_sam_checkpoint(wrapped)
    assert src.name == "sam" and set(src.keys()) == set(sd) and torch.equal(src.load(key), sd[key])
    with pytest.raises(MissingInput):
        open_sam_checkpoint(tmp_path / "absent.pth")
    with pytest.raises(UnreadableFile, match="folder"):
        open_sam_checkpoint(tmp_path)
    junk = tmp_path / "junk.pth"
    torch.save({"step": 3}, junk)
    with pytest.raises(UnreadableFile, match="not a SAM checkpoint"):
        open_sam_checkpoint(junk)


def test_open_sam_and_inputs(tiny):
    (opt,) = sam_inputs()
    assert opt.name == "sam" and opt.kind == "path" and opt.flag == "--sam"
    assert sam_inputs("lisa-hf-to-native")[0].commands[-1] == "lisa-hf-to-native"
    with pytest.raises(MissingInput, match="--sam is required"):
        open_sam(SimpleNamespace(sam=None, allow_unsafe_pickle=False), [])
    with pytest.raises(WrongFamily, match="none of the official presets"):
        open_sam(SimpleNamespace(sam=tiny["path"], allow_unsafe_pickle=False), [])


def test_rules_table_reads_only_meta():
    assert all(r.source.startswith("sam:") for r in SAM_RULES)
