"""Convert the released tiny LISA with maskport, run the export on run_lisa.py's inputs, compare with LISA's answers.

Runs in maskport's environment:

    PYTHONPATH=src python benchmarks/parity/lisa/compare.py RELEASED CLIP LISA_OUT EXPORT [--json results.json]

1. ``python -m maskport convert lisa-hf-to-native RELEASED --clip CLIP -o EXPORT`` (skipped with --no-convert).
2. ``AutoModel.from_pretrained(EXPORT, trust_remote_code=True)`` and its tokenizer; for each case of inputs.py the
   PNG that run_lisa.py wrote (and LISA read) goes to ``predict_forward(image=, text=question, tokenizer=,
   max_new_tokens=MAX_NEW_TOKENS)`` with the export's defaults.
3. Compared with LISA's npz: prompt token ids, generated token ids, answer text, number of masks and every mask pixel
   for pixel; for diagnosis also the CLIP and SAM inputs, the SAM image embeddings, the [SEG] embeddings, SAM's
   low-res mask logits, the mask logits at the image size and the LLM logits over the answer (max |difference|).
   Read-only hooks on the export's modules record the intermediate tensors.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoModel, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from inputs import CASES, MAX_NEW_TOKENS, image_array  # noqa: E402


def maxdiff(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return f"shape {list(a.shape)} vs {list(b.shape)}"
    return float(np.abs(a - b).max()) if a.size else 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("released", type=Path)
    ap.add_argument("clip", type=Path)
    ap.add_argument("lisa_out", type=Path, help="run_lisa.py's output folder (lisa.npz + image PNGs)")
    ap.add_argument("export", type=Path)
    ap.add_argument("--no-convert", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--generation-kwargs", default="{}", help="JSON, passed to predict_forward")
    args = ap.parse_args()
    t0 = time.time()
    convert = None
    if not args.no_convert:
        cmd = [sys.executable, "-m", "maskport", "convert", "lisa-hf-to-native", str(args.released),
               "--clip", str(args.clip), "-o", str(args.export)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        print(p.stdout[-3000:], p.stderr[-3000:], flush=True)
        if p.returncode:
            raise SystemExit(f"convert failed ({p.returncode})")
        convert = {"seconds": round(time.time() - t0, 1), "command": "maskport convert lisa-hf-to-native RELEASED "
                   "--clip CLIP -o EXPORT"}
    theirs = np.load(args.lisa_out / "lisa.npz")
    lisa_meta = json.loads(str(theirs["meta"]))
    m = AutoModel.from_pretrained(args.export, trust_remote_code=True, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.export)
    seg_id = m.seg_token_id(tok)
    image_token_id = m.config.mllm_config.image_token_id
    gen_kwargs = json.loads(args.generation_kwargs)

    rec = {}
    orig_generate = m.mllm.generate

    def generate(*a, **k):
        out = orig_generate(*a, **k)
        rec["sequence"] = out[0].detach().clone()
        return out

    m.mllm.generate = generate
    m.sam.vision_encoder.register_forward_hook(lambda mod, a, o: rec.__setitem__("image_emb", o[0].detach().clone()))
    m.sam.mask_decoder.register_forward_hook(lambda mod, a, o: rec.__setitem__("low_res", o[0].detach().clone()))
    m.text_hidden_fcs.register_forward_hook(lambda mod, a, o: rec.__setitem__("seg_embeds", o.detach().clone()))

    rows = []
    for i, (w, h, question) in enumerate(CASES):
        rec.clear()
        img = Image.open(args.lisa_out / f"image{i}.png").convert("RGB")
        assert np.array_equal(np.asarray(img), image_array(i))
        t1 = time.time()
        r = m.predict_forward(image=img, text=question, tokenizer=tok, max_new_tokens=MAX_NEW_TOKENS,
                              generation_kwargs=gen_kwargs or None)
        secs = time.time() - t1
        ids, mm = m.prompt_inputs(img, question, "", tok)
        lisa_in = theirs[f"input_ids{i}"].tolist()
        lisa_in_expanded = []
        for t in lisa_in:
            lisa_in_expanded.extend([image_token_id] * m.image_seq_length if t == -200 else [t])
        seq = rec["sequence"]
        gen = seq[len(ids):].tolist()
        lisa_gen = theirs[f"gen_ids{i}"].tolist()
        lisa_masks = theirs[f"masks{i}"]
        ours_masks = [np.asarray(x)[0] for x in r["prediction_masks"]]
        differing = [int((a != b).sum()) for a, b in zip(ours_masks, lisa_masks)]
        sam_px, input_size = m.sam_preprocess(img)
        with torch.no_grad():
            llm_logits = m.mllm(input_ids=seq[None], pixel_values=mm["pixel_values"],
                                attention_mask=torch.ones_like(seq[None])).logits[0].float()
        start = len(ids) - 1
        llm_logits = llm_logits[start: start + len(gen)].numpy()
        low_res = rec.get("low_res")
        row = {
            "image": [w, h], "question": question,
            "prompt_ids_equal": ids == lisa_in_expanded,
            "generated_ids_equal": gen == lisa_gen, "generated_tokens": len(gen),
            "answer": r["prediction"], "lisa_answer": lisa_meta["cases"][i]["answer"],
            "answer_equal": r["prediction"] == lisa_meta["cases"][i]["answer"].strip(),
            "masks": [len(ours_masks), int(lisa_masks.shape[0])],
            "pixels_differing": differing, "pixels": w * h,
            "mask_fraction_positive": [round(float(x.mean()), 4) for x in ours_masks],
            "max_abs_diff": {
                "clip_pixels": maxdiff(mm["pixel_values"][0].numpy(), theirs[f"clip_pixels{i}"]),
                "sam_pixels": maxdiff(sam_px[0].numpy(), theirs[f"sam_pixels{i}"]),
                "llm_logits_answer": maxdiff(llm_logits, theirs[f"llm_logits{i}"]) if gen == lisa_gen else None,
            },
            "seconds": round(secs, 1),
        }
        if "image_emb" in rec:
            row["max_abs_diff"]["sam_image_embeddings"] = maxdiff(rec["image_emb"][0].numpy(),
                                                                  theirs[f"image_emb{i}"][0])
        if "seg_embeds" in rec:
            row["max_abs_diff"]["seg_embeddings"] = maxdiff(rec["seg_embeds"].numpy(), theirs[f"seg_embeds{i}"])
        if low_res is not None:
            lr = low_res[0, :, 0].float()  # [N, 256, 256]
            row["max_abs_diff"]["sam_low_res_logits"] = maxdiff(lr.numpy(), theirs[f"low_res{i}"][:, 0])
            full = m.sam_postprocess(lr, input_size, (h, w)).numpy()
            row["max_abs_diff"]["mask_logits"] = maxdiff(full, theirs[f"mask_logits{i}"])
            row["min_abs_mask_logit_lisa"] = float(np.abs(theirs[f"mask_logits{i}"]).min())
        rows.append(row)
        print(json.dumps(row), flush=True)
    import transformers

    result = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "maskport_side": {"torch": torch.__version__, "transformers": transformers.__version__,
                          "numpy": np.__version__, "generation_kwargs": gen_kwargs},
        "lisa_side": lisa_meta["versions"], "convert": convert, "cases": rows,
        "all_equal": all(r["prompt_ids_equal"] and r["generated_ids_equal"] and r["masks"][0] == r["masks"][1]
                         and not any(r["pixels_differing"]) for r in rows),
        "masks_total": sum(r["masks"][1] for r in rows),
        "pixels_differing_total": sum(sum(r["pixels_differing"]) for r in rows),
    }
    print(json.dumps({k: result[k] for k in ("all_equal", "masks_total", "pixels_differing_total")}))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
