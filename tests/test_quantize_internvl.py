"""maskport quantize on the InternVL family: GPTQ on a Qwen2-LLM export, AWQ on an InternLM2 (Llama-layout)
export, both loaded back through AutoModel.

What is checked against something independent: the unquantized export's tensors (everything outside the decoder
linears must be bit-identical), GPTQModel's own standalone output (the composite's language model must equal it),
transformers' ``AutoProcessor``/``InternVLForConditionalGeneration`` (the standalone folder must load in them), and
the export's ``predict_forward`` inputs (the calibration batch must be what it feeds the MLLM).
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

from tests.test_quantize import _make_samples  # noqa: E402

EXCLUDED = ("mllm.model.vision_tower", "mllm.model.multi_modal_projector", "mllm.lm_head", "sam2",
            "text_hidden_fcs")
DECODER_LINEAR_RE = re.compile(
    r"^mllm\.model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$")
CASES = {"qwen2": "gptq", "internlm2": "awq"}


def _convert(fx, out):
    from maskport.convert.api import convert_mmengine_to_hf

    return convert_mmengine_to_hf(fx.ckpt, base=fx.base_dir, sam2=fx.sam2_pt, out=out, progress=False,
                                  log=lambda *a: None, dtype="bf16")


@pytest.fixture(scope="module")
def samples_jsonl(tmp_path_factory):
    return _make_samples(tmp_path_factory.mktemp("internvl_quant_samples"))


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory, samples_jsonl):
    """(llm, method, bf16 export, quantized result) for each case."""
    from maskport.quantize.api import quantize_export
    from maskport.testing.sa2va_internvl import make_internvl_fixture
    from maskport.testing.tokenizers import make_internlm2_tokenizer_dir

    llm = request.param
    root = tmp_path_factory.mktemp(f"internvl_quant_{llm}")
    tok_dir = make_internlm2_tokenizer_dir(root / "tok") if llm == "internlm2" else None
    fx = make_internvl_fixture(root / "fx", llm=llm, version="v2", tokenizer_dir=tok_dir)
    export = _convert(fx, root / "export-bf16")
    method = CASES[llm]
    res = quantize_export(export.out_dir, root / f"q-{method}", method=method, bits=4, group_size=32,
                          calib=samples_jsonl, device="cpu", save_mllm=root / f"q-{method}-mllm",
                          log=lambda m: None)
    return llm, method, export, res


def _load(path, **kw):
    from transformers import AutoModel

    model, info = AutoModel.from_pretrained(path, trust_remote_code=True, output_loading_info=True, **kw)
    return model.eval(), info


def test_only_decoder_linears_are_quantized_and_the_rest_is_bit_identical(case):
    llm, method, export, res = case
    ref, _ = _load(export.out_dir)
    model, info = _load(res.out_dir)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info.get("mismatched_keys")
    assert type(model.mllm.model.language_model).__name__ == ("LlamaModel" if llm == "internlm2" else "Qwen2Model")
    quantized = [n for n, m in model.named_modules() if hasattr(m, "qweight")]
    assert quantized and all(DECODER_LINEAR_RE.match(n) for n in quantized), quantized[:3]
    assert len(quantized) == 7 * ref.config.mllm_config.text_config.num_hidden_layers
    ref_t = {**dict(ref.named_parameters()), **dict(ref.named_buffers())}
    checked = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.startswith(EXCLUDED) or name == "mllm.model.language_model.embed_tokens.weight":
            assert t.dtype == ref_t[name].dtype and torch.equal(t, ref_t[name]), name
            checked += 1
    assert checked > 100
    # the vision tower and projector are there (not an empty prefix)
    assert any(n.startswith("mllm.model.vision_tower.") for n in ref_t)
    assert any(n.startswith("mllm.model.multi_modal_projector.") for n in ref_t)


def test_config_and_report_name_the_internvl_exclusions(case):
    llm, method, export, res = case
    cfg = json.loads((res.out_dir / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == method and qc["bits"] == 4 and qc["group_size"] == 32
    assert qc["modules_to_not_convert"] == list(EXCLUDED)
    assert cfg["model_type"] == "maskport_sa2va_internvl"
    rep = json.loads((res.out_dir / "quantization_report.json").read_text())
    assert rep["family"] == "sa2va-internvl"
    before, after = rep["sizes"]["before"]["param_bytes"], rep["sizes"]["after"]["param_bytes"]
    assert after["decoder_linears"] < 0.5 * before["decoder_linears"]
    for part in ("vision", "sam2", "text_hidden_fcs", "embeddings_lm_head_norm"):
        assert before[part] > 0 and after[part] == before[part], part
    assert "other" not in before
    cal = rep["calibration"]
    assert cal["samples"] == 6 and cal["image_tokens"] > 0 and cal["seg_token_in_every_batch"]


def test_composite_equals_gptqmodel_output_and_tracks_bf16(case, samples_jsonl):
    """The composite's mllm is GPTQModel's quantized InternVL; on a calibration batch its logits equal the
    standalone folder's (loaded by transformers alone) and stay close to the bf16 export's."""
    from transformers import AutoProcessor, AutoTokenizer, InternVLForConditionalGeneration

    from maskport.quantize.calibration import build_calibration
    from maskport.verify.samples import load_jsonl

    llm, method, export, res = case
    ref, _ = _load(export.out_dir)
    model, _ = _load(res.out_dir)
    standalone_dir = res.report["standalone_mllm"]
    standalone = InternVLForConditionalGeneration.from_pretrained(standalone_dir, dtype=model.mllm.dtype).eval()
    proc = AutoProcessor.from_pretrained(standalone_dir)
    assert proc.image_token == "<IMG_CONTEXT>" and proc.image_seq_length == ref.config.mllm_config.image_seq_length
    tok = AutoTokenizer.from_pretrained(export.out_dir, trust_remote_code=True)
    batch = build_calibration(ref, tok, load_jsonl(samples_jsonl)[1:2], n_samples=1, log=lambda m: None).batches[0]
    batch = {**batch, "pixel_values": batch["pixel_values"].to(model.mllm.dtype)}
    # the language model's tensors are GPTQModel's, bit for bit
    ours_lm, theirs_lm = model.mllm.model.language_model.state_dict(), standalone.model.language_model.state_dict()
    assert set(ours_lm) == set(theirs_lm)
    for k, t in ours_lm.items():
        assert torch.equal(t, theirs_lm[k].to(t.dtype)), k
    with torch.no_grad():
        ours = model.mllm(**batch).logits.float()
        theirs = standalone(**batch).logits.float()
        bf16 = ref.mllm(**batch).logits.float()
    assert torch.allclose(ours, theirs, atol=1e-3, rtol=0), (ours - theirs).abs().max()
    cos = torch.nn.functional.cosine_similarity(ours.flatten(), bf16.flatten(), dim=0).item()
    assert cos > 0.95, cos


class _Captured(Exception):
    pass


def _predict_input_ids(model, tok, sample) -> list[int]:
    """The ``input_ids`` ``predict_forward`` hands to generation for ``sample`` (captured, generation not run)."""
    seen = {}

    def capture(input_ids, *args, **kwargs):
        seen["ids"] = input_ids[0].tolist()
        raise _Captured

    model.generate_and_segment = capture
    try:
        model.predict_forward(image=sample.image(), text=sample.prompt, tokenizer=tok)
    except _Captured:
        pass
    finally:
        del model.generate_and_segment
    return seen["ids"]


def test_calibration_batch_is_what_predict_forward_feeds(case, samples_jsonl):
    from transformers import AutoTokenizer

    from maskport.quantize.calibration import build_calibration
    from maskport.verify.samples import load_jsonl

    llm, method, export, res = case
    ref, _ = _load(export.out_dir)
    tok = AutoTokenizer.from_pretrained(export.out_dir, trust_remote_code=True)
    samples = load_jsonl(samples_jsonl)
    cs = build_calibration(ref, tok, samples[:2], n_samples=2, log=lambda m: None)
    per_tile = ref.config.mllm_config.image_seq_length
    ctx = ref.config.mllm_config.image_token_id
    for i, b in enumerate(cs.batches):
        ids = b["input_ids"][0]
        # the same tiles predict_forward makes
        pv = ref.mllm_pixel_values(samples[i].image())
        assert torch.equal(b["pixel_values"].to(pv.dtype), pv)  # float32 here; predict casts to the tower dtype
        assert int((ids == ctx).sum()) == per_tile * pv.shape[0]
        # the ids predict_forward builds for this sample, then the answer
        prompt_ids = _predict_input_ids(ref, tok, samples[i])
        assert ids[: len(prompt_ids)].tolist() == prompt_ids
        answer = "It is [SEG]." if i == 0 else "Sure, [SEG]."
        tail = tok.decode(ids[len(prompt_ids):]).replace(" ", "")
        assert tail == (answer + ref.config.template["suffix"]).replace(" ", ""), tail
        assert (ids[0].item() == tok.bos_token_id) == bool(ref.config.add_bos_token)
    assert bool(ref.config.add_bos_token) == (llm == "internlm2")
    # a limit with room for one tile only: one tile, and the batch fits
    one_tile = max(b["input_ids"].shape[1] - int((b["input_ids"][0] == ctx).sum()) for b in cs.batches) + per_tile
    short = build_calibration(ref, tok, samples[:2], n_samples=2, max_seq_len=one_tile, log=lambda m: None)
    for b in short.batches:
        assert b["input_ids"].shape[1] <= one_tile and b["pixel_values"].shape[0] == 1
    if cs.batches[0]["pixel_values"].shape[0] > 1:
        assert short.stats["image_budget_reduced"]


def test_quantized_export_predicts_masks(case):
    from transformers import AutoTokenizer

    llm, method, export, res = case
    model, _ = _load(res.out_dir, device_map="cpu")
    tok = AutoTokenizer.from_pretrained(res.out_dir, trust_remote_code=True)
    seg = tok.convert_tokens_to_ids("[SEG]")
    h, w = 90, 120
    img = Image.fromarray((np.random.RandomState(1).rand(h, w, 3) * 255).astype("uint8"))
    out = model.predict_forward(image=img, text="<image>Please segment the object.", tokenizer=tok,
                                max_new_tokens=4, return_probabilities=True,
                                generation_kwargs={"sequence_bias": {(seg,): 30.0}})
    assert "[SEG]" in out["prediction"] and len(out["prediction_masks"]) >= 1
    for m, p in zip(out["prediction_masks"], out["prediction_probabilities"]):
        assert m.dtype == np.bool_ and m.shape == (1, h, w) and np.isfinite(p).all()
