"""Family ``lisa``: a tiny LISA (maskport.testing.lisa) converted from every input form, checked against independent
implementations: peft's un-merged LoRA model (LLM logits), Meta's ``segment_anything`` (SAM mask logits),
transformers' own CLIP model and PIL-backend CLIP image processor, SentencePiece itself (the prompt ids LISA's slow
tokenizer gives), and a hand-written forward of LISA's ``evaluate`` semantics (``[SEG]`` offset -1, the embedding as
the only sparse prompt, ``multimask_output=False``, ``postprocess_masks``, ``logits > 0``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("segment_anything")
pytest.importorskip("peft")
pytest.importorskip("sentencepiece")

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")


@pytest.fixture(scope="module")
def lfx(tmp_path_factory):
    from maskport.testing.lisa import make_lisa_fixture

    return make_lisa_fixture(tmp_path_factory.mktemp("lisa_fx"), seed=0)


def _convert(lfx, src, out, **kw):
    from maskport.convert.api import convert_mmengine_to_hf

    return convert_mmengine_to_hf(src, out=out, progress=False, **kw)


@pytest.fixture(scope="module")
def lisa_export(lfx, tmp_path_factory):
    """The DeepSpeed folder (the whole module, frozen parts included) converted in fp32; --base/--clip/--sam given
    too (their tensors are then dropped as superseded)."""
    from tests.golden import check_export

    out = tmp_path_factory.mktemp("lisa_exports") / "lisa-ds"
    res = _convert(lfx, lfx.ds_dir, out, base=lfx.base_dir, clip=lfx.clip_dir, sam=lfx.sam_pth)
    check_export("lisa/deepspeed-zero2", out)
    return res


@pytest.fixture(scope="module")
def lisa_model(lisa_export):
    from transformers import AutoModel, AutoTokenizer

    model, info = AutoModel.from_pretrained(lisa_export.out_dir, trust_remote_code=True, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    tok = AutoTokenizer.from_pretrained(lisa_export.out_dir, trust_remote_code=True)
    return model.eval(), tok


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _image(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.RandomState(seed)
    base = rng.rand(h // 8 + 1, w // 8 + 1, 3)
    arr = np.kron(base, np.ones((8, 8, 1)))[:h, :w] * 200 + rng.rand(h, w, 3) * 55
    return Image.fromarray(arr.astype(np.uint8))


# ------------------------------------------------------------------------------------------------ conversion


def test_every_tensor_accounted_for(lisa_export):
    cov = lisa_export.report["coverage"]
    assert all(c["unaccounted"] == 0 for c in cov["sources"].values()), cov
    assert cov["sources"]["base"]["used"] == 0
    # the checkpoint's only drops: the persistent buffers transformers 4.31 saved (RoPE inv_freq, CLIP position_ids)
    ckpt_drops = sorted(d["source"] for d in lisa_export.report["dropped"] if d["source"].startswith("ckpt:"))
    assert ckpt_drops == ["ckpt:model.layers.0.self_attn.rotary_emb.inv_freq",
                          "ckpt:model.layers.1.self_attn.rotary_emb.inv_freq",
                          "ckpt:model.vision_tower.vision_tower.vision_model.embeddings.position_ids"]
    ops = cov["ops"]
    assert "lora_merge" in json.dumps(ops)
    cfg = json.loads((lisa_export.out_dir / "config.json").read_text())
    assert cfg["model_type"] == "maskport_lisa" and cfg["mllm_config"]["projector_hidden_act"] == "linear"
    assert cfg["mllm_config"]["vision_feature_layer"] == -2
    assert cfg["mllm_config"]["vision_feature_select_strategy"] == "default"


def test_projector_is_lisas_linear_exactly(lfx, lisa_model):
    model, _ = lisa_model
    proj = model.mllm.model.multi_modal_projector
    x = torch.randn(3, 7, proj.linear_1.in_features)
    assert torch.equal(proj(x), lfx.projector(x))
    assert torch.equal(proj.linear_2.weight, torch.eye(proj.linear_2.in_features))


def test_llm_logits_equal_peft_unmerged_lora(lfx, lisa_model):
    model, _ = lisa_model
    ids = torch.tensor([[1, 50, 7, 400, 401, 402, 399, 3, 120, 2]])
    with torch.no_grad():
        want = lfx.peft_model(input_ids=ids).logits
        got = model.mllm(input_ids=ids).logits
    assert want.shape == got.shape
    assert (want - got).abs().max().item() <= 1e-4, (want - got).abs().max().item()


def test_sam_mask_logits_equal_meta(lfx, lisa_model):
    """The export's SAM prompted LISA's way vs Meta's modules with the trained decoder (<= 1e-4, fp32)."""
    from segment_anything.utils.transforms import ResizeLongestSide

    model, _ = lisa_model
    sam = lfx.meta_sam
    img = _image(90, 70, 3)
    emb = torch.randn(2, sam.prompt_encoder.embed_dim)
    x, input_size = model.sam_preprocess(img)
    arr = ResizeLongestSide(sam.image_encoder.img_size).apply_image(np.asarray(img))
    ref = sam.preprocess(torch.from_numpy(arr).permute(2, 0, 1).float()[None])
    assert torch.equal(x, ref) and input_size == arr.shape[:2]
    with torch.no_grad():
        got = model.sam_mask_logits(x, emb[None])[0]
        want = _meta_low_res(sam, ref, emb)
    assert (got - want).abs().max().item() <= 1e-4, (got - want).abs().max().item()


def _meta_low_res(sam, pixel_values, emb):
    """LISA's mask path with Meta's modules: sparse = the embeddings alone ([N, 1, D]), dense = no_mask_embed."""
    image_embeddings = sam.image_encoder(pixel_values)
    _, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
    low, _ = sam.mask_decoder(image_embeddings=image_embeddings, image_pe=sam.prompt_encoder.get_dense_pe(),
                              sparse_prompt_embeddings=emb[:, None, :], dense_prompt_embeddings=dense,
                              multimask_output=False)
    return low[:, 0]


def test_zero_to_fp32_shards_equal_the_deepspeed_conversion(lfx, lisa_export, tmp_path):
    """zero_to_fp32 output in several files (safetensors and .bin shards, trainable tensors only: the frozen parts
    come from --base, --clip, --sam) converts to the same tensors as the DeepSpeed folder."""
    from tests.golden import check_mapping_tsv

    want = _tensors(lisa_export.out_dir)
    for src in (lfx.zero_dir, lfx.zero_bin_dir):
        res = _convert(lfx, src, tmp_path / src.name, base=lfx.base_dir, clip=lfx.clip_dir, sam=lfx.sam_pth)
        assert all(c["unaccounted"] == 0 for c in res.report["coverage"]["sources"].values())
        assert res.report["settings"]["frozen_parts_from"] == {"llm": "base", "projector": "base", "clip": "clip",
                                                               "sam": "sam"}
        if src == lfx.zero_dir:  # the mapping every key of the three frozen inputs takes, spelled out
            check_mapping_tsv(ROOT / "docs" / "families" / "lisa.mapping.tsv", res.report)
        got = _tensors(res.out_dir)
        assert sorted(got) == sorted(want)
        for k in want:
            assert torch.equal(got[k], want[k]), k
    # without --sam the run's mask decoder alone cannot make a SAM: one clear error
    from maskport.errors import MissingInput

    with pytest.raises(MissingInput, match="--sam is required"):
        _convert(lfx, lfx.zero_dir, tmp_path / "nosam", base=lfx.base_dir, clip=lfx.clip_dir)


def test_deepspeed_folder_without_extra_inputs(lfx, lisa_export, tmp_path):
    """The DeepSpeed module holds every part (CLIP and SAM too): --base and --clip (for CLIP's configuration, which
    only OpenAI's ViT-L/14 shapes would tell) suffice, the tag folder given directly, and the export is the same."""
    from maskport.errors import MissingInput

    res = _convert(lfx, lfx.ds_dir / "global_step10", tmp_path / "no-sam", base=lfx.base_dir, clip=lfx.clip_dir)
    assert res.report["settings"]["frozen_parts_from"] == {"llm": "ckpt", "projector": "ckpt", "clip": "ckpt",
                                                           "sam": "ckpt"}
    want, got = _tensors(lisa_export.out_dir), _tensors(res.out_dir)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(MissingInput, match="--clip is required"):
        _convert(lfx, lfx.ds_dir, tmp_path / "no-clip", base=lfx.base_dir)


def test_released_folder_import_equals_the_training_conversion(lfx, lisa_export, tmp_path):
    """A released LISA folder (peft's merge_and_unload, .bin shards, no CLIP) through `maskport convert
    lisa-hf-to-native --clip`: the same tensors as the training conversion (the LoRA merge within float32
    rounding), and the same config."""
    from click.testing import CliRunner

    from maskport.cli import main

    out = tmp_path / "released"
    r = CliRunner().invoke(main, ["convert", "lisa-hf-to-native", str(lfx.released_dir), "--clip", str(lfx.clip_dir),
                                  "-o", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "family: lisa" in r.output
    assert "prompt encoding checked against SentencePiece" in r.output
    want, got = _tensors(lisa_export.out_dir), _tensors(out)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.allclose(got[k], want[k], atol=1e-6, rtol=0), k
    a = json.loads((out / "config.json").read_text())
    b = json.loads((lisa_export.out_dir / "config.json").read_text())
    for key in ("mllm_config", "sam_config", "seg_token_id", "template", "image_processor", "added_tokens"):
        assert a[key] == b[key], key
    # without --clip: one line, exit code 2
    r = CliRunner().invoke(main, ["convert", "lisa-hf-to-native", str(lfx.released_dir), "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--clip is required" in r.output


# ------------------------------------------------------------------------------------------------ tokenizer, images


PROBES = ["Please segment the dog.", " leading space", "two  spaces", "tab\tand\nnewline", "Ünï 中文 🙂 42",
          "What is [SEG] here?", "  ", "x", "Sure, it is [SEG].", "USER: ASSISTANT:"]


def test_piece_encoding_equals_sentencepiece(lfx, lisa_model):
    import sentencepiece as spm

    from maskport.families.lisa.remote.modeling_lisa import sentencepiece_ids

    _, tok = lisa_model
    sp = spm.SentencePieceProcessor(model_proto=lfx.sp_model)
    for s in PROBES:
        assert sentencepiece_ids(tok, s) == list(sp.encode(s)), s


def test_prompt_ids_are_lisas(lfx, lisa_model):
    """LISA's chat.py prompt through tokenizer_image_token with its slow tokenizer, written out by hand: BOS +
    sp("<system> USER:") + <im_start> | image | <im_end> + sp("<text> ASSISTANT:") (the space before <im_start> and
    the newline after <im_end> dropped)."""
    import sentencepiece as spm

    from maskport.families.lisa.remote.modeling_lisa import build_prompt, lisa_prompt_ids

    model, tok = lisa_model
    sp = spm.SentencePieceProcessor(model_proto=lfx.sp_model)
    text = "Can you segment the cat in this image?"
    prompt = build_prompt(model.config.template, text)
    assert prompt == SYSTEM + " USER: <im_start><image><im_end>\n" + text + " ASSISTANT:"
    ids = lisa_prompt_ids(tok, prompt, image_placeholder="<image>", image_token_id=0, image_tokens=3,
                          stripped_tokens=["[SEG]", "<im_start>", "<im_end>"])
    want = [1] + sp.encode(SYSTEM + " USER:") + [401, 0, 0, 0, 402] + sp.encode(text + " ASSISTANT:")
    assert ids == want
    # literal added tokens in the text: split out, the whitespace around [SEG] dropped, specials kept as tokens
    ids = lisa_prompt_ids(tok, "a [SEG] b</s>c", image_placeholder="<image>", image_token_id=0, image_tokens=1,
                          stripped_tokens=["[SEG]", "<im_start>", "<im_end>"])
    assert ids == [1] + sp.encode("a") + [400] + sp.encode("b") + [2] + sp.encode("c")
    from maskport.families.lisa.remote.modeling_lisa import split_at_tokens

    assert split_at_tokens("x<im_end><im_end>y", ["<im_end>", "<im"]) == ["x", "<im_end>", "", "<im_end>", "y"]
    # an explicit <image> in the text is used where it is
    assert build_prompt(model.config.template, "look <image> here") == \
        SYSTEM + " USER: look <im_start><image><im_end> here ASSISTANT:"


def test_clip_preprocessing_equals_transformers_pil_processor(lisa_model):
    from transformers import CLIPImageProcessorPil

    from maskport.families.lisa.remote.modeling_lisa import clip_preprocess

    model, _ = lisa_model
    s = model.config.image_processor
    ip = CLIPImageProcessorPil(size={"shortest_edge": s["shortest_edge"]},
                               crop_size={"height": s["crop_size"], "width": s["crop_size"]})
    for hw in [(60, 90), (91, 57), (56, 56), (300, 120)]:
        img = _image(*hw, seed=hw[0])
        assert torch.equal(clip_preprocess(img, s), ip(images=img, return_tensors="pt")["pixel_values"]), hw


# ------------------------------------------------------------------------------------------------ predict_forward


def lisa_reference(lfx, image: Image.Image, text: str, max_new_tokens: int, seg_bias: float):
    """LISA's chat.py + evaluate, written out with the independent pieces: SentencePiece ids, transformers' CLIP
    (PIL processor) -> hidden_states[-2][:, 1:] -> LISA's projector, peft's un-merged LoRA LLM on
    ``inputs_embeds`` (text embeds | image features | text embeds), greedy with the whole sequence recomputed at every
    step (``use_cache=False``; ``seg_bias`` added to the [SEG] logit), the last step's hidden states; the mask
    ``output_ids[:, 1:] == seg`` with the image's extra positions inserted in front (LISA's 255 for 256 image tokens),
    ``text_hidden_fcs``; Meta's SAM: ResizeLongestSide + preprocess, the embedding as the only sparse prompt,
    ``multimask_output=False``, ``postprocess_masks``, ``> 0``."""
    import sentencepiece as spm
    from segment_anything.utils.transforms import ResizeLongestSide
    from transformers import CLIPImageProcessorPil

    sp = spm.SentencePieceProcessor(model_proto=lfx.sp_model)
    seg, eos = lfx.seg_id, 2
    before = [1] + sp.encode(SYSTEM + " USER:") + [401]
    after = [402] + sp.encode(text + " ASSISTANT:")
    vc = lfx.clip_vision.config
    ip = CLIPImageProcessorPil(size={"shortest_edge": vc.image_size},
                               crop_size={"height": vc.image_size, "width": vc.image_size})
    pv = ip(images=image, return_tensors="pt")["pixel_values"]
    llm = lfx.peft_model
    emb = llm.get_input_embeddings()
    with torch.no_grad():
        feats = lfx.projector(lfx.clip_vision(pv, output_hidden_states=True).hidden_states[-2][:, 1:])[0]
        generated: list[int] = []
        hidden = None
        for _ in range(max_new_tokens):
            ids_after = torch.tensor(after + generated)
            x = torch.cat([emb(torch.tensor(before)), feats, emb(ids_after)])[None]
            out = llm(inputs_embeds=x, output_hidden_states=True)
            hidden = out.hidden_states[-1][0]
            logits = out.logits[0, -1].clone()
            logits[seg] += seg_bias
            nxt = int(logits.argmax())
            generated.append(nxt)
            if nxt == eos:
                break
        output_ids = torch.tensor(before + [-200] + after + generated)  # LISA: one IMAGE_TOKEN_INDEX placeholder
        mask = output_ids[1:] == seg
        mask = torch.cat([torch.zeros(feats.shape[0] - 1, dtype=torch.bool), mask])
        pred = lfx.text_hidden_fcs(hidden[mask[: hidden.shape[0]]])
        sam = lfx.meta_sam
        arr = ResizeLongestSide(sam.image_encoder.img_size).apply_image(np.asarray(image))
        x = sam.preprocess(torch.from_numpy(arr).permute(2, 0, 1).float()[None])
        low = _meta_low_res(sam, x, pred)
        logits = sam.postprocess_masks(low[:, None], input_size=arr.shape[:2], original_size=(image.height, image.width))
    return generated, logits[:, 0]


@pytest.mark.parametrize("hw,seg_bias,max_new", [((60, 90), 100.0, 3), ((97, 64), 10.0, 6)])
def test_predict_forward_equals_lisa_reference(lfx, lisa_model, hw, seg_bias, max_new):
    model, tok = lisa_model
    img = _image(*hw, seed=7)
    text = "Please segment the dog."
    gen, ref_logits = lisa_reference(lfx, img, text, max_new, seg_bias)
    out = model.predict_forward(image=img, text=text, tokenizer=tok, max_new_tokens=max_new, return_probabilities=True,
                                generation_kwargs={"sequence_bias": {(lfx.seg_id,): seg_bias}})
    assert out["prediction"] == tok.decode(gen, skip_special_tokens=False).strip()
    n_seg = sum(t == lfx.seg_id for t in gen)
    assert n_seg >= 1 and len(out["prediction_masks"]) == n_seg == ref_logits.shape[0]
    for m, p, ref in zip(out["prediction_masks"], out["prediction_probabilities"], ref_logits):
        assert m.shape == (1, hw[0], hw[1]) and m.dtype == np.bool_
        assert np.abs(p[0] - ref.sigmoid().numpy()).max() <= 1e-4
        clear = ref.abs().numpy() > 1e-4
        assert np.array_equal(m[0][clear], (ref > 0).numpy()[clear]) and clear.mean() > 0.99


def test_seg_state_is_the_one_before_seg(lfx, lisa_model):
    """The embeddings come from the position BEFORE each [SEG] (LISA's offset), not the [SEG] itself: with one
    [SEG] generated last, the at-[SEG] rule would give no state at all."""
    from maskport.families.lisa.remote.modeling_lisa import lisa_seg_positions

    seq = torch.tensor([5, 6, 400, 7, 400])
    assert lisa_seg_positions(seq, 400).tolist() == [1, 3]
    model, tok = lisa_model
    out = model.predict_forward(image=_image(40, 50, 1), text="x", tokenizer=tok, max_new_tokens=1,
                                generation_kwargs={"sequence_bias": {(lfx.seg_id,): 100.0}})
    assert out["prediction"] == "[SEG]" and len(out["prediction_masks"]) == 1
    assert model.predict_forward(text="Hello", tokenizer=tok, max_new_tokens=2)["prediction_masks"] == []


def test_export_predicts_in_a_process_without_maskport(lisa_export, tmp_path):
    from tests.test_convert_e2e import LOAD_WITHOUT_MASKPORT

    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONNOUSERSITE": "1"}
    r = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_MASKPORT, str(lisa_export.out_dir)], capture_output=True,
                       text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["missing"] == [] and got["unexpected"] == [] and got["mismatched"] == []
    assert got["prediction"].count("[SEG]") == len(got["masks"]) >= 1
    assert all(m == ["bool", [1, 150, 200]] for m in got["masks"]) and got["text_only_masks"] == 0


# ------------------------------------------------------------------------------------------------ verify, quantize

FORCE_SEG = {"sequence_bias": {"[SEG]": 100.0}}  # the fixture model is untrained: make it say [SEG]


@pytest.fixture(scope="module")
def lisa_samples(tmp_path_factory):
    from tests.test_quantize import _make_samples

    return _make_samples(tmp_path_factory.mktemp("lisa_samples"), n=3)


def test_verify_passes_on_the_same_export(lisa_export, lisa_samples, tmp_path):
    from click.testing import CliRunner

    from maskport.verify.command import verify_command

    d = lisa_export.out_dir
    r = CliRunner().invoke(verify_command, [str(d), str(d), "--samples", str(lisa_samples), "--report",
                                            str(tmp_path / "rep"), "--device", "cpu", "--max-new-tokens", "2",
                                            "--generation-kwargs", json.dumps(FORCE_SEG), "--no-progress"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["verdict"] == "pass" and rep["summary"]["dice"]["min"] == 1.0
    assert all(rec["ref"]["n_masks"] == 2 for rec in rep["samples"])


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_quantize_keeps_all_but_the_decoder_linears(lisa_export, lisa_samples, tmp_path, method):
    """GPTQ / AWQ 4-bit of the Llama decoder (GPTQModel, CPU): exactly its 14 linears are packed; CLIP, the projector,
    lm_head, SAM and text_hidden_fcs are byte-identical; the result loads and segments."""
    pytest.importorskip("gptqmodel", reason="maskport[quant] (gptqmodel) is not installed")
    from transformers import AutoModel, AutoTokenizer

    from maskport.quantize.api import quantize_export

    out = tmp_path / f"lisa-{method}"
    res = quantize_export(lisa_export.out_dir, out, method=method, bits=4, group_size=32, calib=lisa_samples,
                          device="cpu", log=lambda m: None)
    rep = res.report
    assert rep["family"] == "lisa" and rep["quantized_modules_count"] == 14
    assert all(m.startswith("mllm.model.language_model.layers.") for m in rep["quantized_modules"])
    assert rep["calibration"]["seg_token_in_every_batch"] and rep["calibration"]["image_tokens"] == 3 * 16
    before, after = _tensors(lisa_export.out_dir), _tensors(out)
    kept = [k for k in before if not k.startswith("mllm.model.language_model.layers.")]
    assert kept and all(torch.equal(before[k], after[k]) for k in kept)
    assert any(k.endswith(".qweight") for k in after)
    model, info = AutoModel.from_pretrained(out, trust_remote_code=True, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    pred = model.eval().predict_forward(image=_image(60, 80, 2), text="Please segment the red box.", tokenizer=tok,
                                        max_new_tokens=2, generation_kwargs={"sequence_bias": {(400,): 100.0}})
    assert pred["prediction"] == "[SEG][SEG]" and len(pred["prediction_masks"]) == 2


def test_released_folder_without_im_start_end(lfx, tmp_path):
    """A LISA trained with --use_mm_start_end False says so in its config.json: no <im_start>/<im_end> around the
    image in the prompt."""
    import shutil

    from maskport.convert.api import convert_released_folder
    from maskport.families.lisa.remote.modeling_lisa import build_prompt

    src = tmp_path / "LISA-no-im"
    shutil.copytree(lfx.released_dir, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["mm_use_im_start_end"] = False
    (src / "config.json").write_text(json.dumps(cfg))
    res = convert_released_folder(src, command="lisa-hf-to-native", out=tmp_path / "out", clip=lfx.clip_dir,
                                  progress=False)
    tpl = json.loads((res.out_dir / "config.json").read_text())["template"]
    assert build_prompt(tpl, "hi") == SYSTEM + " USER: <image>\nhi ASSISTANT:"
    assert any("mm_use_im_start_end is false" in n for n in res.notes)


def test_run_without_lora_single_file(lfx, lisa_export, tmp_path):
    """A run trained without LoRA (LISA's --lora_r 0: no peft wrapper, keys model.* / lm_head.weight) as one
    zero_to_fp32 pytorch_model.bin (here: the released folder's merged tensors, read with the safe loader): detected,
    and the same export (within the LoRA merge's float32 rounding)."""
    from maskport.convert.sources import open_hf_folder

    src = open_hf_folder(lfx.released_dir)
    (tmp_path / "z").mkdir()
    torch.save({k: src.load(k).clone() for k in src.keys()}, tmp_path / "z" / "pytorch_model.bin")
    res = _convert(lfx, tmp_path / "z" / "pytorch_model.bin", tmp_path / "out", base=lfx.base_dir, clip=lfx.clip_dir)
    assert res.family == "lisa" and res.report["settings"]["lora"]["r"] is None
    want, got = _tensors(lisa_export.out_dir), _tensors(res.out_dir)
    assert sorted(got) == sorted(want)
    assert all(torch.allclose(got[k], want[k], atol=1e-6, rtol=0) for k in want)


def test_half_precision_postprocess_is_lisas(lfx, lisa_model):
    """With SAM in bf16 (LISA's default precision) the logits are interpolated in bf16, as LISA's
    ``postprocess_masks`` does them (Meta's function on the bf16 logits is the reference), not in float32."""
    import copy

    model, _ = lisa_model
    m16 = copy.deepcopy(model)
    m16.sam.to(torch.bfloat16)
    sam = copy.deepcopy(lfx.meta_sam)
    low = torch.randn(2, 1, 32, 32).to(torch.bfloat16)
    got = m16.sam_postprocess(low.float()[:, 0], (96, 77), (181, 145))
    want = sam.postprocess_masks(low, (96, 77), (181, 145))[:, 0]
    assert got.dtype == torch.float32 and torch.equal(got, want.float())
    assert not torch.equal(got, model.sam_postprocess(low.float()[:, 0], (96, 77), (181, 145)))


def test_wrong_inputs_are_one_line_errors(lfx, tmp_path):
    """A folder that says LISA but lacks its tensors, a base of another size, a SAM of the wrong layout: exit code 2
    and one 'error:' line each, nothing written."""
    import shutil

    from click.testing import CliRunner

    from maskport.cli import main

    def run(*args):
        r = CliRunner().invoke(main, ["convert", *map(str, args), "--no-progress"])
        lines = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
        return r.exit_code, lines

    fake = tmp_path / "fake-lisa"
    fake.mkdir()
    shutil.copy2(lfx.released_dir / "config.json", fake / "config.json")
    torch.save({"model.embed_tokens.weight": torch.zeros(403, 64)}, fake / "pytorch_model.bin")
    code, lines = run("lisa-hf-to-native", fake, "--clip", lfx.clip_dir, "-o", tmp_path / "o1")
    assert code == 2 and len(lines) == 1 and "not a released LISA folder" in lines[0]

    other = tmp_path / "other-base"
    shutil.copytree(lfx.base_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["hidden_size"] = 128
    (other / "config.json").write_text(json.dumps(cfg))
    code, lines = run("mmengine-to-hf", lfx.zero_dir, "--base", other, "--clip", lfx.clip_dir, "--sam", lfx.sam_pth,
                      "-o", tmp_path / "o2")
    assert code == 2 and len(lines) == 1 and "hidden size" in lines[0]

    code, lines = run("mmengine-to-hf", lfx.zero_dir, "--base", lfx.base_dir, "--clip", lfx.clip_dir,
                      "--sam", lfx.base_dir / "pytorch_model.bin", "-o", tmp_path / "o3")
    assert code == 2 and len(lines) == 1 and "not Meta's SAM checkpoint layout" in lines[0]
    assert not any((tmp_path / n).exists() for n in ("o1", "o2", "o3"))
