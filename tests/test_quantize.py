"""maskport quantize: GPTQ and AWQ (GPTQModel) on the genuine tiny export, loaded back through AutoModel.

Needs the optional extra (``pip install 'maskport[quant]'``: gptqmodel + optimum); skipped without it.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("gptqmodel", reason="maskport[quant] (gptqmodel) is not installed")
pytest.importorskip("optimum", reason="maskport[quant] (optimum) is not installed")

EXCLUDED = ("mllm.model.visual.", "mllm.lm_head.", "sam2.", "text_hidden_fcs.")
DECODER_LINEAR_RE = re.compile(r"^mllm\.model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$")
H, W = 150, 200


def _make_samples(root, n=6, with_gt=True):
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        rng = np.random.RandomState(i)
        a = (rng.rand(224, 280, 3) * 255).astype(np.uint8)
        a[40 + 5 * i:140, 60:200] = [220, 30, 30]
        Image.fromarray(a).save(root / f"{i}.png")
        row = {"image": f"{i}.png", "prompt": "<image>Please segment the red box."}
        if with_gt:
            m = np.zeros((224, 280), np.uint8)
            m[40 + 5 * i:140, 60:200] = 255
            Image.fromarray(m).save(root / f"{i}_gt.png")
            row["gt_mask"] = f"{i}_gt.png"
        if i == 0:
            row["answer"] = "It is [SEG]."
        rows.append(row)
    path = root / "samples.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def samples_jsonl(tmp_path_factory):
    return _make_samples(tmp_path_factory.mktemp("quant_samples"))


@pytest.fixture(scope="module")
def quantized(export_bf16, samples_jsonl, tmp_path_factory):
    """GPTQ and AWQ 4-bit exports of the fixture (group size 32: the tiny model's hidden size is 64)."""
    from maskport.quantize.api import quantize_export

    root = tmp_path_factory.mktemp("quantized")
    out = {}
    for method in ("gptq", "awq"):
        out[method] = quantize_export(export_bf16.out_dir, root / f"sa2va-{method}", method=method, bits=4,
                                      group_size=32, calib=samples_jsonl, device="cpu",
                                      save_mllm=root / f"sa2va-{method}-mllm", log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def reference_model(export_bf16):
    from transformers import AutoModel

    return AutoModel.from_pretrained(export_bf16.out_dir, trust_remote_code=True).eval()


def _load(path, **kw):
    from transformers import AutoModel

    model, info = AutoModel.from_pretrained(path, trust_remote_code=True, output_loading_info=True, **kw)
    return model.eval(), info


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_only_decoder_linears_are_quantized_and_the_rest_is_bit_identical(quantized, reference_model, method):
    model, info = _load(quantized[method].out_dir)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info.get("mismatched_keys")
    ref_params = dict(reference_model.named_parameters())
    ref_params.update(dict(reference_model.named_buffers()))

    quantized_modules = []
    for name, mod in model.named_modules():
        is_quant = hasattr(mod, "qweight")
        if DECODER_LINEAR_RE.match(name):
            assert is_quant, f"{name} is {type(mod).__name__}, not a quantized linear"
            assert mod.qweight.dtype == torch.int32 and mod.qweight.numel() > 0
            assert mod.scales.dtype.is_floating_point and torch.isfinite(mod.scales).all()
            quantized_modules.append(name)
        else:
            assert not is_quant, f"{name} ({type(mod).__name__}) must not be quantized"
            assert not isinstance(mod, torch.nn.Linear) or not name.startswith(
                "mllm.model.language_model.layers.") or not DECODER_LINEAR_RE.match(name)
    n_layers = reference_model.config.mllm_config.text_config.num_hidden_layers
    assert len(quantized_modules) == 7 * n_layers

    checked = 0
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if not name.startswith(EXCLUDED):
            continue
        # floating (weights kept in the export's dtype), or an integer index buffer (Sam2VideoModel's memory-attention
        # RoPE positions, computed at init, never quantized)
        assert tensor.dtype.is_floating_point or name.endswith("memory_attention.position_ids"), name
        ref = ref_params[name]
        assert tensor.shape == ref.shape and tensor.dtype == ref.dtype, name
        assert torch.equal(tensor, ref), f"{name} differs from the unquantized export"
        checked += 1
    assert checked > 100
    # embeddings too (an nn.Embedding, never converted)
    emb = "mllm.model.language_model.embed_tokens.weight"
    assert torch.equal(dict(model.named_parameters())[emb], ref_params[emb])


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_config_names_the_excluded_modules_with_full_prefixes(quantized, method):
    cfg = json.loads((quantized[method].out_dir / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == method and qc["bits"] == 4 and qc["group_size"] == 32
    assert qc["modules_to_not_convert"] == ["mllm.model.visual", "mllm.lm_head", "sam2", "text_hidden_fcs"]
    if method == "gptq":
        assert qc["block_name_to_quantize"] == "mllm.model.language_model.layers"
        assert qc["checkpoint_format"] == "gptq" and qc["sym"] is True
    else:
        assert qc["version"] == "gemm" and qc["zero_point"] is True  # AWQ default: asymmetric, GEMM
    assert cfg["auto_map"] and cfg["model_type"] == "maskport_sa2va_qwen2_5_vl"
    assert cfg["maskport"]["quantization"]["method"] == method


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_quantized_export_predicts_masks(quantized, method, fx):
    from transformers import AutoTokenizer

    model, _ = _load(quantized[method].out_dir, device_map="cpu")
    tok = AutoTokenizer.from_pretrained(quantized[method].out_dir, trust_remote_code=True)
    seg = tok.convert_tokens_to_ids("[SEG]")
    img = Image.fromarray((np.random.RandomState(1).rand(H, W, 3) * 255).astype("uint8"))
    out = model.predict_forward(image=img, text="<image>Please segment the object.", tokenizer=tok,
                                max_new_tokens=4, return_probabilities=True,
                                generation_kwargs={"sequence_bias": {(seg,): 30.0}})
    assert "[SEG]" in out["prediction"]
    assert len(out["prediction_masks"]) >= 1
    for m, p in zip(out["prediction_masks"], out["prediction_probabilities"]):
        assert m.dtype == np.bool_ and m.shape == (1, H, W)
        assert np.isfinite(p).all()


def test_report_sizes_show_packed_decoder_linears(quantized):
    for method, res in quantized.items():
        rep = json.loads((res.out_dir / "quantization_report.json").read_text())
        before, after = rep["sizes"]["before"], rep["sizes"]["after"]
        lin_b, lin_a = before["param_bytes"]["decoder_linears"], after["param_bytes"]["decoder_linears"]
        assert lin_a < 0.5 * lin_b, (method, lin_b, lin_a)  # bf16 -> 4-bit + group scales/zeros
        for part in ("vision", "sam2", "text_hidden_fcs", "embeddings_lm_head_norm"):
            assert after["param_bytes"][part] == before["param_bytes"][part], (method, part)
        assert after["files_bytes"] < before["files_bytes"]
        assert rep["quantized_modules_count"] == len(rep["quantized_modules"]) > 0
        cal = rep["calibration"]
        assert cal["source"] == "samples" and cal["samples"] == 6 and cal["image_tokens"] > 0
        assert cal["seg_token_in_every_batch"]
        assert (res.out_dir / "modeling_sa2va_qwen.py").is_file() and (res.out_dir / "tokenizer.json").is_file()
        assert "Quantization (maskport quantize)" in (res.out_dir / "README.md").read_text()


def test_standalone_language_model_loads_with_transformers(quantized):
    """--save-mllm keeps GPTQModel's own Qwen2.5-VL folder: a plain quantized Qwen2.5-VL (GPTQModel / vLLM)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    d = quantized["gptq"].report["standalone_mllm"]
    assert (quantized["gptq"].out_dir.parent / "sa2va-gptq-mllm" / "quantize_config.json").is_file()
    m = Qwen2_5_VLForConditionalGeneration.from_pretrained(d).eval()
    assert hasattr(m.model.language_model.layers[0].self_attn.q_proj, "qweight")
    with torch.no_grad():
        logits = m(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_composite_language_model_equals_gptqmodel_output_and_tracks_bf16(quantized, reference_model, export_bf16,
                                                                         samples_jsonl, method):
    """The composite's mllm is GPTQModel's quantized Qwen2.5-VL (layer norms included: AWQ folds its scales into
    them), and its logits on a calibration-style image batch stay close to the bf16 export's."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from maskport.quantize.calibration import build_calibration
    from maskport.verify.samples import load_jsonl

    model, _ = _load(quantized[method].out_dir)
    standalone = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        quantized[method].report["standalone_mllm"], dtype=model.mllm.dtype).eval()
    tok = AutoTokenizer.from_pretrained(export_bf16.out_dir, trust_remote_code=True)
    batch = build_calibration(reference_model, tok, load_jsonl(samples_jsonl)[1:2], n_samples=1,
                              log=lambda m: None).batches[0]
    with torch.no_grad():
        ours = model.mllm(**batch).logits.float()
        theirs = standalone(**batch).logits.float()
        ref = reference_model.mllm(**batch).logits.float()
    assert torch.allclose(ours, theirs, atol=1e-3, rtol=0), (ours - theirs).abs().max()
    cos = torch.nn.functional.cosine_similarity(ours.flatten(), ref.flatten(), dim=0).item()
    assert cos > 0.95, cos


# ------------------------------------------------------------------------------------------------ calibration


def test_calibration_teacher_forces_the_answer_after_real_image_tokens(reference_model, export_bf16, samples_jsonl):
    from transformers import AutoTokenizer

    from maskport.quantize.calibration import build_calibration
    from maskport.verify.samples import load_jsonl

    tok = AutoTokenizer.from_pretrained(export_bf16.out_dir, trust_remote_code=True)
    samples = load_jsonl(samples_jsonl)
    cs = build_calibration(reference_model, tok, samples, n_samples=3, max_seq_len=2048, log=lambda m: None)
    assert len(cs.batches) == 3
    image_id = reference_model.config.mllm_config.image_token_id
    for i, b in enumerate(cs.batches):
        ids = b["input_ids"][0]
        n_img = int((ids == image_id).sum())
        assert n_img == int(b["image_grid_thw"].prod()) // 4 > 0
        assert b["pixel_values"].shape[0] == int(b["image_grid_thw"].prod())
        text = tok.decode(ids, skip_special_tokens=False)
        answer = "It is [SEG]." if i == 0 else "Sure, [SEG]."
        assert text.endswith("<|im_start|>assistant\n" + answer + "<|im_end|>"), text[-80:]
        # the MLLM accepts the batch as predict_forward would feed it
    with torch.no_grad():
        logits = reference_model.mllm(**cs.batches[1]).logits
    assert torch.isfinite(logits.float()).all()

    short = build_calibration(reference_model, tok, samples, n_samples=2, max_seq_len=200, log=lambda m: None)
    for b in short.batches:
        assert b["input_ids"].shape[1] <= 200
        assert int((b["input_ids"][0] == image_id).sum()) == int(b["image_grid_thw"].prod()) // 4
    assert short.stats["image_budget_reduced"]

    with pytest.raises(ValueError, match="calib-text-only"):
        build_calibration(reference_model, tok, None)
    text_only = build_calibration(reference_model, tok, None, text_only=True, n_samples=3, log=lambda m: None)
    assert text_only.stats["source"] == "text-only" and "pixel_values" not in text_only.batches[0]


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_errors_are_one_line(export_bf16, tmp_path):
    from click.testing import CliRunner

    from maskport.quantize.command import quantize_command

    r = CliRunner().invoke(quantize_command, [str(export_bf16.out_dir), "-o", str(tmp_path / "q")])
    assert r.exit_code == 2 and "calibration samples are required" in r.output
    r = CliRunner().invoke(quantize_command, [str(tmp_path), "-o", str(tmp_path / "q"), "--calib-text-only"])
    assert r.exit_code == 2 and "not an export folder" in r.output
    r = CliRunner().invoke(quantize_command, [str(export_bf16.out_dir), "-o", str(tmp_path / "q"),
                                              "--calib-text-only", "--method", "awq", "--desc-act"])
    assert r.exit_code == 2 and "desc-act" in r.output
    r = CliRunner().invoke(quantize_command, [str(export_bf16.out_dir), "-o", str(tmp_path / "q"),
                                              "--calib-text-only", "--group-size", "48"])
    assert r.exit_code == 2 and "group-size" in r.output
    r = CliRunner().invoke(quantize_command, [str(export_bf16.out_dir), "-o", str(tmp_path / "q"),
                                              "--calib-text-only", "--kernel", "gptq_tritn"])
    assert r.exit_code == 2 and "unknown GPTQModel kernel 'gptq_tritn'" in r.output and "gptq_triton" in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "q").exists()


def test_cli_quantizes_and_runs_verify(export_bf16, samples_jsonl, tmp_path):
    from click.testing import CliRunner

    from maskport.quantize.command import quantize_command

    out = tmp_path / "q8"
    r = CliRunner().invoke(quantize_command, [
        str(export_bf16.out_dir), "-o", str(out), "--method", "gptq", "--bits", "8", "--group-size", "32",
        "--calib", str(samples_jsonl), "--calib-samples", "4", "--device", "cpu",
        "--verify-samples", str(samples_jsonl), "--verify-device", "cpu", "--verify-max-new-tokens", "6",
        "--min-dice", "0.0",
        "--max-giou-drop", "1.0"])
    assert r.exit_code in (0, 1), r.output
    assert (out / "quantization_report.json").is_file()
    rep = json.loads((out / "quantization_report.json").read_text())
    assert rep["settings"]["bits"] == 8 and rep["calibration"]["samples"] == 4
    assert "verify" in rep and (tmp_path / "q8.verify" / "report.json").is_file()
    assert (r.exit_code == 0) == rep["verify"]["passed"]


def test_failed_verify_gate_fails_the_command_and_keeps_the_report(export_bf16, tmp_path, monkeypatch):
    """The gate's verdict decides the exit code (1); the output and its report stay for inspection."""
    from click.testing import CliRunner

    from maskport.quantize import api
    from maskport.quantize.command import quantize_command

    class FakeVerify:
        passed, verdict, failures = False, "FAIL", ["mean Dice 0.50 < 0.95"]

        def __init__(self, out):
            self.report_dir = api.verify_report_dir(out)

    calls = []

    def fake_run_verify(export_dir, out, samples, options, log=print):
        calls.append((export_dir, out, samples, options))
        return FakeVerify(out)

    monkeypatch.setattr(api, "run_verify", fake_run_verify)
    out = tmp_path / "q"
    r = CliRunner().invoke(quantize_command, [str(export_bf16.out_dir), "-o", str(out), "--group-size", "32",
                                              "--calib-text-only", "--calib-samples", "2", "--device", "cpu",
                                              "--verify-samples", "val.jsonl", "--min-dice", "0.97"])
    assert r.exit_code == 1, r.output
    assert "failed verify" in r.output and "mean Dice 0.50" in r.output
    assert calls and calls[0][1] == out and calls[0][3]["min_dice"] == 0.97
    rep = json.loads((out / "quantization_report.json").read_text())
    assert rep["verify"]["passed"] is False and rep["calibration"]["source"] == "text-only"


def test_a_folder_of_another_model_type_is_refused_naming_the_known_families(tmp_path):
    from click.testing import CliRunner

    from maskport.quantize.command import quantize_command

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    r = CliRunner().invoke(quantize_command, [str(tmp_path / "m"), "-o", str(tmp_path / "q"), "--calib-text-only"])
    assert r.exit_code == 2, r.output
    assert "model_type='qwen2_5_vl'" in r.output and "sa2va-internvl" in r.output and "sa2va-qwen2_5-vl" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "q").exists()
