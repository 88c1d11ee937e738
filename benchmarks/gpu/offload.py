"""benchmarks/multigpu.md section 3: an export that does not fit where it runs.

Loads one export three ways and predicts the same samples with each:

* ``gpu``: the whole model on ``cuda:0`` (the reference);
* ``gpu+cpu``: ``device_map="auto"`` with ``max_memory={0: GPU_BUDGET, "cpu": ...}`` (part of the model lives on the
  CPU and accelerate moves each offloaded module to the GPU while it runs);
* ``gpu+cpu+disk``: the same with a small CPU budget too, the rest memory-mapped from an ``offload_folder``.

For each: the placement (bytes per device), load time, per-sample latency, the GPU's peak allocated memory, and the
answers and masks compared with the reference (differing mask pixels, largest probability difference). Writes one JSON
object to ``--json-out``. Random-weight exports never emit ``[SEG]`` by themselves, so generation gets
``sequence_bias={"[SEG]": 30.0}`` (as the verify benchmarks do).

    python benchmarks/gpu/offload.py EXPORT --json-out OUT.json [--gpu-budget 6GiB] [--cpu-budget 4GiB] [--samples 4]
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoModel, AutoTokenizer


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(640, 480), (480, 640), (800, 600), (512, 512)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for (w, h) in
            (sizes[i % len(sizes)] for i in range(n))]


def _placement(model) -> dict:
    counts: Counter = Counter()
    dmap = getattr(model, "hf_device_map", None) or {"": "cuda:0"}
    params = dict(model.named_parameters())
    for name, p in params.items():
        dev = next((str(d) for prefix, d in sorted(dmap.items(), key=lambda kv: -len(kv[0]))
                    if prefix == "" or name == prefix or name.startswith(prefix + ".")), "?")
        counts[dev] += p.numel() * p.element_size()
    return {k: round(v / 2**30, 2) for k, v in sorted(counts.items())}


def run(export: Path, mode: str, tok, images, texts, gpu_budget: str, cpu_budget: str, offload_dir: Path) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    kw: dict = {"trust_remote_code": True, "dtype": torch.bfloat16}
    if mode == "gpu":
        kw["device_map"] = "cuda:0"
    elif mode == "gpu+cpu":
        kw.update(device_map="auto", max_memory={0: gpu_budget, "cpu": "200GiB"})
    else:
        kw.update(device_map="auto", max_memory={0: gpu_budget, "cpu": cpu_budget}, offload_folder=str(offload_dir))
    t = time.perf_counter()
    model = AutoModel.from_pretrained(export, **kw).eval()
    load_s = time.perf_counter() - t
    gen = {"sequence_bias": {(tok.convert_tokens_to_ids("[SEG]"),): 30.0}}
    outs, lat = [], []
    model.predict_forward(image=images[0], text=texts[0], tokenizer=tok, max_new_tokens=2, generation_kwargs=gen)
    for im, tx in zip(images, texts):
        torch.cuda.synchronize()
        t = time.perf_counter()
        outs.append(model.predict_forward(image=im, text=tx, tokenizer=tok, max_new_tokens=8,
                                          return_probabilities=True, generation_kwargs=gen))
        torch.cuda.synchronize()
        lat.append(time.perf_counter() - t)
    row = {"mode": mode, "placement_GiB": _placement(model), "load_s": round(load_s, 1),
           "latency_s": [round(x, 3) for x in lat], "latency_median_s": round(float(np.median(lat)), 3),
           "gpu_peak_allocated_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    del model
    torch.cuda.empty_cache()
    return row, outs


def compare(ref: list, got: list) -> dict:
    same_text = all(a["prediction"] == b["prediction"] for a, b in zip(ref, got))
    n_masks = [len(a["prediction_masks"]) for a in ref]
    same_count = all(len(a["prediction_masks"]) == len(b["prediction_masks"]) for a, b in zip(ref, got))
    diff_px = prob = 0
    if same_count:
        for a, b in zip(ref, got):
            for ma, mb in zip(a["prediction_masks"], b["prediction_masks"]):
                diff_px += int((ma != mb).sum())
            for pa, pb in zip(a["prediction_probabilities"], b["prediction_probabilities"]):
                prob = max(prob, float(np.abs(pa - pb).max()))
    return {"answers_equal": same_text, "masks_per_sample": n_masks, "mask_counts_equal": same_count,
            "differing_mask_pixels": diff_px, "max_probability_diff": prob,
            "mask_pixels": int(sum(m.size for a in ref for m in a["prediction_masks"]))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("export", type=Path)
    ap.add_argument("--json-out", type=Path, required=True)
    ap.add_argument("--gpu-budget", default="6GiB")
    ap.add_argument("--cpu-budget", default="4GiB")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--modes", default="gpu,gpu+cpu,gpu+cpu+disk")
    a = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(a.export, trust_remote_code=True)
    images = _images(a.samples)
    texts = ["Please segment the object in the middle."] * a.samples
    offload = Path(tempfile.mkdtemp(prefix="offload-"))
    result = {"export": str(a.export), "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "gpu_budget": a.gpu_budget, "cpu_budget": a.cpu_budget,
              "samples": [im.size for im in images], "runs": []}
    ref = None
    try:
        for mode in a.modes.split(","):
            row, outs = run(a.export, mode, tok, images, texts, a.gpu_budget, a.cpu_budget, offload)
            if ref is None:
                ref = outs
            else:
                row["vs_" + a.modes.split(",")[0]] = compare(ref, outs)
            result["runs"].append(row)
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(offload, ignore_errors=True)
        a.json_out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
