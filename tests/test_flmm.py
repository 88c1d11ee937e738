"""The F-LMM family on tiny models built from configs (``maskport.testing.flmm``), against independent
implementations:

- the attention rows the export's hook attention records (sdpa elsewhere) vs transformers' own eager attention
  (``output_attentions=True``) of the same LLaVA; the recorded hidden states vs ``output_hidden_states``;
- the exported U-Net vs a reference forward written here, functionally, from mmseg's UNet / F-LMM's ``UNetHead``
  semantics, reading the checkpoint's tensors under mmseg's names;
- the SAM refinement vs Meta's ``segment_anything`` run as F-LMM's ``SAMWrapper`` runs it (ResizeLongestSide,
  box from the coarse mask, coarse logits as the mask prompt, text embeddings as extra sparse tokens);
- ``ground`` end to end vs the three references chained, with F-LMM's RefCOCO input layout and image preprocessing
  written here with transformers' image transforms;
- the conversion (every tensor accounted for, golden hashes and mapping), the export loading and grounding in a
  process where maskport cannot be imported.

Parity with F-LMM's own code (its repository, its pinned versions) is not tested here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

pytest.importorskip("segment_anything")

from maskport.convert.api import convert_mmengine_to_hf  # noqa: E402
from maskport.errors import MissingInput, ShapeMismatch  # noqa: E402
from maskport.testing import flmm as tf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PHRASES = ["a red cat", "the dog on the left"]
PROMPT = "USER: <image>\nPlease give me a description of the image. ASSISTANT:"  # xtuner's vicuna INSTRUCTION


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return tf.make_flmm_fixture(tmp_path_factory.mktemp("flmm"))


@pytest.fixture(scope="module")
def export(fx):
    out = fx.root / "export"
    res = convert_mmengine_to_hf(fx.ckpt, base=fx.base_dir, sam=fx.sam_pth, out=out, dtype="fp32", progress=False,
                                 log=lambda *a, **k: None)
    return res, out


@pytest.fixture(scope="module")
def model(export):
    from transformers import AutoModel

    m, info = AutoModel.from_pretrained(export[1], trust_remote_code=True, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return m.eval()


@pytest.fixture(scope="module")
def tok(export):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(export[1], trust_remote_code=True)


@pytest.fixture(scope="module")
def eager_lmm(fx):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(fx.base_dir, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def meta_sam(fx):
    return _meta_sam_of(fx)


def _meta_sam_of(fx):
    """Meta's Sam with F-LMM's trained prompt encoder and mask decoder (the checkpoint's) and Meta's image encoder."""
    sam = tf.tiny_meta_sam()
    state = dict(fx.meta_sam_state)
    state.update({k[len("sam.model."):]: v for k, v in fx.ckpt_state.items() if k.startswith("sam.model.")})
    sam.load_state_dict(state, strict=True)
    return sam.eval()


def _image(seed=1, size=(90, 120)):
    return Image.fromarray((np.random.RandomState(seed).rand(*size, 3) * 255).astype("uint8"))


# ------------------------------------------------------------------------------------------------ references
def ref_unet(sd: dict, x: torch.Tensor, stages: int, upsample_input: int = 64) -> torch.Tensor:
    """mmseg's UNet (GroupNorm(1), ReLU, max-pool down, InterpConv up) inside F-LMM's UNetHead, functionally."""
    def cm(prefix, t, k):
        t = F.conv2d(t, sd[f"mask_head.{prefix}.conv.weight"], padding=k // 2)
        t = F.group_norm(t, 1, sd[f"mask_head.{prefix}.gn.weight"], sd[f"mask_head.{prefix}.gn.bias"], eps=1e-5)
        return torch.relu(t)

    x = x / x.sum((-2, -1), keepdim=True).clamp(min=1e-12)
    h, w = x.shape[-2:]
    x = F.interpolate(x, scale_factor=max(1.0, upsample_input / max(h, w)), mode="bilinear")
    h, w = x.shape[-2:]
    div = 2 ** (stages - 1)
    padded = x.new_zeros(*x.shape[:2], -(-h // div) * div, -(-w // div) * div)
    padded[..., :h, :w] = x
    x, outs = padded, []
    for i in range(stages):
        if i:
            x = F.max_pool2d(x, 2)
        for j in range(2):
            x = cm(f"encoder.{i}.{0 if i == 0 else 1}.convs.{j}", x, 3)
        outs.append(x)
    for k in reversed(range(stages - 1)):
        up = F.interpolate(x, size=[2 * s for s in x.shape[-2:]], mode="bilinear", align_corners=False)
        x = torch.cat([outs[k], cm(f"decoder.{k}.upsample.interp_upsample.1", up, 1)], dim=1)
        for j in range(2):
            x = cm(f"decoder.{k}.conv_block.convs.{j}", x, 3)
    x = x[..., :h, :w]
    return F.conv2d(x, sd["mask_head.conv_seg.weight"], sd["mask_head.conv_seg.bias"])[:, 0]


def ref_refine(sam, image: Image.Image, coarse: torch.Tensor, text_embeds) -> torch.Tensor:
    """F-LMM's SAMWrapper.forward (box + mask + text prompts, multimask_output=False), on Meta's Sam."""
    from segment_anything.utils.transforms import ResizeLongestSide

    size = sam.image_encoder.img_size
    transform = ResizeLongestSide(size)
    arr = np.array(image.convert("RGB"))
    inp = transform.apply_image(arr)
    feats = sam.image_encoder(sam.preprocess(torch.as_tensor(inp).permute(2, 0, 1)[None].float()))
    input_size, original = inp.shape[:2], arr.shape[:2]
    side = 4 * sam.prompt_encoder.image_embedding_size[0]
    pm = F.interpolate(coarse[:, None].float(), size=input_size, mode="bilinear")
    pm = F.pad(pm, (0, size - input_size[1], 0, size - input_size[0]), value=min(-1.0, coarse.min().item()))
    pm = F.interpolate(pm, size=(side, side), mode="bilinear")
    binary = (F.interpolate(coarse[None].float().sigmoid(), size=original, mode="bilinear")[0] > 0.5).float()
    out = []
    for p in range(coarse.shape[0]):
        m = binary[p].numpy()
        if m.sum() > 0:
            ys, xs = np.where(m > 0)
            box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        else:
            box = np.array([0.0, 0.0, original[1], original[0]])
        box = torch.as_tensor(transform.apply_boxes(box, original), dtype=torch.float32)[None]
        sparse, dense = sam.prompt_encoder(points=None, boxes=box, masks=pm[p].view(1, 1, side, side))
        sparse = torch.cat([sparse, text_embeds[p][None]], dim=1)
        low, _ = sam.mask_decoder(image_embeddings=feats, image_pe=sam.prompt_encoder.get_dense_pe(),
                                  sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                  multimask_output=False)
        out.append(sam.postprocess_masks(low, input_size, original)[0, 0])
    return torch.stack(out)


def ref_llava_inputs(image: Image.Image, size: int):
    """F-LMM's CustomLlavaImageProcessor: longer side to ``size`` (transformers' resize, bicubic), centred on a
    mean-filled square, rescaled, CLIP-normalised; with its padding meta."""
    from transformers.image_transforms import normalize, rescale, resize
    from transformers.image_utils import PILImageResampling

    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    arr = np.array(image.convert("RGB"))
    h, w = arr.shape[:2]
    shape = (size, int(w * size / h)) if h > w else (int(h * size / w), size)
    arr = resize(arr, shape, resample=PILImageResampling.BICUBIC)
    h, w = arr.shape[:2]
    canvas = np.ones((size, size, 3), dtype=arr.dtype) * np.array([int(x * 255) for x in mean], dtype=arr.dtype)
    bh, bw = (size - h) // 2, (size - w) // 2
    canvas[bh:bh + h, bw:bw + w] = arr
    x = normalize(rescale(canvas, 1 / 255), mean, std)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None].float(), (bh, bw, h, w)


def _with_phrases(ids: list[int], tok, phrases):
    """F-LMM's RefCOCO2PNG layout: after the prompt, each phrase's tokens then a '.' token; mask ids per token."""
    ids, mask_ids = list(ids), [-1] * len(ids)
    sep = tok.encode(".", add_special_tokens=False)[-1]
    for n, p in enumerate(phrases):
        seg = tok.encode(p, add_special_tokens=False)
        ids += seg + [sep]
        mask_ids += [n] * len(seg) + [-1]
    return ids, mask_ids


def ref_ground(fx, eager_lmm, meta_sam, tok, image, phrases):
    """F-LMM's FrozenLlavaSAM._forward with eager attention, on the base, the checkpoint and Meta's SAM."""
    cfg = eager_lmm.config
    image_id = cfg.image_token_id
    ids = tok.encode(PROMPT, add_special_tokens=True)
    at = ids.index(image_id)
    ids, mask_ids = _with_phrases(ids[:at] + [image_id] * cfg.image_seq_length + ids[at + 1:], tok, phrases)
    pixel_values, (bh, bw, h, w) = ref_llava_inputs(image, cfg.vision_config.image_size)
    size = cfg.vision_config.image_size
    grid = size // cfg.vision_config.patch_size
    return _ref_rest(fx, eager_lmm, meta_sam, image, ids, mask_ids, {"pixel_values": pixel_values}, (grid, grid),
                     (bh, bw, h, w), (size, size))


def ref_ground_qwen(fx, eager_qwen, meta_sam, tok, image, phrases):
    """The same on a Qwen2.5-VL base: Qwen's chat prompt (default system prompt, the image block first in the user
    turn) expanded by transformers' Qwen2.5-VL processor, the merged-token grid from ``image_grid_thw``, no
    padding."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor

    from maskport.testing.sa2va_qwen2_5_vl import IMAGE_MAX_PIXELS, IMAGE_MIN_PIXELS

    from transformers import Qwen2VLVideoProcessor

    proc = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=IMAGE_MIN_PIXELS,
                                                                     max_pixels=IMAGE_MAX_PIXELS),
                               tokenizer=tok, video_processor=Qwen2VLVideoProcessor())
    prompt = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
              "<|image_pad|><|vision_end|>Please give me a description of the image.<|im_end|>\n"
              "<|im_start|>assistant\n")
    enc = proc(text=[prompt], images=[image], return_tensors="pt")
    ids, mask_ids = _with_phrases(enc["input_ids"][0].tolist(), tok, phrases)
    _, gh, gw = enc["image_grid_thw"][0].tolist()
    side = (gh * 14, gw * 14)
    return _ref_rest(fx, eager_qwen, meta_sam, image, ids, mask_ids,
                     {"pixel_values": enc["pixel_values"], "image_grid_thw": enc["image_grid_thw"]},
                     (gh // 2, gw // 2), (0, 0, *side), side)


def _ref_rest(fx, eager_lmm, meta_sam, image, ids, mask_ids, mm, grid, crop, padded):
    cfg = eager_lmm.config
    image_id = cfg.image_token_id
    bh, bw, h, w = crop
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = eager_lmm.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), output_attentions=True,
                              output_hidden_states=True, **mm)
    layers = cfg.text_config.num_hidden_layers
    image_cols = input_ids[0] == image_id
    attentions = [a[0][..., image_cols].view(*a.shape[1:3], *grid) for a in out.attentions]
    # transformers <= 4.40's hidden_states[-L:]: outputs of layers 0..L-2, then the final norm's output
    hs = list(out.hidden_states[1:layers]) + [out.last_hidden_state]
    weights = torch.softmax(fx.ckpt_state["text_layer_weights"], 0)
    mask_ids = torch.tensor(mask_ids)
    attn, embeds = [], []
    for n in range(int(mask_ids.max()) + 1):
        matched = mask_ids == n
        attn.append(torch.cat([a[:, matched].mean(1) for a in attentions]))
        states = torch.stack([x[0, matched] for x in hs])
        embeds.append((states * weights.view(-1, 1, 1)).sum(0) @ fx.ckpt_state["text_proj.weight"].T
                      + fx.ckpt_state["text_proj.bias"])
    with torch.no_grad():
        pred = ref_unet(fx.ckpt_state, torch.stack(attn), tf.STAGES)
        ph, pw = pred.shape[-2:]
        top, left = int(bh * ph / padded[0]), int(bw * pw / padded[1])
        pred = pred[:, top:top + int(h * ph / padded[0] + 0.5), left:left + int(w * pw / padded[1] + 0.5)]
        return pred, ref_refine(meta_sam, image, pred, embeds), attn, embeds


# ------------------------------------------------------------------------------------------------ conversion
def test_every_tensor_accounted_for(export, fx):
    res, out = export
    report = res.report
    assert res.family == "flmm"
    cov = report["coverage"]
    assert cov["unaccounted"] == []
    assert all(c["unaccounted"] == 0 and c["used"] + c["dropped"] == c["tensors"] for c in cov["sources"].values())
    used = {s for t in report["targets"] for s in t["sources"]}
    dropped = {d["source"]: d["reason"] for d in report["dropped"]}
    ckpt_keys = {f"ckpt:{k}" for k in fx.ckpt_state}
    sam_keys = {f"sam:{k}" for k in fx.meta_sam_state}
    assert ckpt_keys | sam_keys <= used | set(dropped)
    # the trained prompt encoder / mask decoder supersede Meta's; the checkpoint's frozen PE buffer is checked equal
    assert "sam:mask_decoder.iou_token.weight" in dropped and "sam:prompt_encoder.no_mask_embed.weight" in dropped
    pe = "ckpt:sam.model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
    assert "checked equal" in dropped[pe]
    assert "sam:image_encoder.patch_embed.proj.weight" in used
    assert all(reason for reason in dropped.values())
    from tests.golden import check_export, check_mapping_tsv

    check_export("flmm/tiny", out)
    check_mapping_tsv(ROOT / "docs" / "families" / "flmm.mapping.tsv", report)


def test_exported_tensors_are_the_inputs(export, fx, model):
    sd = model.state_dict()
    ck = fx.ckpt_state
    assert torch.equal(sd["mask_head.encoder.1.convs.0.conv.weight"], ck["mask_head.encoder.1.1.convs.0.conv.weight"])
    assert torch.equal(sd["mask_head.decoder.0.upsample.norm.bias"],
                       ck["mask_head.decoder.0.upsample.interp_upsample.1.gn.bias"])
    assert torch.equal(sd["sam.mask_decoder.iou_token.weight"], ck["sam.model.mask_decoder.iou_token.weight"])
    assert not torch.equal(sd["sam.mask_decoder.iou_token.weight"], fx.meta_sam_state["mask_decoder.iou_token.weight"])
    assert torch.equal(sd["sam.vision_encoder.pos_embed"], fx.meta_sam_state["image_encoder.pos_embed"])
    assert torch.equal(sd["text_layer_weights"], ck["text_layer_weights"])


def test_deepspeed_zero2_folder_input(fx, tmp_path):
    """A ZeRO-2 folder as xtuner saves F-LMM (``iter_N.pth/`` with ``latest`` naming the tag folder holding
    ``mp_rank_00_model_states.pt``, whose ``module`` is the bf16 module state: trainable tensors and buffers) converts
    to the tensors of the single-file checkpoint rounded to bf16."""
    from safetensors.torch import load_file

    folder = tmp_path / "iter_10.pth"
    (folder / "global_step10").mkdir(parents=True)
    (folder / "latest").write_text("global_step10")
    module = {k: v.to(torch.bfloat16) for k, v in fx.ckpt_state.items()}
    torch.save({"module": module, "ds_config": {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}},
               folder / "global_step10" / "mp_rank_00_model_states.pt")
    res = convert_mmengine_to_hf(folder, base=fx.base_dir, sam=fx.sam_pth, out=tmp_path / "out", dtype="fp32",
                                 progress=False, log=lambda *a, **k: None)
    assert res.family == "flmm" and res.report["coverage"]["unaccounted"] == []
    got = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        got.update(load_file(str(f)))
    assert torch.equal(got["text_proj.weight"], module["text_proj.weight"].float())
    assert torch.equal(got["mask_head.decoder.1.block.convs.1.conv.weight"],
                       module["mask_head.decoder.1.conv_block.convs.1.conv.weight"].float())
    assert torch.equal(got["sam.prompt_encoder.mask_embed.conv1.weight"],
                       module["sam.model.prompt_encoder.mask_downscaling.0.weight"].float())


def test_wrong_base_and_missing_sam_are_refused(fx, tmp_path):
    import shutil

    bad = tmp_path / "base"
    shutil.copytree(fx.base_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["text_config"]["num_attention_heads"] = 2
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ShapeMismatch, match="attention maps"):
        convert_mmengine_to_hf(fx.ckpt, base=bad, sam=fx.sam_pth, out=None, dry_run=True, progress=False,
                               log=lambda *a, **k: None)
    with pytest.raises(MissingInput, match="--sam"):
        convert_mmengine_to_hf(fx.ckpt, base=fx.base_dir, out=None, dry_run=True, progress=False,
                               log=lambda *a, **k: None)


# ------------------------------------------------------------------------------------------------ oracles
def test_attention_rows_match_eager_attention(model, eager_lmm, tok):
    """The hook attention's rows (sdpa for the outputs) = transformers' eager attention probabilities, fp32."""
    mod = sys.modules[type(model).__module__]
    image_id = eager_lmm.config.image_token_id
    ids = model._prompt_ids(tok, "<image>\nWhat is in the picture? a red cat and the dog.",
                            (tf.VISION_SIZE // tf.PATCH) ** 2)
    input_ids = torch.tensor([ids])
    pixel_values = torch.randn(1, 3, tf.VISION_SIZE, tf.VISION_SIZE, generator=torch.Generator().manual_seed(3))
    rows = torch.tensor([2, len(ids) - 5, len(ids) - 3, len(ids) - 1])
    cols = torch.nonzero(input_ids[0] == image_id, as_tuple=True)[0]
    recorder = mod.AttentionRowsRecorder(rows, cols)
    hidden = {}
    with torch.no_grad():
        with mod.recording_attention_rows(model.text_model, recorder), \
                mod.recording_hidden_rows(model.text_model, rows, hidden):
            model.mllm.model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=torch.ones_like(input_ids))
        ref = eager_lmm.model(input_ids=input_ids, pixel_values=pixel_values,
                              attention_mask=torch.ones_like(input_ids), output_attentions=True,
                              output_hidden_states=True)
    assert model.text_model.config._attn_implementation != mod.ROWS_ATTENTION  # restored
    assert len(recorder.maps) == tf.LAYERS
    for layer in range(tf.LAYERS):
        want = ref.attentions[layer][:, :, rows][..., cols]
        got = recorder.maps[layer]
        assert got.shape == want.shape == (1, tf.HEADS, len(rows), len(cols))
        assert (got - want).abs().max() <= 1e-5, (layer, (got - want).abs().max())
        assert want.sum() > 0.01  # the image columns carry attention
    for layer in range(tf.LAYERS - 1):
        assert (hidden[layer] - ref.hidden_states[layer + 1][:, rows]).abs().max() <= 1e-5
    last = ref.last_hidden_state[:, rows]  # F-LMM's last entry: the final norm's output
    assert (hidden[tf.LAYERS - 1] - last).abs().max() <= 1e-5


def test_attention_rows_match_eager_attention_on_qwen2_5_vl(model, tmp_path):
    """The same hook attention on transformers' Qwen2.5-VL (M-RoPE positions, grouped KV heads, windowed vision
    tower): rows = eager attention's, fp32 (the check a Qwen2.5-VL base needs first; its mapping is not written)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from maskport.testing.sa2va_qwen2_5_vl import make_qwen_processor, tiny_qwen2_5_vl_config
    from maskport.testing.tokenizers import make_tiny_tokenizer

    mod = sys.modules[type(model).__module__]
    tok = make_tiny_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    cfg = tiny_qwen2_5_vl_config(len(tok))
    cfg.text_config._attn_implementation = "sdpa"
    qwen = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    eager = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    eager.load_state_dict(qwen.state_dict())
    eager.model.language_model.config._attn_implementation_internal = "eager"
    proc = make_qwen_processor(tok)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a red cat and the dog."}]}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    inputs = proc(text=[text], images=[_image(3, (84, 112))], return_tensors="pt")
    ids = inputs["input_ids"]
    cols = torch.nonzero(ids[0] == cfg.image_token_id, as_tuple=True)[0]
    rows = torch.tensor([1, int(cols[-1]) + 2, ids.shape[1] - 4, ids.shape[1] - 1])
    recorder = mod.AttentionRowsRecorder(rows, cols)
    hidden = {}
    with torch.no_grad():
        with mod.recording_attention_rows(qwen.model.language_model, recorder), \
                mod.recording_hidden_rows(qwen.model.language_model, rows, hidden):
            qwen.model(**inputs)
        ref = eager.model(**inputs, output_attentions=True)
    layers = cfg.text_config.num_hidden_layers
    assert len(recorder.maps) == layers and cols.numel() > 4
    for layer in range(layers):
        want = ref.attentions[layer][:, :, rows][..., cols]
        assert (recorder.maps[layer] - want).abs().max() <= 1e-5, (layer, (recorder.maps[layer] - want).abs().max())
        assert want.sum() > 0.01
    assert (hidden[layers - 1] - ref.last_hidden_state[:, rows]).abs().max() <= 1e-5


def test_mask_head_matches_reference_unet(model, fx):
    g = torch.Generator().manual_seed(5)
    for shape in [(2, tf.LAYERS * tf.HEADS, 4, 4), (1, tf.LAYERS * tf.HEADS, 3, 5)]:
        x = torch.rand(shape, generator=g)
        with torch.no_grad():
            got = model.mask_head(x)
            want = ref_unet(fx.ckpt_state, x, tf.STAGES)
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 1e-5, (got - want).abs().max()
        assert want.std() > 1e-3


def test_refinement_matches_segment_anything(model, meta_sam):
    image = _image(2, (70, 100))
    g = torch.Generator().manual_seed(7)
    # coarse logits: one blob-shaped mask (a box from it) and one all-negative (the whole-image box)
    yy, xx = torch.meshgrid(torch.arange(40.0), torch.arange(56.0), indexing="ij")
    blob = 4.0 - ((yy - 15) ** 2 + (xx - 30) ** 2) / 40
    coarse = torch.stack([blob, -3.0 - torch.rand(40, 56, generator=g)])
    text = [torch.randn(3, tf.SAM_D, generator=g), torch.randn(2, tf.SAM_D, generator=g)]
    with torch.no_grad():
        got = model.refine(image, coarse, text)
        want = ref_refine(meta_sam, image, coarse, text)
    assert got.shape == want.shape == (2, 70, 100)
    assert (got - want).abs().max() <= 2e-4, (got - want).abs().max()


def test_ground_matches_the_references_end_to_end(model, tok, fx, eager_lmm, meta_sam):
    image = _image(1, (90, 120))
    out = model.ground(image=image, phrases=PHRASES, tokenizer=tok, return_coarse=True)
    coarse, refined, _, _ = ref_ground(fx, eager_lmm, meta_sam, tok, image, PHRASES)
    assert out["phrases"] == PHRASES and len(out["prediction_masks"]) == 2
    assert out["coarse_logits"].shape == coarse.shape
    assert (out["coarse_logits"] - coarse).abs().max() <= 1e-4, (out["coarse_logits"] - coarse).abs().max()
    assert (out["sam_logits"] - refined).abs().max() <= 5e-4, (out["sam_logits"] - refined).abs().max()
    for m, r in zip(out["prediction_masks"], refined):
        assert m.shape == (1, 90, 120) and m.dtype == bool
        clear = r.abs() > 1e-3
        assert np.array_equal(m[0][clear.numpy()], (r > 0)[clear].numpy())


def test_qwen2_5_vl_base_converts_and_grounds_as_the_references(tmp_path_factory):
    """A Qwen2.5-VL base (legacy layout, lm_head tied and not saved): 0 unaccounted tensors, strict load, and
    ``ground`` = eager Qwen2.5-VL + the reference U-Net + Meta's SAM."""
    from transformers import AutoModel, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    fxq = tf.make_flmm_fixture(tmp_path_factory.mktemp("flmm_qwen"), base="qwen2_5_vl")
    out = fxq.root / "export"
    res = convert_mmengine_to_hf(fxq.ckpt, base=fxq.base_dir, sam=fxq.sam_pth, out=out, dtype="fp32",
                                 progress=False, log=lambda *a, **k: None)
    assert res.report["coverage"]["unaccounted"] == [] and any("ties lm_head" in n for n in res.notes)
    from tests.golden import check_export

    check_export("flmm/tiny-qwen2_5_vl", out)
    m, info = AutoModel.from_pretrained(out, trust_remote_code=True, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    m = m.eval()
    assert torch.equal(m.mllm.lm_head.weight, m.mllm.model.language_model.embed_tokens.weight)
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    eager = Qwen2_5_VLForConditionalGeneration.from_pretrained(fxq.base_dir, attn_implementation="eager").eval()
    image = _image(8, (90, 120))
    got = m.ground(image=image, phrases=PHRASES, tokenizer=tok, return_coarse=True)
    coarse, refined, _, _ = ref_ground_qwen(fxq, eager, _meta_sam_of(fxq), tok, image, PHRASES)
    assert got["coarse_logits"].shape == coarse.shape
    assert (got["coarse_logits"] - coarse).abs().max() <= 1e-4, (got["coarse_logits"] - coarse).abs().max()
    assert (got["sam_logits"] - refined).abs().max() <= 5e-4, (got["sam_logits"] - refined).abs().max()
    assert coarse.std() > 1e-3 and (refined > 0).any() and (refined < 0).any()


def test_ground_in_text_and_predict_forward_agree(model, tok):
    image = _image(4, (64, 48))

    class FakeNLP:  # spaCy's interface: .noun_chunks of the parsed text
        def __call__(self, text):
            words = text.split()
            chunk = type("Chunk", (), {"text": " ".join(words[:2]) if len(words) > 1 else text})
            return type("Doc", (), {"noun_chunks": [chunk]})

    res = model.predict_forward(image=image, text="Describe the picture.", tokenizer=tok, max_new_tokens=6,
                                nlp=FakeNLP(), return_coarse=True)
    assert res["prediction"] and len(res["phrases"]) == len(res["prediction_masks"]) == 1
    again = model.ground(image=image, phrases=res["phrases"], text=res["prediction"], tokenizer=tok,
                         question="Describe the picture.", return_coarse=True)
    assert torch.equal(again["sam_logits"], res["sam_logits"])
    assert np.array_equal(again["prediction_masks"][0], res["prediction_masks"][0])


def test_predict_forward_ground_prefix_and_verify(model, tok, export, tmp_path):
    """``predict_forward(text="ground: ...")`` is ``ground`` (no generation), so ``maskport verify`` runs F-LMM's
    referring segmentation on exports: the export against itself agrees exactly."""
    from maskport.verify.api import verify
    from maskport.verify.samples import Sample

    image = _image(6, (80, 100))
    via = model.predict_forward(image=image, text="ground: the dog on the left", tokenizer=tok,
                                return_probabilities=True)
    direct = model.ground(image=image, phrases=["the dog on the left"], tokenizer=tok, return_probabilities=True)
    assert via["prediction"] == "the dog on the left"
    assert np.array_equal(via["prediction_masks"][0], direct["prediction_masks"][0])
    assert np.array_equal(via["prediction_probabilities"][0], direct["prediction_probabilities"][0])
    image.save(tmp_path / "a.png")
    _image(7, (60, 90)).save(tmp_path / "b.png")
    samples = [Sample("a", tmp_path / "a.png", "ground: a red cat"), Sample("b", tmp_path / "b.png", "ground: the dog")]
    res = verify(export[1], export[1], samples, device="cpu", progress=False)
    assert res.exit_code == 0, res.failures
    assert [(s["ref"]["n_masks"], s["cand"]["n_masks"], s["dice"]) for s in res.samples] == [(1, 1, 1.0)] * 2
    assert [s["ref"]["answer"] for s in res.samples] == ["a red cat", "the dog"]


def test_noun_phrase_selection(model):
    mod = sys.modules[type(model).__module__]
    text = "A man holds the red umbrella next to it and a dog in the image."
    chunks = ["the red umbrella", "red umbrella", "it", "a dog", "A man", "the image", "a dog"]
    assert mod.select_noun_phrases(chunks, text) == ["A man", "the red umbrella", "a dog"]
    with pytest.raises(ValueError, match="spacy.load"):
        mod.noun_phrases(text)


def test_ground_input_errors(model, tok):
    with pytest.raises(ValueError, match="pip install spacy"):
        model.predict_forward(image=_image(), text="Describe the picture.", tokenizer=tok, max_new_tokens=2)
    with pytest.raises(ValueError, match="phrases"):
        model.ground(image=_image(), phrases=[], tokenizer=tok)
    with pytest.raises(ValueError, match="does not occur"):
        model.ground(image=_image(), phrases=["zebra"], text="a cat", tokenizer=tok)


# ------------------------------------------------------------------------------------------------ deployment
WITHOUT_MASKPORT = textwrap.dedent('''
    import builtins, json, sys
    real_import = builtins.__import__
    def guard(name, *a, **k):
        if name == "maskport" or name.startswith("maskport."):
            raise ImportError("maskport is blocked in this process")
        return real_import(name, *a, **k)
    builtins.__import__ = guard
    try:
        import maskport  # noqa: F401
        raise SystemExit("maskport importable")
    except ImportError:
        pass
    import numpy as np
    from PIL import Image
    from transformers import AutoModel, AutoTokenizer
    d = sys.argv[1]
    model, info = AutoModel.from_pretrained(d, trust_remote_code=True, output_loading_info=True)
    tok = AutoTokenizer.from_pretrained(d, trust_remote_code=True)
    img = Image.fromarray((np.random.RandomState(1).rand(90, 120, 3) * 255).astype("uint8"))
    out = model.eval().ground(image=img, phrases=json.loads(sys.argv[2]), tokenizer=tok, return_coarse=True)
    print(json.dumps({"missing": list(info["missing_keys"]), "unexpected": list(info["unexpected_keys"]),
                      "sam_logits": out["sam_logits"].numpy().round(5).tolist(),
                      "masks": [[str(m.dtype), list(m.shape), int(m.sum())] for m in out["prediction_masks"]]}))
''')


def test_export_grounds_in_a_process_without_maskport(export, model, tok, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONNOUSERSITE": "1"}
    r = subprocess.run([sys.executable, "-c", WITHOUT_MASKPORT, str(export[1]), json.dumps(PHRASES)],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["missing"] == [] and got["unexpected"] == []
    here = model.ground(image=_image(1, (90, 120)), phrases=PHRASES, tokenizer=tok, return_coarse=True)
    assert np.abs(np.array(got["sam_logits"]) - here["sam_logits"].numpy()).max() <= 1e-4
    assert got["masks"] == [["bool", [1, 90, 120], int(m.sum())] for m in here["prediction_masks"]]
