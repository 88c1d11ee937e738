"""End to end: a genuine tiny Sa2VA training checkpoint -> maskport export -> compared with the un-converted
pieces (peft's un-merged model, Meta's SAM2, the trained text_hidden_fcs), which are independent oracles."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from maskport.testing.references.sam2 import meta_language_outputs

IMAGE_H, IMAGE_W = 224, 280  # multiples of 28: Qwen's pre-resize is the identity


def _image(seed=0):
    rng = np.random.RandomState(seed)
    arr = (rng.rand(IMAGE_H, IMAGE_W, 3) * 255).astype(np.uint8)
    arr[60:150, 80:200] = [220, 30, 30]
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def model_fp32(export_fp32):
    from transformers import AutoModel

    return AutoModel.from_pretrained(export_fp32.out_dir, trust_remote_code=True, dtype=torch.float32).eval()


def _reference_inputs(fx, config, text):
    """Prompt and image inputs built independently: the Qwen chat format written out by hand and
    transformers' own Qwen2-VL image processor with the export's settings."""
    from transformers import Qwen2VLImageProcessor

    ip = config.image_processor
    proc = Qwen2VLImageProcessor(min_pixels=ip["min_pixels"], max_pixels=ip["max_pixels"], patch_size=ip["patch_size"],
                                 temporal_patch_size=ip["temporal_patch_size"], merge_size=ip["merge_size"],
                                 image_mean=ip["image_mean"], image_std=ip["image_std"])
    mm = proc(images=[_image()], return_tensors="pt")
    n = int(mm["image_grid_thw"].prod()) // ip["merge_size"] ** 2
    prompt = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
              + "<|image_pad|>" * n + "<|vision_end|>" + text + "<|im_end|>\n<|im_start|>assistant\n")
    ids = fx.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    return ids["input_ids"], mm


# ------------------------------------------------------------------------------------------------ coverage


def test_coverage_report_has_zero_unaccounted(export_bf16, fx):
    rep = json.loads((export_bf16.out_dir / "conversion_report.json").read_text())
    cov = rep["coverage"]
    assert cov["unaccounted"] == []
    for name, c in cov["sources"].items():
        assert c["used"] + c["dropped"] == c["tensors"] > 0, name
    assert cov["sources"]["ckpt"]["used"] == cov["sources"]["ckpt"]["tensors"]  # nothing trained is dropped
    targets = [t["target"] for t in rep["targets"]]
    assert len(targets) == len(set(targets)) == cov["targets"]
    for dropped in rep["dropped"]:
        assert dropped["reason"]
    assert rep["inputs"]["checkpoint"]["sha256"] == hashlib.sha256(fx.ckpt.read_bytes()).hexdigest()
    for s in rep["shards"]:
        assert hashlib.sha256((export_bf16.out_dir / s["file"]).read_bytes()).hexdigest() == s["sha256"]
    assert rep["settings"]["lora"]["r"] == fx.lora_r and rep["settings"]["lora"]["alpha"] == fx.lora_alpha
    assert rep["settings"]["lora"]["source"] == "model.mllm.llm_lora"  # read from meta['cfg']
    card = (export_bf16.out_dir / "README.md").read_text()
    assert rep["inputs"]["checkpoint"]["sha256"] in card and "sa2va-qwen2_5-vl" in card


def test_lora_targets_are_merges_and_embeddings_come_from_modules_to_save(export_bf16):
    rep = export_bf16.report
    by_target = {t["target"]: t for t in rep["targets"]}
    q = by_target["mllm.model.language_model.layers.0.self_attn.q_proj.weight"]
    assert q["op"].startswith("lora_merge") and len(q["sources"]) == 3
    emb = by_target["mllm.model.language_model.embed_tokens.weight"]
    assert emb["op"] == "take" and "modules_to_save" in emb["sources"][0]
    assert emb["supersedes"] == ["base:model.language_model.embed_tokens.weight"]
    dec = [t for n, t in by_target.items() if n.startswith("sam2.mask_decoder.")]
    assert dec and all(t["sources"][0].startswith("ckpt:grounding_encoder.sam2_model.sam_mask_decoder.") for t in dec)
    assert by_target["text_hidden_fcs.2.weight"]["sources"] == ["ckpt:text_hidden_fcs.2.weight"]


def test_default_dtype_is_the_training_dtype(export_bf16):
    from safetensors import safe_open

    with safe_open(str(export_bf16.out_dir / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16"}


# ------------------------------------------------------------------------------------------------ oracles


def test_language_model_logits_match_peft_unmerged_model(model_fp32, fx):
    input_ids, mm = _reference_inputs(fx, model_fp32.config, "Please segment the red box.")
    with torch.no_grad():
        ours = model_fp32.mllm(input_ids=input_ids, **mm).logits
        ref = fx.peft_model(input_ids=input_ids, **mm).logits
        with fx.peft_model.disable_adapter():
            no_lora = fx.peft_model(input_ids=input_ids, **mm).logits
    assert ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-5, diff
    # the comparison is sensitive: the un-fine-tuned model is far away
    assert (ours - no_lora).abs().max().item() > 1e-3


def test_sam2_and_projection_match_meta_sam2(model_fp32, fx):
    torch.manual_seed(0)
    size = model_fp32.config.sam2_image_size
    pixels = torch.randn(1, 3, size, size)
    hidden = torch.randn(1, 1, model_fp32.config.mllm_config.text_config.hidden_size)
    with torch.no_grad():
        for k, v in fx.text_hidden_fcs.state_dict().items():
            assert torch.equal(model_fp32.text_hidden_fcs.state_dict()[k], v), k
        emb_ours = model_fp32.text_hidden_fcs(hidden)
        emb_ref = fx.text_hidden_fcs(hidden)
        assert (emb_ours - emb_ref).abs().max().item() <= 1e-6
        ours = model_fp32.sam2_mask_logits(pixels, emb_ours, multimask_output=False)
        ref = meta_language_outputs(fx.meta_sam2, pixels, emb_ref, multimask_output=False)["low_res_masks"]
    assert ours.shape[-2:] == ref.shape[-2:]
    diff = (ours.reshape(ref.shape) - ref).abs().max().item()
    assert diff <= 1e-5, diff


def _reference_predict(fx, config, text, seg_bias, max_new_tokens):
    """Sa2VA's predict_forward assembled from the un-converted pieces."""
    input_ids, mm = _reference_inputs(fx, config, text)
    seg_id = fx.tokenizer.convert_tokens_to_ids("[SEG]")
    stop = [fx.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    with torch.no_grad():
        out = fx.peft_model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **mm,
                                     max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                                     pad_token_id=stop[-1], sequence_bias={(seg_id,): seg_bias},
                                     output_hidden_states=True, return_dict_in_generate=True)
        gen = out.sequences[0, input_ids.shape[1]:]
        seg_states = []
        for j, tok in enumerate(gen.tolist()):
            # generated token j is fed back at generate step j + 1; its last-layer state is the [SEG] state
            if tok == seg_id and j + 1 < len(out.hidden_states):
                seg_states.append(out.hidden_states[j + 1][-1][0, -1])
        text_out = fx.tokenizer.decode(gen, skip_special_tokens=False).strip()
        masks, probs = [], []
        size = config.sam2_image_size
        # Sa2VA's DirectResize: PIL square resize (bicubic), aspect ratio not kept; then /255 and ImageNet stats,
        # which Sa2VA's SAM2 wrapper builds as bfloat16 tensors (preprocess_image(..., dtype=torch.bfloat16))
        img = np.asarray(_image().resize((size, size), resample=Image.BICUBIC)).astype(np.float32) / 255.0
        x = torch.from_numpy(img).permute(2, 0, 1)[None]
        mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.bfloat16)[None, :, None, None]
        std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.bfloat16)[None, :, None, None]
        x = (x - mean) / std
        assert x.dtype == torch.float32
        for h in seg_states:
            emb = fx.text_hidden_fcs(h[None, None])
            o = meta_language_outputs(fx.meta_sam2, x, emb, multimask_output=True)
            best = o["iou_scores"][0].argmax()
            logit = o["low_res_masks"][0, best][None, None]
            logit = F.interpolate(logit, size=(size, size), mode="bilinear", align_corners=False)
            logit = F.interpolate(logit, size=(IMAGE_H, IMAGE_W), mode="bilinear", align_corners=False)
            p = logit[0].sigmoid()
            probs.append(p.numpy())
            masks.append((p > 0.5).numpy())
    return text_out, masks, probs


def test_predict_forward_equals_reference_from_unconverted_pieces(model_fp32, fx):
    text = "Please segment the red box."
    bias = 12.0  # makes [SEG] likely, so masks are produced and compared
    ref_text, ref_masks, ref_probs = _reference_predict(fx, model_fp32.config, text, bias, max_new_tokens=5)
    assert len(ref_masks) >= 1
    out = model_fp32.predict_forward(image=_image(), text="<image>" + text, tokenizer=fx.tokenizer,
                                     max_new_tokens=5, return_probabilities=True,
                                     generation_kwargs={"sequence_bias": {(fx.tokenizer.convert_tokens_to_ids("[SEG]"),): bias}})
    assert out["prediction"] == ref_text
    assert len(out["prediction_masks"]) == len(ref_masks)
    for m, rm, p, rp in zip(out["prediction_masks"], ref_masks, out["prediction_probabilities"], ref_probs):
        assert m.dtype == np.bool_ and m.shape == (1, IMAGE_H, IMAGE_W)
        assert np.abs(p - rp).max() <= 1e-5, np.abs(p - rp).max()
        # identical masks, except where the probability sits on the threshold within float32 noise
        clear = np.abs(rp - 0.5) > 1e-5
        assert np.array_equal(m[clear], rm[clear]), ((m != rm).sum(), p[m != rm], rp[m != rm])
        assert clear.mean() > 0.99  # (the tiny SAM2 leaves a few pixels' logits at ~0 exactly)


# ------------------------------------------------------------------------------------------------ deployment

LOAD_WITHOUT_MASKPORT = textwrap.dedent('''
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
    seg = tok.convert_tokens_to_ids("[SEG]")
    img = Image.fromarray((np.random.RandomState(1).rand(150, 200, 3) * 255).astype("uint8"))
    out = model.eval().predict_forward(image=img, text="<image>Please segment the object.", tokenizer=tok,
                                       max_new_tokens=4, generation_kwargs={"sequence_bias": {(seg,): 30.0}})
    text_only = model.predict_forward(text="Hello", tokenizer=tok, max_new_tokens=3)
    print(json.dumps({"missing": list(info["missing_keys"]), "unexpected": list(info["unexpected_keys"]),
                      "mismatched": [list(map(str, m)) for m in info.get("mismatched_keys", [])],
                      "prediction": out["prediction"],
                      "masks": [[str(m.dtype), list(m.shape)] for m in out["prediction_masks"]],
                      "text_only_masks": len(text_only["prediction_masks"]), "dtype": str(model.dtype)}))
''')


def test_export_loads_and_predicts_in_a_process_without_maskport(export_bf16, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONNOUSERSITE": "1"}
    r = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_MASKPORT, str(export_bf16.out_dir)], capture_output=True,
                       text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["missing"] == [] and res["unexpected"] == [] and res["mismatched"] == []
    assert res["dtype"] == "torch.bfloat16"
    assert "[SEG]" in res["prediction"]
    assert len(res["masks"]) >= 1 and all(m == ["bool", [1, 150, 200]] for m in res["masks"])
    assert res["text_only_masks"] == 0


def test_deepspeed_zero2_folder_converts_to_the_same_weights(fx, export_bf16, tmp_path):
    from maskport.convert.api import convert_mmengine_to_hf

    assert fx.ds_ckpt is not None and fx.ds_ckpt.is_dir()
    res = convert_mmengine_to_hf(fx.ds_ckpt, base=fx.base_dir, sam2=fx.sam2_pt, out=tmp_path / "ds", progress=False,
                                 sha256=True)
    assert res.report["inputs"]["checkpoint"]["format"] == "deepspeed"
    assert res.report["coverage"]["unaccounted"] == []
    from tests.golden import check_export

    check_export("sa2va-qwen2_5-vl/deepspeed-zero2", res.out_dir)
    assert [s["sha256"] for s in res.report["shards"]] == [s["sha256"] for s in export_bf16.report["shards"]]


def test_sam2_normalisation_is_sa2vas_bfloat16_rounded_by_default(export_fp32, fx, tmp_path):
    """Sa2VA builds SAM2's ImageNet mean/std as bfloat16 tensors; the default export carries those values (its masks
    then equal Sa2VA's own predict_forward pixel for pixel), ``exact`` the float ones; anything else is refused."""
    from maskport.convert.api import convert_mmengine_to_hf
    from maskport.errors import MissingInput

    cfg = json.loads((export_fp32.out_dir / "config.json").read_text())
    bf16 = lambda v: torch.tensor(v, dtype=torch.bfloat16).float().tolist()  # noqa: E731
    assert cfg["sam2_pixel_mean"] == bf16([0.485, 0.456, 0.406]) != [0.485, 0.456, 0.406]
    assert cfg["sam2_pixel_std"] == bf16([0.229, 0.224, 0.225])
    convert_mmengine_to_hf(fx.ckpt, base=fx.base_dir, sam2=fx.sam2_pt, out=tmp_path / "exact",
                           sam2_normalization="exact", progress=False, log=lambda *a: None)
    cfg = json.loads((tmp_path / "exact" / "config.json").read_text())
    assert cfg["sam2_pixel_mean"] == [0.485, 0.456, 0.406] and cfg["sam2_pixel_std"] == [0.229, 0.224, 0.225]
    with pytest.raises(MissingInput, match="sam2-normalization"):
        convert_mmengine_to_hf(fx.ckpt, base=fx.base_dir, sam2=fx.sam2_pt, out=tmp_path / "x",
                               sam2_normalization="imagenet", progress=False, log=lambda *a: None)
    assert not (tmp_path / "x").exists()


def test_released_folder_imports_to_the_checkpoint_conversions_tensors(fx, export_fp32, tmp_path):
    """ByteDance's released Sa2VA-Qwen2.5-VL layout (Sa2VA's tools/convert_to_hf.py: ``model.*`` = peft's
    merge_and_unload of the MLLM, the whole SAM2 under ``grounding_encoder.sam2_model.`` with ``g_weight``,
    ``text_hidden_fcs.*``, a ``sa2va_chat`` config holding the Qwen2.5-VL config) -> ``sa2va-hf-to-native``: every
    tensor bit for bit the conversion of the training checkpoint (float32)."""
    from safetensors.torch import load_file

    from maskport.convert.api import convert_released_folder
    from maskport.errors import WrongFamily
    from maskport.testing.sa2va_qwen2_5_vl import make_released_folder

    src = make_released_folder(fx, tmp_path / "released")
    res = convert_released_folder(command="sa2va-hf-to-native", src=src, out=tmp_path / "native", dtype="fp32", progress=False, log=lambda *a: None,
                                     sam2_config=fx.sam2_pt.with_suffix(".config.json"))  # tiny SAM2: no preset
    assert res.family == "sa2va-qwen2_5-vl"
    assert res.report["coverage"]["unaccounted"] == []
    a = load_file(str(res.out_dir / "model.safetensors"))
    b = load_file(str(export_fp32.out_dir / "model.safetensors"))
    assert sorted(a) == sorted(b)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    cfg_a = json.loads((res.out_dir / "config.json").read_text())
    cfg_b = json.loads((export_fp32.out_dir / "config.json").read_text())
    for key in ("mllm_config", "sam2_config", "seg_token_id", "special_tokens", "image_processor", "template"):
        assert cfg_a[key] == cfg_b[key], key
    # a release saved by a transformers that wrote Qwen2.5-VL's legacy names (model.model.layers.*, model.visual.*)
    legacy = {}
    for k, v in b.items():
        if k.startswith("mllm."):
            k = k[len("mllm."):]
            k = k.replace("model.language_model.", "model.", 1).replace("model.visual.", "visual.", 1)
            legacy[k] = v
    src = make_released_folder(fx, tmp_path / "released-legacy", mllm_state=legacy)
    res = convert_released_folder(command="sa2va-hf-to-native", src=src, out=tmp_path / "native-legacy", dtype="fp32", progress=False,
                                     log=lambda *a: None, sam2_config=fx.sam2_pt.with_suffix(".config.json"))
    c = load_file(str(res.out_dir / "model.safetensors"))
    assert sorted(c) == sorted(b) and [k for k in c if not torch.equal(c[k], b[k])] == []
    # a plain Qwen2.5-VL base folder is not a release
    with pytest.raises(WrongFamily, match="no family imports a released folder"):
        convert_released_folder(command="sa2va-hf-to-native", src=fx.base_dir, out=tmp_path / "o", progress=False)


def test_golden_mapping_tsv(fx):
    """``docs/families/sa2va-qwen2_5-vl.mapping.tsv`` spells out every source -> target of the fixture's conversion
    (``--dry-run --report-json``); a mapping change shows as a diff of that file."""
    from pathlib import Path

    from maskport.convert.api import convert_mmengine_to_hf
    from tests.golden import check_mapping_tsv

    res = convert_mmengine_to_hf(fx.ckpt, base=fx.base_dir, sam2=fx.sam2_pt, out=None, dry_run=True, progress=False)
    docs = Path(__file__).resolve().parent.parent / "docs" / "families"
    check_mapping_tsv(docs / "sa2va-qwen2_5-vl.mapping.tsv", res.report)
