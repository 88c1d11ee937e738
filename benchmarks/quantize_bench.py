"""Benchmarks behind ``benchmarks/quantize.md`` and ``benchmarks/multigpu.md`` (run by hand; not part of maskport).

Needs ``maskport`` importable (installed, or ``PYTHONPATH=src``); run from the repository root:

    # masks on the trained demo model: GPTQ/AWQ x 4/8 bits, Dice vs the bf16 export and gIoU vs GT
    python benchmarks/quantize_bench.py demo --export exports/demo --calib train.jsonl --samples heldout.jsonl

    # real shapes, random weights, on a GPU
    python benchmarks/quantize_bench.py shaped --size 3b --like exports/demo -o /tmp/sa2va-3b
    python benchmarks/quantize_bench.py shaped-internvl --size sa2va-8b --like exports/tiny-internlm2 -o /tmp/ivl8b
    python benchmarks/quantize_bench.py shaped-lisa --size lisa-13b --like exports/tiny-lisa -o /tmp/lisa13b
    python benchmarks/quantize_bench.py gpu --export /tmp/sa2va-3b --methods gptq,awq --bits 4

``shaped`` writes an export folder of Sa2VA-Qwen2.5-VL-3B/7B *shapes* (Qwen2.5-VL-3B/7B-Instruct text and
vision configs, SAM2 hiera-large) with random weights; the tokenizer, special-token ids, template and image
settings are borrowed from ``--like`` (any maskport export), so ``predict_forward`` runs unchanged.
``gpu`` quantizes it (time, peak GPU memory) and measures ``predict_forward`` latency and peak GPU memory of
the bf16 export and of each quantized one, each loaded with ``device_map="cuda"``.
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from maskport.testing.samples import synthetic_samples

QWEN25_VL = {
    "3b": {"text": {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
                         "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 128000,
                         "max_window_layers": 70, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                                                 "mrope_section": [16, 24, 24]}},
               "vision_out": 2048},
    "7b": {"text": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                         "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 128000,
                         "max_window_layers": 28, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                                                 "mrope_section": [16, 24, 24]}},
               "vision_out": 3584},
}
QWEN25_VL_VISION = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "patch_size": 14,
                        "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                        "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu", "in_channels": 3,
                        "tokens_per_second": 2}


@click.group()
def main():
    """maskport quantize benchmarks (benchmarks/quantize.md)."""


@main.command()
@click.option("--size", type=click.Choice(sorted(QWEN25_VL)), required=True)
@click.option("--like", type=click.Path(path_type=Path), required=True, help="A maskport export to borrow from.")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True)
@click.option("--device", default="auto")
@click.option("--layers", type=int, default=None, help="Fewer decoder layers (a quick check of the shapes).")
def shaped(size, like, out, device, layers):
    """Write a random-weight export with real Sa2VA-Qwen2.5-VL shapes."""
    from maskport.families.sa2va_qwen2_5_vl.remote import configuration_sa2va_qwen as C
    from maskport.families.sa2va_qwen2_5_vl.remote import modeling_sa2va_qwen as M
    from maskport.heads.sam2 import SAM2_PRESETS, hf_sam2_config

    like_cfg = json.loads((Path(like) / "config.json").read_text())
    mllm = copy.deepcopy(like_cfg["mllm_config"])
    spec = QWEN25_VL[size]
    mllm["text_config"].update(spec["text"])
    if layers:
        mllm["text_config"]["num_hidden_layers"] = int(layers)
    mllm["text_config"].pop("layer_types", None)
    mllm["vision_config"].update(QWEN25_VL_VISION, out_hidden_size=spec["vision_out"])
    mllm["tie_word_embeddings"] = False
    sam2 = hf_sam2_config(SAM2_PRESETS["sam2_hiera_large"])
    kw = {k: like_cfg[k] for k in ("seg_token", "seg_token_id", "special_tokens", "template", "image_processor",
                                   "sam2_multimask_output", "mask_threshold", "max_new_tokens") if k in like_cfg}
    cfg = C.Sa2VAQwenConfig(mllm_config=mllm, sam2_config=sam2.to_dict(), maskport={
        "family": "sa2va-qwen2_5-vl", "benchmark": f"random weights, Sa2VA-Qwen2.5-VL-{size.upper()} shapes"}, **kw)
    _write_shaped(M.Sa2VAQwenModel, cfg, out, like, device, "sa2va-qwen2_5-vl")


def _write_shaped(model_cls, cfg, out, like, device: str, family: str) -> None:
    """Instantiate ``model_cls(cfg)`` with random bf16 weights on ``device`` and write it as an export folder with
    the family's code and ``like``'s tokenizer."""
    import torch
    from transformers import AutoTokenizer

    from maskport.families import get_family
    from maskport.families._common import copy_export_code

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    t = time.time()
    torch.manual_seed(0)
    with torch.device(device):
        model = model_cls(cfg).to(torch.bfloat16)
    spec = get_family(family).spec
    cfg.architectures, cfg.auto_map = [spec.model_class], dict(spec.auto_map)
    model.config.architectures, model.config.auto_map = cfg.architectures, cfg.auto_map
    model.save_pretrained(out, max_shard_size="4GB")
    copy_export_code(Path(out), spec)
    AutoTokenizer.from_pretrained(like, trust_remote_code=True).save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    click.echo(json.dumps({"out": str(out), "params": n, "seconds": round(time.time() - t, 1)}))


# InternVL shapes: InternViT-300M-448px-V2_5 (both) and the language models of InternVL3-8B (Qwen2.5-7B) and
# Sa2VA-8B / InternVL2.5-8B (InternLM2.5-7B, exported as Llama); vocabularies with Sa2VA's 5 added tokens
INTERNVIT_300M = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
                  "image_size": [448, 448], "patch_size": [14, 14], "norm_type": "layer_norm", "use_qk_norm": False,
                  "attention_bias": True}
INTERNVL = {
    "internvl3-8b": {"llm": "qwen2", "text": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                                             "num_attention_heads": 28, "num_key_value_heads": 4,
                                             "vocab_size": 151679}},
    "sa2va-8b": {"llm": "llama", "text": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                                         "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                                         "vocab_size": 92558}},
}


@main.command("shaped-internvl")
@click.option("--size", type=click.Choice(sorted(INTERNVL)), required=True)
@click.option("--like", type=click.Path(path_type=Path), required=True,
              help="A maskport sa2va-internvl export with the same kind of language model to borrow from.")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True)
@click.option("--device", default="auto")
@click.option("--layers", type=int, default=None, help="Fewer decoder layers (real widths, less memory and time).")
def shaped_internvl(size, like, out, device, layers):
    """Write a random-weight export with real Sa2VA-InternVL shapes (448 px tiles, 256 tokens per tile)."""
    from maskport.families.sa2va_internvl.remote import configuration_sa2va_internvl as C
    from maskport.families.sa2va_internvl.remote import modeling_sa2va_internvl as M
    from maskport.heads.sam2 import SAM2_PRESETS, hf_sam2_config

    like_cfg = json.loads((Path(like) / "config.json").read_text())
    spec = INTERNVL[size]
    mllm = copy.deepcopy(like_cfg["mllm_config"])
    if mllm["text_config"]["model_type"] != spec["llm"]:
        raise click.UsageError(f"--like has a {mllm['text_config']['model_type']} language model; {size} needs "
                               f"{spec['llm']}")
    mllm["text_config"].update(spec["text"])
    if layers:
        mllm["text_config"]["num_hidden_layers"] = int(layers)
    mllm["text_config"].pop("layer_types", None)
    mllm["vision_config"].update(INTERNVIT_300M)
    mllm.update(image_seq_length=256, downsample_ratio=0.5, tie_word_embeddings=False)
    image_processor = dict(like_cfg["image_processor"], image_size=448, max_dynamic_patch=12, use_thumbnail=True)
    kw = {k: like_cfg[k] for k in ("seg_token", "seg_token_id", "special_tokens", "template", "add_bos_token",
                                   "sam2_multimask_output", "mask_threshold", "max_new_tokens") if k in like_cfg}
    cfg = C.Sa2VAInternVLConfig(mllm_config=mllm, sam2_config=hf_sam2_config(SAM2_PRESETS["sam2_hiera_large"]).to_dict(),
                                image_processor=image_processor, maskport={
                                    "family": "sa2va-internvl", "benchmark": f"random weights, {size} shapes"}, **kw)
    _write_shaped(M.Sa2VAInternVLModel, cfg, out, like, device, "sa2va-internvl")


# LISA shapes: LISA-7B-v1 (LLaVA-Lightning-7B: Llama-7B) and LISA-13B-llama2-v1 (Llama-2-13B), vocabulary 32000 +
# [SEG], <im_start>, <im_end>; CLIP ViT-L/14 at 224 px (256 image tokens); SAM ViT-H
LISA = {
    "lisa-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                "num_key_value_heads": 32, "vocab_size": 32003, "max_position_embeddings": 2048},
    "lisa-13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40,
                 "num_key_value_heads": 40, "vocab_size": 32003, "max_position_embeddings": 4096},
}
CLIP_L14_224 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                "image_size": 224, "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu",
                "layer_norm_eps": 1e-5}


@main.command("shaped-lisa")
@click.option("--size", type=click.Choice(sorted(LISA)), required=True)
@click.option("--like", type=click.Path(path_type=Path), required=True, help="A maskport lisa export to borrow from.")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True)
@click.option("--device", default="auto")
@click.option("--layers", type=int, default=None, help="Fewer decoder layers (real widths, less memory and time).")
def shaped_lisa(size, like, out, device, layers):
    """Write a random-weight export with real LISA shapes (Llama 7B/13B, CLIP ViT-L/14 224 px, SAM ViT-H)."""
    from maskport.families.lisa.remote import configuration_lisa as C
    from maskport.families.lisa.remote import modeling_lisa as M
    from maskport.heads.sam import hf_sam_config

    like_cfg = json.loads((Path(like) / "config.json").read_text())
    mllm = copy.deepcopy(like_cfg["mllm_config"])
    mllm["text_config"].update(LISA[size])
    if layers:
        mllm["text_config"]["num_hidden_layers"] = int(layers)
    mllm["text_config"].pop("layer_types", None)
    mllm["vision_config"].update(CLIP_L14_224)
    mllm.update(image_seq_length=256, tie_word_embeddings=False)
    image_processor = dict(like_cfg["image_processor"], shortest_edge=224, crop_size=224)
    kw = {k: like_cfg[k] for k in ("seg_token", "seg_token_id", "added_tokens", "template", "mask_threshold",
                                   "max_new_tokens") if k in like_cfg}
    cfg = C.LisaConfig(mllm_config=mllm, sam_config=hf_sam_config("vit_h").to_dict(), image_processor=image_processor,
                       maskport={"family": "lisa", "benchmark": f"random weights, {size} shapes"}, **kw)
    _write_shaped(M.LisaModel, cfg, out, like, device, "lisa")


def _kernel_override(method: str, bits: int, kernel: str):
    """A quantization_config whose loading attributes pick GPTQModel's ``kernel`` (e.g. gptq_triton)."""
    from transformers import AwqConfig, GPTQConfig

    if method == "gptq":
        return GPTQConfig(bits=bits, backend=kernel)
    return AwqConfig(bits=bits, backend=kernel)


def _measure_predict(path: Path, image, n_runs: int, max_new_tokens: int, dtype=None, quantization_config=None) -> dict:
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    kw = {"dtype": dtype} if dtype is not None else {}
    if quantization_config is not None:
        kw["quantization_config"] = quantization_config
    t = time.time()
    model = AutoModel.from_pretrained(path, trust_remote_code=True, device_map="cuda", **kw).eval()
    load_s = time.time() - t
    weights = torch.cuda.memory_allocated()
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    seg = tok.convert_tokens_to_ids("[SEG]")
    gk = {"sequence_bias": {(seg,): 30.0}}
    model.predict_forward(image=image, text="<image>Please segment the red box.", tokenizer=tok,
                          max_new_tokens=max_new_tokens, generation_kwargs=gk)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(n_runs):
        t = time.time()
        out = model.predict_forward(image=image, text="<image>Please segment the red box.", tokenizer=tok,
                                    max_new_tokens=max_new_tokens, generation_kwargs=gk)
        torch.cuda.synchronize()
        times.append(time.time() - t)
    res = {"load_s": round(load_s, 1), "weights_gpu_bytes": int(weights),
           "predict_peak_gpu_bytes": int(torch.cuda.max_memory_allocated()),
           "predict_s_median": round(float(np.median(times)), 3), "masks": len(out["prediction_masks"]),
           "dtype": str(model.dtype)}
    del model
    torch.cuda.empty_cache()
    return res


@main.command()
@click.option("--export", "export_dir", type=click.Path(path_type=Path), required=True)
@click.option("--methods", default="gptq,awq")
@click.option("--bits", default="4")
@click.option("--group-size", type=int, default=128)
@click.option("--calib", type=click.Path(path_type=Path), help="Default: 32 synthetic 640x480 samples.")
@click.option("--calib-samples", type=int, default=32)
@click.option("--runs", type=int, default=3)
@click.option("--max-new-tokens", type=int, default=8)
@click.option("--work", type=click.Path(path_type=Path), default=None)
@click.option("--json-out", type=click.Path(path_type=Path), default=None)
@click.option("--kernel", "kernels", default=None,
              help="GPTQModel kernels per method, e.g. gptq=gptq_triton,awq=awq_gemm_triton (default: its choice).")
def gpu(export_dir, methods, bits, group_size, calib, calib_samples, runs, max_new_tokens, work, json_out, kernels):
    """Quantize time/peak memory and predict_forward latency/peak memory, bf16 vs quantized."""
    import torch
    from PIL import Image

    from maskport.quantize.api import quantize_export

    work = Path(work or tempfile.mkdtemp(prefix="maskport-qbench-"))
    calib = calib or synthetic_samples(work / "calib", calib_samples)
    image = Image.open(synthetic_samples(work / "probe", 1).parent / "0.png").convert("RGB")
    results = {"device": torch.cuda.get_device_name(0), "export": str(export_dir), "runs": runs,
               "max_new_tokens": max_new_tokens, "bf16": _measure_predict(export_dir, image, runs, max_new_tokens)}
    click.echo(json.dumps(results["bf16"]), err=True)
    for method in methods.split(","):
        for b in bits.split(","):
            out = work / f"{method}-{b}"
            torch.cuda.reset_peak_memory_stats()
            t = time.time()
            # METHOD=QUANTIZE_KERNEL[:LOAD_KERNEL]: GPTQModel's kernel while quantizing (it must be able to pack the
            # format) and the loading backend of transformers' GPTQConfig/AwqConfig for predict_forward
            spec = dict(kv.split("=") for kv in kernels.split(",")).get(method) if kernels else None
            kernel, _, load_kernel = (spec or "").partition(":")
            kernel, load_kernel = kernel or None, load_kernel or kernel or None
            res = quantize_export(export_dir, out, method=method, bits=int(b), group_size=group_size, calib=calib,
                                  calib_samples=calib_samples, device="cuda", overwrite=True, kernel=kernel,
                                  log=lambda m: click.echo(m, err=True))
            entry = {"quantize_s": round(time.time() - t, 1), "quantize_peak_gpu_bytes": res.report["peak_gpu_bytes"],
                     "timings_s": res.report["timings_s"], "sizes": res.report["sizes"]}
            dtype = torch.float16 if method == "awq" else None
            qc = _kernel_override(method, int(b), load_kernel) if load_kernel else None
            entry["kernel"] = {"quantize": kernel or "auto", "load": load_kernel or "auto"}
            entry["predict"] = _measure_predict(out, image, runs, max_new_tokens, dtype=dtype, quantization_config=qc)
            results[f"{method}-{b}"] = entry
            click.echo(json.dumps(entry), err=True)
    text = json.dumps(results, indent=2)
    if json_out:
        Path(json_out).write_text(text + "\n")
    click.echo(text)


@main.command()
@click.option("--export", "export_dir", type=click.Path(path_type=Path), required=True)
@click.option("--calib", type=click.Path(path_type=Path), required=True)
@click.option("--samples", type=click.Path(path_type=Path), required=True, help="Held-out samples with gt_mask.")
@click.option("--group-size", type=int, default=32)
@click.option("--calib-samples", type=int, default=128)
@click.option("--configs", default="gptq-4,gptq-8,awq-4,awq-8")
@click.option("--work", type=click.Path(path_type=Path), default=None)
@click.option("--json-out", type=click.Path(path_type=Path), default=None)
def demo(export_dir, calib, samples, group_size, calib_samples, configs, work, json_out):
    """Dice vs the bf16 export and gIoU vs GT for each method x bits (verify's numbers)."""
    from maskport.quantize.api import quantize_export
    from maskport.verify.api import verify

    work = Path(work or tempfile.mkdtemp(prefix="maskport-qdemo-"))
    rows = {}
    for c in configs.split(","):
        method, b = c.split("-")
        out = work / c
        res = quantize_export(export_dir, out, method=method, bits=int(b), group_size=group_size, calib=calib,
                              calib_samples=calib_samples, device="auto", overwrite=True,
                              log=lambda m: click.echo(m, err=True))
        v = verify(str(export_dir), str(out), str(samples), report_dir=work / f"{c}.verify", device="auto",
                   progress=False)
        s = v.summary
        rows[c] = {"summary": s, "passed": v.passed, "sizes": res.report["sizes"],
                   "quantize_s": res.report["timings_s"]["quantize"]}
        click.echo(f"{c}: {json.dumps(s)[:400]}", err=True)
    text = json.dumps(rows, indent=2, default=str)
    if json_out:
        Path(json_out).write_text(text + "\n")
    click.echo(text)


if __name__ == "__main__":
    sys.exit(main())
