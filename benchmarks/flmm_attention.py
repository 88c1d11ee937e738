"""F-LMM attention maps: the export's row-recording attention (sdpa for the outputs, softmax rows of the phrase
tokens only) against F-LMM's way (eager attention with ``output_attentions=True`` and ``output_hidden_states=True``,
every layer's full ``[heads, seq, seq]`` matrix kept), on a LLaVA-1.5-7B-shaped LMM with random weights.

Measures, per sequence length, in the same process on the same GPU: peak GPU memory above the loaded model (torch's
``max_memory_allocated``), forward time (median of 3 after a warm-up), and the largest difference between the two
paths' phrase-row attention maps over the image tokens.

    python benchmarks/flmm_attention.py --out results.json [--seq 640 --seq 1600 --seq 3000] [--layers 32]

The export's code is imported from ``src/maskport/families/flmm/remote`` + ``src/maskport/heads/remote`` copied into a
temporary package (as it lies in an export folder), so maskport itself is not imported.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
IMAGE_TOKENS = 576  # 336 px / patch 14 = 24 x 24
IMAGE_ID = 32000


def export_code():
    tmp = Path(tempfile.mkdtemp(prefix="flmm_code_"))
    pkg = tmp / "flmm_export_code"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for f in (ROOT / "src/maskport/families/flmm/remote").glob("*_flmm.py"):
        shutil.copy(f, pkg / f.name)
    for name in ("image_utils", "sam_image"):
        shutil.copy(ROOT / f"src/maskport/heads/remote/{name}.py", pkg / f"{name}.py")
    sys.path.insert(0, str(tmp))
    return importlib.import_module("flmm_export_code.modeling_flmm"), tmp


def llava_7b_config(layers: int, smoke: bool = False):
    """LLaVA-1.5-7B's shapes (``smoke``: a small stand-in to check the script on a CPU)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    hidden, inter, heads, vlayers = (4096, 11008, 32, 24) if not smoke else (128, 256, 4, 1)
    text = LlamaConfig(vocab_size=32064, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=1024 if not smoke else 64, intermediate_size=4096 if not smoke else 128,
                              num_hidden_layers=vlayers, num_attention_heads=16 if not smoke else 2,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    return LlavaConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_index=IMAGE_ID,
                       image_seq_length=IMAGE_TOKENS, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, action="append", help="total sequence lengths (default 640, 1600, 3000)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--phrase-tokens", type=int, default=8)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="small shapes on the CPU (checks the script, no numbers)")
    args = ap.parse_args()
    seqs = args.seq or [640, 1600, 3000]
    mod, tmp = export_code()
    from transformers import LlavaForConditionalGeneration

    dev = torch.device("cpu" if args.smoke else "cuda")
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    cfg = llava_7b_config(args.layers, args.smoke)
    cfg.text_config._attn_implementation = "sdpa"
    with torch.device(dev):
        lmm = LlavaForConditionalGeneration(cfg).to(torch.bfloat16).eval()
    text_model = lmm.model.language_model
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    base = torch.cuda.memory_allocated() if cuda else 0
    pixel_values = torch.randn(1, 3, 336, 336, device=dev, dtype=torch.bfloat16)
    results = {"gpu": torch.cuda.get_device_name() if cuda else "cpu (smoke)", "torch": torch.__version__,
               "transformers": __import__("transformers").__version__, "layers": args.layers,
               "model_gib": base / 2**30, "date": time.strftime("%Y-%m-%d"), "points": []}

    for seq in seqs:
        g = torch.Generator().manual_seed(seq)
        pre = torch.randint(100, 32000, (30,), generator=g).tolist()
        post = torch.randint(100, 32000, (seq - 30 - IMAGE_TOKENS,), generator=g).tolist()
        ids = torch.tensor([[1] + pre + [IMAGE_ID] * IMAGE_TOKENS + post[:-1]], device=dev)
        rows = torch.arange(ids.shape[1] - args.phrase_tokens, ids.shape[1], device=dev)
        cols = torch.nonzero(ids[0] == IMAGE_ID, as_tuple=True)[0]
        mask = torch.ones_like(ids)

        def eager():
            text_model.config._attn_implementation_internal = "eager"
            try:
                out = lmm.model(input_ids=ids, pixel_values=pixel_values, attention_mask=mask, use_cache=False,
                                output_attentions=True, output_hidden_states=True)
                maps = [a[0][:, rows][..., cols] for a in out.attentions]  # what F-LMM keeps of them
                hidden = [h[0, rows] for h in out.hidden_states[-args.layers:]]
                return torch.stack(maps), hidden
            finally:
                text_model.config._attn_implementation_internal = "sdpa"

        def rows_path():
            rec = mod.AttentionRowsRecorder(rows, cols)
            hidden = {}
            with mod.recording_attention_rows(text_model, rec), mod.recording_hidden_rows(text_model, rows, hidden):
                lmm.model(input_ids=ids, pixel_values=pixel_values, attention_mask=mask, use_cache=False)
            return torch.stack([rec.maps[i][0] for i in range(args.layers)]), hidden

        point = {"seq": int(ids.shape[1])}
        with torch.no_grad():
            for name, fn in (("eager", eager), ("rows", rows_path)):
                fn()
                sync()
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                times = []
                for _ in range(3):
                    sync()
                    t0 = time.perf_counter()
                    maps, _ = fn()
                    sync()
                    times.append(time.perf_counter() - t0)
                    del maps
                point[f"{name}_peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else float("nan")
                point[f"{name}_seconds"] = statistics.median(times)
            a, _ = eager()
            b, _ = rows_path()
            point["max_abs_diff_maps"] = float((a.float() - b.float()).abs().max())
            point["max_map_value"] = float(a.float().abs().max())
            del a, b
        point["peak_ratio_rows_over_eager"] = point["rows_peak_gib"] / point["eager_peak_gib"]
        point["time_ratio_rows_over_eager"] = point["rows_seconds"] / point["eager_seconds"]
        results["points"].append(point)
        print(json.dumps(point), flush=True)
        if cuda:
            torch.cuda.empty_cache()
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
