"""Sa2VA on InternVL: remote-code InternVL bases (Qwen2 and InternLM2 language models) -> native transformers
``InternVLForConditionalGeneration`` (+ SAM2), checked against independent references: the original
InternViT / pixel-shuffle / mlp1 / InternLM2 formulas written in ``maskport.testing.references.internvl``, transformers'
own Qwen2, and peft's un-merged LoRA (the training-time model)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from maskport.testing.sa2va_internvl import TILE, make_internvl_fixture
from tests.golden import check_export

LOGIT_TOL = 1e-4


def _convert(fx, out, **kw):
    from maskport.convert.api import convert_mmengine_to_hf

    return convert_mmengine_to_hf(fx.ckpt, base=fx.base_dir, sam2=fx.sam2_pt, out=out, progress=False,
                                  log=lambda *a: None, **kw)


@pytest.fixture(scope="module")
def qwen_fx(tmp_path_factory):
    return make_internvl_fixture(tmp_path_factory.mktemp("internvl_qwen2"), llm="qwen2", version="v2")


@pytest.fixture(scope="module")
def qwen_export(qwen_fx, tmp_path_factory):
    res = _convert(qwen_fx, tmp_path_factory.mktemp("exp") / "qwen2", dtype="fp32")
    check_export("sa2va-internvl/qwen2-v2", res.out_dir)
    return res


def _load(out_dir):
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(out_dir, trust_remote_code=True, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(out_dir, trust_remote_code=True)


def _inputs(fx, n_tiles=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn((n_tiles, 3, TILE, TILE), generator=g)
    per_tile = (TILE // 14) ** 2 // 4
    text_ids = torch.randint(0, 300, (12,), generator=g)
    ids = torch.cat([text_ids[:5], torch.full((per_tile * n_tiles,), fx.img_context_id), text_ids[5:]])
    return ids[None], pixel_values


def _compare_logits(fx, out_dir, seed=0):
    model, _ = _load(out_dir)
    ids, pv = _inputs(fx, seed=seed)
    with torch.no_grad():
        ref = fx.oracle(ids, pv, fx.img_context_id)
        got = model.mllm(input_ids=ids, pixel_values=pv, attention_mask=torch.ones_like(ids)).logits
    assert got.shape == ref.shape
    diff = (got - ref).abs().max().item()
    assert diff <= LOGIT_TOL, diff
    # the LoRA matters: the same model without it differs by far more than the tolerance
    with torch.no_grad(), fx.oracle.language_model.disable_adapter():
        plain = fx.oracle(ids, pv, fx.img_context_id)
    assert (plain - ref).abs().max().item() > 100 * LOGIT_TOL
    return model


def test_qwen2_v2_logits_match_the_references(qwen_fx, qwen_export):
    _compare_logits(qwen_fx, qwen_export.out_dir)


def test_qwen2_export_accounts_for_every_tensor(qwen_fx, qwen_export):
    report = json.loads((qwen_export.out_dir / "conversion_report.json").read_text())
    text = json.dumps(report)
    assert report["family"] == "sa2va-internvl"
    # every checkpoint tensor is used or superseded: the projector's trained copy replaced the base's
    for k in ("mllm.model.mlp1.1.weight", "text_hidden_fcs.0.weight"):
        assert k in text
    cfg = json.loads((qwen_export.out_dir / "config.json").read_text())
    assert cfg["mllm_config"]["text_config"]["model_type"] == "qwen2"
    assert cfg["mllm_config"]["image_token_id"] == qwen_fx.img_context_id
    assert cfg["mllm_config"]["image_seq_length"] == 4
    assert cfg["template"]["user"].startswith("<|im_start|>user\n")


def test_qwen2_predict_forward_segments_every_seg(qwen_fx, qwen_export):
    model, tok = _load(qwen_export.out_dir)
    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(70, 120, 3) * 255).astype(np.uint8))
    out = model.predict_forward(image=image, text="<image>Please segment the red thing.", tokenizer=tok,
                                max_new_tokens=6, generation_kwargs={"sequence_bias": {
                                    (tok.convert_tokens_to_ids("[SEG]"),): 30.0}})
    n_seg = out["prediction"].count("[SEG]")
    assert n_seg >= 1
    # a [SEG] generated as the very last token has no hidden state (never fed back): one mask fewer
    assert len(out["prediction_masks"]) in (n_seg, n_seg - 1)
    for m in out["prediction_masks"]:
        assert m.shape == (1, 70, 120) and m.dtype == np.bool_
    text_only = model.predict_forward(text="hello", tokenizer=tok, max_new_tokens=3)
    assert text_only["prediction_masks"] == []


def test_qwen2_predict_forward_on_a_video(qwen_fx, qwen_export):
    """Sa2VA's InternVL video input: the first 5 frames, each one 448-px-style tile (square bicubic resize, no
    thumbnail), ``<image>`` -> one ``<img>...</img>`` block per frame joined by newlines; the key frames' masks are
    the image head's masks for the same [SEG] embedding; masks are (T, H, W). Propagation itself:
    tests/test_sam2_video.py (against Meta's video predictor)."""
    model, tok = _load(qwen_export.out_dir)
    rng = np.random.RandomState(1)
    frames = [Image.fromarray((rng.rand(40, 64, 3) * 255).astype(np.uint8)) for _ in range(7)]
    seen = {}
    real_generate, real_fcs = model.mllm.generate, model.text_hidden_fcs.forward

    def spy_generate(**kw):
        seen["kw"] = kw
        return real_generate(**kw)

    def spy_fcs(x):
        seen["emb"] = real_fcs(x)
        return seen["emb"]

    model.mllm.generate, model.text_hidden_fcs.forward = spy_generate, spy_fcs
    text = "<image>Please segment the red thing."
    seg = tok.convert_tokens_to_ids("[SEG]")
    out = model.predict_forward(video=frames, text=text, tokenizer=tok, max_new_tokens=3,
                                generation_kwargs={"sequence_bias": {(seg,): 30.0}})
    s = model.config.image_processor
    per_tile = int(model.config.mllm_config.image_seq_length)
    block = s["img_start_token"] + s["img_context_token"] * per_tile + s["img_end_token"]
    want = model.config.template["user"].replace("{input}", text.replace("<image>", "\n".join([block] * 5)))
    assert seen["kw"]["input_ids"][0].tolist() == tok(want, add_special_tokens=False)["input_ids"]
    mean = torch.tensor(s["image_mean"])[:, None, None]
    std = torch.tensor(s["image_std"])[:, None, None]
    tiles = [(torch.from_numpy(np.asarray(f.resize((TILE, TILE), Image.BICUBIC))).permute(2, 0, 1).float() / 255
              - mean) / std for f in frames[:5]]
    assert torch.allclose(seen["kw"]["pixel_values"], torch.stack(tiles), atol=1e-6)
    assert len(out["prediction_masks"]) >= 1
    for i, m in enumerate(out["prediction_masks"]):
        assert m.shape == (7, 40, 64) and m.dtype == np.bool_
        for k in range(5):
            image_mask, _ = model.masks_from_prompts(frames[k], seen["emb"][i:i + 1], 0.5, False)
            assert np.array_equal(m[k], image_mask[0][0]), k


def test_tiling_matches_internvl_rules():
    from maskport.families.sa2va_internvl.remote.modeling_sa2va_internvl import choose_grid, dynamic_tiles, tile_grids

    grids = tile_grids(1, 12)
    assert grids[0] == (1, 1) and all(a * b <= 12 for a, b in grids)
    assert [a * b for a, b in grids] == sorted(a * b for a, b in grids)
    assert choose_grid(896, 448, grids, 448) == (2, 1)
    assert choose_grid(448, 1344, grids, 448) == (1, 3)
    # a square image: (1,1), (2,2) and (3,3) tie on aspect ratio; a large one takes more tiles
    assert choose_grid(100, 100, grids, 448) == (1, 1)
    assert choose_grid(1400, 1400, grids, 448) == (3, 3)
    img = Image.fromarray(np.arange(56 * 112 * 3, dtype=np.uint8).reshape(56, 112, 3) % 251)
    tiles = dynamic_tiles(img, 1, 12, 56, True)
    assert len(tiles) == 3  # 2x1 grid + thumbnail
    assert np.array_equal(np.asarray(tiles[0]), np.asarray(img)[:, :56])  # no resize needed: exact crops
    assert np.array_equal(np.asarray(tiles[1]), np.asarray(img)[:, 56:])


@pytest.fixture(scope="module")
def lm2_fx(tmp_path_factory):
    from maskport.testing.tokenizers import make_internlm2_tokenizer_dir

    root = tmp_path_factory.mktemp("internvl_internlm2")
    tok_dir = make_internlm2_tokenizer_dir(root / "tok")
    return make_internvl_fixture(root / "fx", llm="internlm2", version="v2", tokenizer_dir=tok_dir)


@pytest.fixture(scope="module")
def lm2_export(lm2_fx, tmp_path_factory):
    res = _convert(lm2_fx, tmp_path_factory.mktemp("exp") / "internlm2", dtype="fp32")
    check_export("sa2va-internvl/internlm2-v2", res.out_dir)
    return res


def test_internlm2_v2_logits_match_the_references(lm2_fx, lm2_export):
    """InternLM2 (fused, per-group wqkv; LoRA on it) -> Llama: the hand-written InternLM2 with peft's un-merged
    LoRA is the reference."""
    model = _compare_logits(lm2_fx, lm2_export.out_dir)
    assert type(model.mllm.model.language_model).__name__ == "LlamaModel"
    cfg = json.loads((lm2_export.out_dir / "config.json").read_text())
    assert cfg["add_bos_token"] is True
    assert cfg["template"]["stop_words"] == ["<|im_end|>"]


def test_internlm2_tokenizer_loads_without_remote_code(lm2_fx, lm2_export):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lm2_export.out_dir, trust_remote_code=False)
    assert type(tok).__name__ != "InternLM2Tokenizer"
    assert tok.convert_tokens_to_ids("[SEG]") == json.loads(
        (lm2_export.out_dir / "config.json").read_text())["seg_token_id"]
    assert tok.bos_token == "<s>"
    assert not (lm2_export.out_dir / "tokenization_internlm2.py").exists()


def test_split_wqkv_against_the_rearrange_formula():
    """The split gathers exactly the rows InternLM2's ``rearrange(qkv, "b q (h gs d) -> b q h gs d")`` reads."""
    from maskport.families.sa2va_internvl.internlm2_llama import split_wqkv

    heads, kv, d, dim = 8, 2, 3, 5
    g = heads // kv
    w = torch.randn((heads + 2 * kv) * d, dim)
    q, k, v = split_wqkv(w, heads, kv)
    x = torch.randn(1, 7, dim)
    fused = (x @ w.T).reshape(1, 7, kv, g + 2, d)
    assert torch.allclose(x @ q.T, fused[..., :g, :].reshape(1, 7, heads * d))
    assert torch.allclose(x @ k.T, fused[..., -2, :].reshape(1, 7, kv * d))
    assert torch.allclose(x @ v.T, fused[..., -1, :].reshape(1, 7, kv * d))
    with pytest.raises(ValueError, match="not a multiple"):
        split_wqkv(torch.randn(10, 4), heads, kv)


@pytest.mark.parametrize("llm,version,deepspeed", [("qwen2", "v1", True), ("internlm2", "v1", False)])
def test_v1_checkpoints_and_deepspeed_directories(tmp_path, llm, version, deepspeed):
    """v1 checkpoints (full trained embeddings / head under the peft prefix, no modules_to_save) and a DeepSpeed
    ZeRO-2 directory (``mp_rank_00_model_states.pt``'s ``module``) convert to the same references."""
    from maskport.testing.tokenizers import make_internlm2_tokenizer_dir

    tok_dir = make_internlm2_tokenizer_dir(tmp_path / "tok") if llm == "internlm2" else None
    fx = make_internvl_fixture(tmp_path / "fx", llm=llm, version=version, deepspeed=deepspeed, tokenizer_dir=tok_dir)
    assert not any(".modules_to_save." in k for k in fx.state_dict)
    res = _convert(fx, tmp_path / "out", dtype="fp32")
    assert res.report["inputs"]["checkpoint"]["format"] == ("deepspeed" if deepspeed else "mmengine")
    check_export(f"sa2va-internvl/{llm}-{version}{'-deepspeed' if deepspeed else ''}", res.out_dir)
    _compare_logits(fx, res.out_dir, seed=1)


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_tied_qwen2_base(tmp_path, version):
    """Sa2VA-1B / Sa2VA-InternVL3-2B: the base's Qwen2.5-0.5B/1.5B ties its head to the embeddings, so the base
    folder has no ``lm_head.weight``; the trained head comes from the checkpoint and the export unties it."""
    fx = make_internvl_fixture(tmp_path / "fx", llm="qwen2", version=version, tied=True)
    from safetensors import safe_open

    with safe_open(str(fx.base_dir / "model.safetensors"), "pt") as f:
        assert not any("lm_head" in k for k in f.keys())  # noqa: SIM118
    assert json.loads((fx.base_dir / "config.json").read_text())["llm_config"]["tie_word_embeddings"] is True
    res = _convert(fx, tmp_path / "out", dtype="fp32")
    check_export(f"sa2va-internvl/qwen2-{version}-tied", res.out_dir)
    model = _compare_logits(fx, res.out_dir, seed=3)
    assert model.config.mllm_config.tie_word_embeddings is False
    assert model.mllm.lm_head.weight.data_ptr() != model.mllm.get_input_embeddings().weight.data_ptr()
    assert res.report["coverage"]["unaccounted"] == []


def test_v1_internlm2_head_with_lora(tmp_path):
    """An older v1 InternLM2 run with LoRA on ``output`` too: the trained full head (peft's ``base_layer``) with its
    LoRA merged matches peft's un-merged model; the base's head is dropped with a reason."""
    from maskport.testing.tokenizers import make_internlm2_tokenizer_dir

    fx = make_internvl_fixture(tmp_path / "fx", llm="internlm2", version="v1", head_lora=True,
                               tokenizer_dir=make_internlm2_tokenizer_dir(tmp_path / "tok"))
    peft_head = "mllm.model.language_model.base_model.model.output."
    assert {peft_head + "base_layer.weight", peft_head + "lora_A.default.weight"} <= set(fx.state_dict)
    res = _convert(fx, tmp_path / "out", dtype="fp32")
    check_export("sa2va-internvl/internlm2-v1-head-lora", res.out_dir)
    _compare_logits(fx, res.out_dir, seed=2)
    # the head's LoRA matters: without it the head differs
    from safetensors import safe_open

    with safe_open(str(res.out_dir / "model.safetensors"), "pt") as f:
        head = f.get_tensor("mllm.lm_head.weight")
    assert (head - fx.state_dict[peft_head + "base_layer.weight"].float()).abs().max() > 1e-4
    assert any("LoRA on the LM head" in n for n in res.report["notes"])
    dropped = {d["source"] if isinstance(d, dict) else str(d) for d in res.report["dropped"]}
    assert any("output.weight" in d for d in dropped), dropped


def test_export_loads_and_predicts_without_maskport(qwen_export, tmp_path):
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import sys
        sys.modules["maskport"] = None  # any import of maskport fails
        import numpy as np, torch
        from PIL import Image
        from transformers import AutoModel, AutoTokenizer
        d = {str(qwen_export.out_dir)!r}
        m = AutoModel.from_pretrained(d, trust_remote_code=True, dtype=torch.float32).eval()
        t = AutoTokenizer.from_pretrained(d, trust_remote_code=True)
        img = Image.fromarray((np.random.RandomState(0).rand(60, 90, 3) * 255).astype(np.uint8))
        out = m.predict_forward(image=img, text="<image>segment it", tokenizer=t, max_new_tokens=4)
        assert isinstance(out["prediction"], str)
        print("OK", type(m).__module__)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "OK transformers_modules" in r.stdout


def test_wrong_base_is_refused_before_anything_is_written(qwen_fx, tmp_path):
    from maskport.errors import WrongFamily

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    from maskport.convert.api import convert_mmengine_to_hf

    with pytest.raises(WrongFamily, match="needs an InternVL base"):
        convert_mmengine_to_hf(qwen_fx.ckpt, base=bad, sam2=qwen_fx.sam2_pt, out=tmp_path / "o", progress=False,
                               log=lambda *a: None)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("which", ["qwen2", "internlm2"])
def test_released_folder_imports_to_the_same_export(request, tmp_path, which):
    """A released Sa2VA folder (LoRA merged by peft, SAM2 inside with ``g_weight``) -> ``sa2va-hf-to-native``:
    the same logits as the references, and the same tensors as the conversion of the training checkpoint."""
    from safetensors import safe_open

    from maskport.convert.api import convert_released_folder
    from maskport.testing.sa2va_internvl import make_released_folder

    fx = request.getfixturevalue("qwen_fx" if which == "qwen2" else "lm2_fx")
    from_ckpt = request.getfixturevalue("qwen_export" if which == "qwen2" else "lm2_export")
    src = make_released_folder(fx, tmp_path / "released")
    assert any("g_weight" in k for k in safe_open(str(src / "model.safetensors"), "pt").keys())
    res = convert_released_folder(command="sa2va-hf-to-native", src=src, out=tmp_path / "native", progress=False, log=lambda *a: None,
                                     sam2_config=fx.sam2_pt.with_suffix(".config.json"))  # tiny: no preset
    assert res.family == "sa2va-internvl"
    check_export(f"sa2va-internvl/released-{which}", res.out_dir)
    _compare_logits(fx, res.out_dir)
    a = safe_open(str(res.out_dir / "model.safetensors"), "pt")
    b = safe_open(str(from_ckpt.out_dir / "model.safetensors"), "pt")
    assert sorted(a.keys()) == sorted(b.keys())
    worst = max((a.get_tensor(k) - b.get_tensor(k)).abs().max().item() for k in a.keys())
    assert worst <= 1e-5, worst
    for k in a.keys():
        if k.startswith(("sam2.", "text_hidden_fcs.", "mllm.model.vision_tower.")):
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k


def test_released_import_refuses_a_plain_internvl_base(qwen_fx, tmp_path):
    from maskport.convert.api import convert_released_folder
    from maskport.errors import WrongFamily

    with pytest.raises(WrongFamily, match="no family imports a released folder"):
        convert_released_folder(command="sa2va-hf-to-native", src=qwen_fx.base_dir, out=tmp_path / "o", progress=False)


def test_native_hf_base_layout(tmp_path):
    """An InternVL ``-hf`` base (transformers' own ``InternVLForConditionalGeneration`` saved with
    ``save_pretrained``) fine-tuned the Sa2VA way: the oracle is transformers' InternVL for the image features and
    peft's un-merged LoRA on transformers' Qwen2 for the language model."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import InternVLConfig, InternVLForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM

    from maskport.convert.api import convert_mmengine_to_hf
    from maskport.testing.common import SPECIAL_TOKENS, perturb_
    from maskport.testing.sa2va_internvl import LORA_ALPHA, LORA_R, _cfg_text, make_internvl_fixture
    from maskport.testing.tokenizers import INTERNVL_TOKENS

    donor = make_internvl_fixture(tmp_path / "donor", llm="qwen2")  # its tokenizer and SAM2
    base = tmp_path / "hf"
    torch.manual_seed(3)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(donor.base_dir, trust_remote_code=False)
    text = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    cfg = InternVLConfig(vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=64, image_size=[TILE, TILE], patch_size=[14, 14],
                                            attention_bias=True),
                         text_config=text.to_dict(), image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
                         image_seq_length=4, tie_word_embeddings=False)
    native = InternVLForConditionalGeneration(cfg).eval()
    perturb_(native.parameters(), torch.Generator().manual_seed(4), 0.02)
    native.save_pretrained(base)
    tok.save_pretrained(base)
    saved = load_file(str(base / "model.safetensors"))
    # transformers saves InternVL in the llava-style layout the hub's -hf folders have
    assert any(k.startswith("vision_tower.") for k in saved) and any(k.startswith("language_model.") for k in saved)

    # Sa2VA's training view of the LLM: a Qwen2ForCausalLM (its keys are the remote-code ones) with 5 more tokens
    n = len(tok)
    vocab = n + len(SPECIAL_TOKENS)
    lm = Qwen2ForCausalLM(Qwen2Config(**{**text.to_dict(), "vocab_size": vocab}))
    sd = {"model." + k[len("model.language_model."):]: v for k, v in native.state_dict().items()
          if k.startswith("model.language_model.")}
    gen = torch.Generator().manual_seed(5)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        src = native.state_dict()[name.replace("model.", "model.language_model.", 1) if name.startswith("model.")
                                  else name]
        sd[name] = torch.cat([src, torch.randn(len(SPECIAL_TOKENS), src.shape[1], generator=gen) * 0.02])
    lm.load_state_dict(sd)
    lm = get_peft_model(lm, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        modules_to_save=["embed_tokens", "lm_head"])).eval()
    perturb_([p for k, p in lm.named_parameters() if "lora_B" in k or ".modules_to_save." in k], gen, 0.05)
    proj = native.model.multi_modal_projector
    perturb_(proj.parameters(), gen, 0.01)  # trained projector (the oracle holds it)
    ckpt_sd = {"mllm.model.language_model." + k: v.detach().clone() for k, v in lm.state_dict().items()
               if ".lora_" in k or ".modules_to_save." in k}
    for idx, name in (("0", "layer_norm"), ("1", "linear_1"), ("3", "linear_2")):
        for p in ("weight", "bias"):
            ckpt_sd[f"mllm.model.mlp1.{idx}.{p}"] = getattr(proj, name).state_dict()[p].detach().clone()
    for k, v in donor.state_dict.items():
        if k.startswith(("grounding_encoder.", "text_hidden_fcs.")):
            ckpt_sd[k] = v
    ckpt = tmp_path / "iter_1.pth"
    torch.save({"state_dict": ckpt_sd, "meta": {"cfg": _cfg_text(base, "qwen_chat")}}, ckpt)
    res = convert_mmengine_to_hf(ckpt, base=base, sam2=donor.sam2_pt, out=tmp_path / "out", dtype="fp32",
                                 progress=False, log=lambda *a: None)
    assert any("native (-hf) layout" in n for n in res.notes)
    check_export("sa2va-internvl/native-hf-base", res.out_dir)
    model, _ = _load(res.out_dir)

    ids, pv = _inputs(donor)
    with torch.no_grad():
        image = native.model.get_image_features(pixel_values=pv, vision_feature_layer=-1,
                                                vision_feature_select_strategy="default").pooler_output
        emb = lm.get_input_embeddings()(ids).clone()
        emb[0, ids[0] == cfg.image_token_id] = image.reshape(-1, emb.shape[-1])
        ref = lm(inputs_embeds=emb).logits
        got = model.mllm(input_ids=ids, pixel_values=pv).logits
    assert (got - ref).abs().max().item() <= LOGIT_TOL
    assert INTERNVL_TOKENS[2] == "<IMG_CONTEXT>"


def test_pretrained_pth_chain(qwen_fx, qwen_export, tmp_path):
    """A run that started from an earlier full checkpoint (Sa2VA's ``pretrained_pth``): its MLLM and SAM2 tensors
    take the base's place, this run's trained tensors win over its. Oracle: the trained model with the earlier
    checkpoint's weights under peft's LoRA."""
    import copy

    from safetensors import safe_open

    from maskport.testing.common import SPECIAL_TOKENS, perturb_

    fx = qwen_fx
    gen = torch.Generator().manual_seed(11)
    base_sd = {k: v.clone() for k, v in qwen_fx.oracle.state_dict().items()}
    stage1 = {}
    for k, v in base_sd.items():  # the earlier run's full model, in the training module's key names
        if ".lora_" in k or "modules_to_save" in k or "original_module" in k or k.startswith("mlp1."):
            continue
        plain = k.replace("language_model.base_model.model.", "language_model.").replace(".base_layer.", ".")
        stage1["mllm.model." + plain] = v + 0.01 * torch.randn(v.shape, generator=gen)
    for name, trained in (("language_model.model.embed_tokens.weight",
                           "language_model.base_model.model.model.embed_tokens.modules_to_save.default.weight"),
                          ("language_model.lm_head.weight",
                           "language_model.base_model.model.lm_head.modules_to_save.default.weight")):
        stage1["mllm.model." + name] = base_sd[trained] - 0.3  # resized for Sa2VA's tokens in the earlier run
    for k, v in fx.state_dict.items():  # its trained parts, which this run trained further
        if k.startswith(("mllm.model.mlp1.", "text_hidden_fcs.")):
            stage1[k] = v + 0.5
    sam = {k: v.clone() for k, v in fx.sam2.state_dict().items()}
    perturb_([v for k, v in sam.items() if k.startswith("image_encoder.")], gen, 0.01)
    for k, v in sam.items():
        stage1["grounding_encoder.sam2_model." + k] = v
    pre = tmp_path / "stage1.pth"
    torch.save({"state_dict": stage1, "meta": {"cfg": "x = 1\n"}}, pre)

    res = _convert(fx, tmp_path / "out", dtype="fp32", pretrained_pth=pre)
    check_export("sa2va-internvl/pretrained-pth", res.out_dir)
    reasons = [d.get("reason", "") for d in res.report["dropped"]]
    assert sum("replaced by --pretrained-pth" in r for r in reasons) > 100   # base + SAM2 tensors, each with a reason
    # the earlier checkpoint's projector, mask decoder and text_hidden_fcs: this run's copies win
    assert sum("trained further by this run" in r for r in reasons) == len(set(stage1) & set(fx.state_dict)) > 0

    oracle = copy.deepcopy(fx.oracle)
    own = oracle.state_dict()
    with torch.no_grad():
        for k, v in stage1.items():
            if not k.startswith("mllm.model.") or k.startswith("mllm.model.mlp1.") or "embed_tokens" in k or "lm_head" in k:
                continue
            name = k[len("mllm.model."):]
            if name.startswith("language_model."):
                name = "language_model.base_model.model." + name[len("language_model."):]
                if name not in own:
                    name = name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
            own[name].copy_(v)
    model, _ = _load(res.out_dir)
    ids, pv = _inputs(fx)
    with torch.no_grad():
        ref = oracle(ids, pv, fx.img_context_id)
        got = model.mllm(input_ids=ids, pixel_values=pv).logits
        before = fx.oracle(ids, pv, fx.img_context_id)
    assert (got - ref).abs().max().item() <= LOGIT_TOL
    assert (before - ref).abs().max().item() > 100 * LOGIT_TOL  # the earlier checkpoint matters
    a = safe_open(str(res.out_dir / "model.safetensors"), "pt")
    b = safe_open(str(qwen_export.out_dir / "model.safetensors"), "pt")
    enc = [k for k in a.keys() if k.startswith("sam2.vision_encoder.")]
    dec = [k for k in a.keys() if k.startswith("sam2.mask_decoder.")]
    assert enc and dec
    assert any(not torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in enc)  # SAM2 from the earlier checkpoint
    assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in dec)      # this run's mask decoder
    assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys() if k.startswith("text_hidden_fcs."))
    assert SPECIAL_TOKENS[0] == "[SEG]"


def test_cli_detects_the_family_and_imports_released_folders(qwen_fx, tmp_path):
    from click.testing import CliRunner

    from maskport.cli import main
    from maskport.testing.sa2va_internvl import make_released_folder

    r = CliRunner().invoke(main, ["convert", "mmengine-to-hf", str(qwen_fx.ckpt), "--base", str(qwen_fx.base_dir),
                                  "--sam2", str(qwen_fx.sam2_pt), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "family: sa2va-internvl" in r.output and "base: InternVL, remote-code layout, qwen2" in r.output
    src = make_released_folder(qwen_fx, tmp_path / "rel")
    r = CliRunner().invoke(main, ["convert", "sa2va-hf-to-native", str(src), "--dry-run", "--sam2-config",
                                  str(qwen_fx.sam2_pt.with_suffix(".config.json"))])
    assert r.exit_code == 0, r.output
    assert "dry run: plan is complete" in r.output
    # errors are one line, exit code 2
    r = CliRunner().invoke(main, ["convert", "sa2va-hf-to-native", str(qwen_fx.base_dir), "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "no family imports a released folder" in r.output
    assert len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(main, ["convert", "sa2va-hf-to-native", str(src), "-o", str(tmp_path / "y")])
    assert r.exit_code == 2 and "matches none of the official presets" in r.output  # tiny SAM2: needs its config


def test_verify_runs_on_an_internvl_export(qwen_fx, qwen_export, tmp_path):
    """``maskport verify`` drives the export through predict_forward only: fp32 vs a bf16 conversion."""
    from maskport.convert.api import convert_mmengine_to_hf
    from maskport.testing.samples import synthetic_samples
    from maskport.verify.api import verify

    bf16 = convert_mmengine_to_hf(qwen_fx.ckpt, base=qwen_fx.base_dir, sam2=qwen_fx.sam2_pt, out=tmp_path / "bf16",
                                  dtype="bf16", progress=False, log=lambda *a: None)
    check_export("sa2va-internvl/qwen2-v2-bf16", bf16.out_dir)
    samples = synthetic_samples(tmp_path / "s", 2, size=(100, 80))
    res = verify(qwen_export.out_dir, bf16.out_dir, samples, report_dir=tmp_path / "rep", max_new_tokens=5,
                 generation_kwargs={"sequence_bias": {"[SEG]": 30.0}}, progress=False)
    assert res.passed, res.verdict  # bf16 rounding only: masks agree
    assert (tmp_path / "rep" / "report.json").is_file()


def test_internvit_6b_style_vision_tower(tmp_path):
    """Sa2VA-26B's InternViT-6B: RMSNorm, q/k normalisation over all heads, no qkv bias (InternLM2 LLM)."""
    from maskport.testing.sa2va_internvl import VISION_6B
    from maskport.testing.tokenizers import make_internlm2_tokenizer_dir

    tok_dir = make_internlm2_tokenizer_dir(tmp_path / "tok")
    fx = make_internvl_fixture(tmp_path / "fx", llm="internlm2", tokenizer_dir=tok_dir, vision=VISION_6B)
    assert any(k.endswith("attn.q_norm.weight") for k in fx.oracle.state_dict())
    res = _convert(fx, tmp_path / "out", dtype="fp32")
    check_export("sa2va-internvl/internvit-6b", res.out_dir)
    cfg = json.loads((res.out_dir / "config.json").read_text())["mllm_config"]["vision_config"]
    assert cfg["use_qk_norm"] is True and cfg["norm_type"] == "rms_norm" and cfg["attention_bias"] is False
    _compare_logits(fx, res.out_dir, seed=2)


@pytest.mark.parametrize("which", ["qwen2", "internlm2"])
def test_golden_mapping_tsv(request, which):
    """``docs/families/sa2va-internvl[.internlm2].mapping.tsv``: every source -> target of the fixture's conversion
    (remote-code base, v2 checkpoint), so ``grep gate_proj`` finds the rule and a mapping change is a diff."""
    from pathlib import Path

    from maskport.convert.api import convert_mmengine_to_hf
    from tests.golden import check_mapping_tsv

    fx = request.getfixturevalue("qwen_fx" if which == "qwen2" else "lm2_fx")
    res = convert_mmengine_to_hf(fx.ckpt, base=fx.base_dir, sam2=fx.sam2_pt, out=None, dry_run=True, progress=False)
    docs = Path(__file__).resolve().parent.parent / "docs" / "families"
    name = "sa2va-internvl" + ("" if which == "qwen2" else ".internlm2")
    check_mapping_tsv(docs / f"{name}.mapping.tsv", res.report)


def test_batched_prediction_equals_one_by_one(qwen_export):
    """InternVL: a batch of images with different tile counts (different prompt lengths, left-padded) and a
    text-only row predicts what one-by-one prediction does ([SEG] favoured so the random model segments)."""
    model, tok = _load(qwen_export.out_dir)
    rng = np.random.RandomState(3)
    images = [Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8)) for h, w in ((60, 90), (120, 40), (56, 56))]
    texts = ["<image>segment it", "<image>Please segment the left object.", "<image>What is it?"]
    from tests.golden import assert_batched_equals_single

    out = assert_batched_equals_single(model, tok, images + [None], texts + ["hello"], max_new_tokens=6,
                                       generation_kwargs={"sequence_bias": {(tok.convert_tokens_to_ids("[SEG]"),): 8.0}})
    assert sum(len(o["prediction_masks"]) for o in out[:3]) >= 3 and out[3]["prediction_masks"] == []
