"""Family sa2va-qwen3-vl end to end: a genuine tiny Sa2VA-Qwen3-VL training checkpoint (mmengine Runner, peft LoRA on
every linear of model.language_model, modules_to_save embed_tokens/lm_head) -> maskport export -> compared with the
un-converted pieces (peft's un-merged model on transformers' own Qwen3VLForConditionalGeneration, Meta's SAM2, the
trained text_hidden_fcs)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from maskport.testing.references.sam2 import meta_language_outputs

NAME = "sa2va-qwen3-vl"
IMAGE_H, IMAGE_W = 224, 280  # multiples of 28: qwen_vl_utils' pre-resize is the identity


def _image(seed=0):
    rng = np.random.RandomState(seed)
    arr = (rng.rand(IMAGE_H, IMAGE_W, 3) * 255).astype(np.uint8)
    arr[60:150, 80:200] = [220, 30, 30]
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def fx3(tmp_path_factory):
    from maskport.testing.sa2va_qwen3_vl import make_sa2va_qwen3_fixture

    return make_sa2va_qwen3_fixture(tmp_path_factory.mktemp("sa2va_qwen3_fx"), seed=0)


@pytest.fixture(scope="module")
def export3_bf16(fx3, tmp_path_factory):
    from maskport.convert.api import convert_mmengine_to_hf
    from tests.golden import check_export

    res = convert_mmengine_to_hf(fx3.ckpt, base=fx3.base_dir, sam2=fx3.sam2_pt,
                                 out=tmp_path_factory.mktemp("exports3") / "bf16", progress=False, sha256=True)
    check_export(f"{NAME}/bf16", res.out_dir)
    return res


@pytest.fixture(scope="module")
def export3_fp32(fx3, tmp_path_factory):
    from maskport.convert.api import convert_mmengine_to_hf
    from tests.golden import check_export

    res = convert_mmengine_to_hf(fx3.ckpt, base=fx3.base_dir, sam2=fx3.sam2_pt,
                                 out=tmp_path_factory.mktemp("exports3") / "fp32", dtype="fp32", progress=False)
    check_export(f"{NAME}/fp32", res.out_dir)
    return res


@pytest.fixture(scope="module")
def model3(export3_fp32):
    from transformers import AutoModel

    return AutoModel.from_pretrained(export3_fp32.out_dir, trust_remote_code=True, dtype=torch.float32).eval()


def _reference_inputs(fx, config, text):
    """Prompt and image inputs built independently: Qwen3-VL's chat format written out by hand (no default system
    prompt) and transformers' own Qwen2-VL image processor with Qwen3-VL's settings (patch 16, mean/std 0.5);
    ``mm_token_type_ids`` as Qwen3VLProcessor marks image tokens."""
    from transformers import Qwen2VLImageProcessor

    ip = config.image_processor
    assert ip["patch_size"] == 16 and ip["image_mean"] == [0.5] * 3 and ip["image_std"] == [0.5] * 3
    proc = Qwen2VLImageProcessor(min_pixels=ip["min_pixels"], max_pixels=ip["max_pixels"], patch_size=16,
                                 temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    mm = dict(proc(images=[_image()], return_tensors="pt"))
    n = int(mm["image_grid_thw"].prod()) // 4
    prompt = ("<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>" + text
              + "<|im_end|>\n<|im_start|>assistant\n")
    ids = fx.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    mm["mm_token_type_ids"] = (ids == fx.tokenizer.convert_tokens_to_ids("<|image_pad|>")).int()
    return ids, mm


def test_detected_from_the_training_config_and_fully_accounted(export3_bf16, fx3):
    rep = json.loads((export3_bf16.out_dir / "conversion_report.json").read_text())
    assert rep["family"] == NAME  # no --family: the config names Qwen3VL / Qwen3VLProcessor
    cov = rep["coverage"]
    assert cov["unaccounted"] == []
    for name, c in cov["sources"].items():
        assert c["used"] + c["dropped"] == c["tensors"] > 0, name
    assert cov["sources"]["ckpt"]["used"] == cov["sources"]["ckpt"]["tensors"]
    for dropped in rep["dropped"]:
        assert dropped["reason"]
    assert rep["settings"]["lora"]["r"] == fx3.lora_r and rep["settings"]["lora"]["alpha"] == fx3.lora_alpha
    assert rep["settings"]["base_model_type"] == "qwen3_vl"
    by_target = {t["target"]: t for t in rep["targets"]}
    assert by_target["mllm.model.language_model.layers.0.self_attn.q_proj.weight"]["op"].startswith("lora_merge")
    assert by_target["mllm.model.language_model.layers.1.mlp.down_proj.weight"]["op"].startswith("lora_merge")
    # Qwen3's q/k norms and the DeepStack mergers come from the base unchanged
    assert by_target["mllm.model.language_model.layers.0.self_attn.q_norm.weight"]["sources"] == [
        "base:model.language_model.layers.0.self_attn.q_norm.weight"]
    assert by_target["mllm.model.visual.deepstack_merger_list.1.linear_fc2.weight"]["sources"] == [
        "base:model.visual.deepstack_merger_list.1.linear_fc2.weight"]
    emb = by_target["mllm.model.language_model.embed_tokens.weight"]
    assert emb["op"] == "take" and "modules_to_save" in emb["sources"][0]
    cfg = json.loads((export3_bf16.out_dir / "config.json").read_text())
    assert cfg["mllm_config"]["model_type"] == "qwen3_vl" and cfg["image_processor"]["patch_size"] == 16


def test_the_other_qwen_family_refuses_it(fx3, tmp_path):
    """Forced to the Qwen2.5-VL family, the same checkpoint is refused on its base (one line naming the model type)."""
    from maskport.convert.api import convert_mmengine_to_hf
    from maskport.errors import WrongFamily
    other = "sa2va-qwen2_5-vl"
    with pytest.raises(WrongFamily, match="'qwen3_vl'"):
        convert_mmengine_to_hf(fx3.ckpt, base=fx3.base_dir, sam2=fx3.sam2_pt, out=tmp_path / "x", family=other,
                               dry_run=True, progress=False)


def test_language_model_logits_match_peft_unmerged_model(model3, fx3):
    input_ids, mm = _reference_inputs(fx3, model3.config, "Please segment the red box.")
    # the export's own preprocessing gives the same patch grid (its pixels come from the PIL backend)
    assert torch.equal(model3._mllm_image_inputs(_image())["image_grid_thw"], mm["image_grid_thw"])
    with torch.no_grad():
        ours = model3.mllm(input_ids=input_ids, **mm).logits
        ref = fx3.peft_model(input_ids=input_ids, **mm).logits
        with fx3.peft_model.disable_adapter():
            no_lora = fx3.peft_model(input_ids=input_ids, **mm).logits
    diff = (ours - ref).abs().max().item()
    print(f"max |logit diff| vs peft un-merged: {diff:.3g}")
    assert diff <= 1e-5, diff
    assert (ours - no_lora).abs().max().item() > 1e-3


def _reference_predict(fx, config, text, seg_bias, max_new_tokens):
    """Sa2VA's Qwen3-VL predict_forward assembled from the un-converted pieces."""
    input_ids, mm = _reference_inputs(fx, config, text)
    seg_id = fx.tokenizer.convert_tokens_to_ids("[SEG]")
    stop = [fx.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    with torch.no_grad():
        out = fx.peft_model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **mm,
                                     max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                                     pad_token_id=stop[-1], sequence_bias={(seg_id,): seg_bias},
                                     output_hidden_states=True, return_dict_in_generate=True)
        gen = out.sequences[0, input_ids.shape[1]:]
        seg_states = [out.hidden_states[j + 1][-1][0, -1] for j, tok in enumerate(gen.tolist())
                      if tok == seg_id and j + 1 < len(out.hidden_states)]
        text_out = fx.tokenizer.decode(gen, skip_special_tokens=False).strip()
        size = config.sam2_image_size
        img = np.asarray(_image().resize((size, size), resample=Image.BICUBIC)).astype(np.float32) / 255.0
        x = torch.from_numpy(img).permute(2, 0, 1)[None]
        mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.bfloat16)[None, :, None, None]
        std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.bfloat16)[None, :, None, None]
        x = (x - mean) / std
        masks, probs = [], []
        for h in seg_states:
            emb = fx.text_hidden_fcs(h[None, None])
            o = meta_language_outputs(fx.meta_sam2, x, emb, multimask_output=True)
            logit = o["low_res_masks"][0, o["iou_scores"][0].argmax()][None, None]
            logit = F.interpolate(logit, size=(size, size), mode="bilinear", align_corners=False)
            logit = F.interpolate(logit, size=(IMAGE_H, IMAGE_W), mode="bilinear", align_corners=False)
            p = logit[0].sigmoid()
            probs.append(p.numpy())
            masks.append((p > 0.5).numpy())
    return text_out, masks, probs


def test_predict_forward_equals_reference_from_unconverted_pieces(model3, fx3):
    text = "Please segment the red box."
    seg = fx3.tokenizer.convert_tokens_to_ids("[SEG]")
    ref_text, ref_masks, ref_probs = _reference_predict(fx3, model3.config, text, 12.0, max_new_tokens=5)
    assert len(ref_masks) >= 1
    out = model3.predict_forward(image=_image(), text="<image>" + text, tokenizer=fx3.tokenizer, max_new_tokens=5,
                                 return_probabilities=True, generation_kwargs={"sequence_bias": {(seg,): 12.0}})
    assert out["prediction"] == ref_text
    assert len(out["prediction_masks"]) == len(ref_masks)
    differing = 0
    for m, rm, p, rp in zip(out["prediction_masks"], ref_masks, out["prediction_probabilities"], ref_probs):
        assert m.dtype == np.bool_ and m.shape == (1, IMAGE_H, IMAGE_W)
        assert np.abs(p - rp).max() <= 1e-5, np.abs(p - rp).max()
        clear = np.abs(rp - 0.5) > 1e-5
        assert np.array_equal(m[clear], rm[clear])
        assert clear.mean() > 0.99
        differing += int((m != rm).sum())
    print(f"{len(ref_masks)} masks, {differing} differing pixels")
    # a batch (with a text-only row) gives the same answer and masks as one by one
    batch = model3.predict_forward(image=[_image(), None], text=["<image>" + text, "Hello"], tokenizer=fx3.tokenizer,
                                   max_new_tokens=5, generation_kwargs={"sequence_bias": {(seg,): 12.0}})
    assert batch[0]["prediction"] == out["prediction"]
    assert all(np.array_equal(a, b) for a, b in zip(batch[0]["prediction_masks"], out["prediction_masks"]))
    assert batch[1]["prediction_masks"] == []


def test_export_loads_and_predicts_in_a_process_without_maskport(export3_bf16, tmp_path):
    from tests.test_convert_e2e import LOAD_WITHOUT_MASKPORT

    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONNOUSERSITE": "1"}
    r = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_MASKPORT, str(export3_bf16.out_dir)], capture_output=True,
                       text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["missing"] == [] and res["unexpected"] == [] and res["mismatched"] == []
    assert res["dtype"] == "torch.bfloat16" and "[SEG]" in res["prediction"]
    assert len(res["masks"]) >= 1 and all(m == ["bool", [1, 150, 200]] for m in res["masks"])
    assert res["text_only_masks"] == 0


def test_golden_mapping_tsv(fx3):
    from pathlib import Path

    from maskport.convert.api import convert_mmengine_to_hf
    from tests.golden import check_mapping_tsv

    res = convert_mmengine_to_hf(fx3.ckpt, base=fx3.base_dir, sam2=fx3.sam2_pt, out=None, dry_run=True, progress=False)
    check_mapping_tsv(Path(__file__).resolve().parent.parent / "docs" / "families" / f"{NAME}.mapping.tsv", res.report)


def test_gptq_quantizes_the_decoder_and_predicts_awq_is_refused(export3_bf16, tmp_path):
    """GPTQ (GPTQModel) on the bf16 export: only the LLM decoder's linears are packed, the rest is bit-identical, and
    the quantized export predicts masks. AWQ is refused with one line before anything is loaded."""
    pytest.importorskip("gptqmodel", reason="maskport[quant] (gptqmodel) is not installed")
    pytest.importorskip("optimum", reason="maskport[quant] (optimum) is not installed")
    from safetensors import safe_open
    from transformers import AutoModel, AutoTokenizer

    from maskport.errors import MissingInput
    from maskport.quantize.api import quantize_export
    from tests.test_quantize import DECODER_LINEAR_RE, _make_samples

    samples = _make_samples(tmp_path / "samples", n=4)
    with pytest.raises(MissingInput, match="--method awq .*use --method gptq"):
        quantize_export(export3_bf16.out_dir, tmp_path / "awq", method="awq", bits=4, group_size=32, calib=samples,
                        device="cpu", log=lambda m: None)
    assert not (tmp_path / "awq").exists()
    res = quantize_export(export3_bf16.out_dir, tmp_path / "gptq", method="gptq", bits=4, group_size=32,
                          calib=samples, device="cpu", log=lambda m: None)

    def tensors(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as st:
                out.update({k: st.get_tensor(k) for k in st.keys()})  # noqa: SIM118
        return out

    before, after = tensors(export3_bf16.out_dir), tensors(res.out_dir)
    packed = {k.rsplit(".", 1)[0] for k in after if k.endswith(".qweight")}
    assert packed and all(DECODER_LINEAR_RE.match(m) for m in packed)
    assert len(packed) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    for k, v in before.items():
        if k.rsplit(".", 1)[0] not in packed:
            assert torch.equal(after[k], v), k  # vision (DeepStack too), lm_head, SAM2, text_hidden_fcs untouched
    model = AutoModel.from_pretrained(res.out_dir, trust_remote_code=True, device_map="cpu").eval()
    tok = AutoTokenizer.from_pretrained(res.out_dir)
    seg = tok.convert_tokens_to_ids("[SEG]")
    out = model.predict_forward(image=_image(), text="<image>Please segment the red box.", tokenizer=tok,
                                max_new_tokens=4, generation_kwargs={"sequence_bias": {(seg,): 30.0}})
    assert "[SEG]" in out["prediction"] and out["prediction_masks"]
    assert all(m.shape == (1, IMAGE_H, IMAGE_W) for m in out["prediction_masks"])


def _tensors(folder):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_released_folder_imports_to_the_checkpoint_conversions_tensors(fx3, export3_fp32, tmp_path):
    """ByteDance's released layout (Sa2VA's tools/convert_to_hf.py: ``model.*`` = peft's merge_and_unload of the
    MLLM, the whole SAM2 under ``grounding_encoder.sam2_model.`` with ``g_weight``, ``text_hidden_fcs.*``, a
    ``sa2va_chat`` config holding the Qwen3-VL config) -> ``sa2va-hf-to-native``: every tensor bit for bit the
    conversion of the training checkpoint (float32: peft's merge and maskport's agree exactly here)."""
    from click.testing import CliRunner

    from maskport.cli import main
    from maskport.convert.api import convert_released_folder
    from maskport.testing.sa2va_qwen2_5_vl import make_released_folder

    src = make_released_folder(fx3, tmp_path / "released")
    res = convert_released_folder(command="sa2va-hf-to-native", src=src, out=tmp_path / "native", dtype="fp32", progress=False, log=lambda *a: None,
                                     sam2_config=fx3.sam2_pt.with_suffix(".config.json"))  # tiny SAM2: no preset
    assert res.family == NAME
    cov = res.report["coverage"]
    assert cov["unaccounted"] == [] and cov["sources"]["base"]["used"] == cov["sources"]["base"]["tensors"]
    a, b = _tensors(res.out_dir), _tensors(export3_fp32.out_dir)
    assert sorted(a) == sorted(b) and len(a) == cov["targets"]
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    cfg_a = json.loads((res.out_dir / "config.json").read_text())
    cfg_b = json.loads((export3_fp32.out_dir / "config.json").read_text())
    for key in ("mllm_config", "sam2_config", "seg_token_id", "special_tokens", "image_processor", "template"):
        assert cfg_a[key] == cfg_b[key], key
    # the CLI picks the family from the folder's config
    r = CliRunner().invoke(main, ["convert", "sa2va-hf-to-native", str(src), "--dry-run", "--sam2-config",
                                  str(fx3.sam2_pt.with_suffix(".config.json"))])
    assert r.exit_code == 0 and f"family: {NAME}" in r.output, r.output


def test_a_checkpoint_without_training_config_needs_the_family_flag(fx3, export3_bf16, tmp_path):
    """zero_to_fp32-style output (a bare state dict, no training config): the key names alone cannot tell Qwen3-VL
    from Qwen2.5-VL. Detection takes the Qwen2.5-VL family, which refuses the Qwen3-VL base in one line pointing to
    --family; with --family sa2va-qwen3-vl the conversion equals the one of the mmengine checkpoint."""
    from maskport.convert.api import convert_mmengine_to_hf
    from maskport.errors import WrongFamily

    sd = torch.load(fx3.ckpt, map_location="cpu", weights_only=False)["state_dict"]
    folder = tmp_path / "fp32_out"
    folder.mkdir()
    torch.save(sd, folder / "pytorch_model.bin")
    kw = dict(base=fx3.base_dir, sam2=fx3.sam2_pt, progress=False, lora_alpha=fx3.lora_alpha)
    with pytest.raises(WrongFamily, match="'qwen3_vl'.*--family"):
        convert_mmengine_to_hf(folder, out=tmp_path / "auto", **kw)
    res = convert_mmengine_to_hf(folder, out=tmp_path / "forced", family=NAME, **kw)
    a, b = _tensors(res.out_dir), _tensors(export3_bf16.out_dir)
    assert sorted(a) == sorted(b) and [k for k in a if not torch.equal(a[k], b[k])] == []


def test_back_to_training_pth_gives_peft_merge_of_the_trained_model(fx3, export3_fp32, tmp_path):
    """hf-to-mmengine on this family: export -> .pth holds every tensor the training checkpoint holds, under its
    un-wrapped name, equal to peft's own merge of the fixture's trained model (LoRA'd linears within 1e-6, the rest
    bit-equal), and nothing frozen."""
    from maskport.convert.inverse import convert_hf_to_mmengine
    from tests.test_hf_to_mmengine import _qwen_merged_reference, load, unwrapped

    out = tmp_path / "sa2va_qwen3.pth"
    res = convert_hf_to_mmengine(export3_fp32.out_dir, out=out, progress=False)
    sd = load(out)
    ckpt = torch.load(fx3.ckpt, map_location="cpu", weights_only=False)["state_dict"]
    trained = {unwrapped(k) for k in ckpt}
    assert trained <= set(sd), sorted(trained - set(sd))[:5]
    ref = _qwen_merged_reference(fx3)
    assert set(sd) <= set(ref), sorted(set(sd) - set(ref))[:5]
    lora_layers = {unwrapped(k) for k in ckpt if ".lora_A." in k}
    assert lora_layers
    for k, v in sd.items():
        assert tuple(v.shape) == tuple(ref[k].shape), k
        if k in lora_layers:
            torch.testing.assert_close(v, ref[k].float(), rtol=0, atol=1e-6)
        else:
            assert torch.equal(v, ref[k].float()), k
    assert not any(k.startswith(("mllm.model.model.visual.", "grounding_encoder.sam2_model.image_encoder."))
                   for k in sd)
    assert res.tensors == len(sd)
