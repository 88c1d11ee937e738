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
    ap.add_argument("--wait", action="store_true", help="predict first, then wait for LISA_OUT/lisa.npz")
    ap.add_argument("--cases", default="", help="comma-separated case numbers (default: all)")
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
    m = AutoModel.from_pretrained(args.export, trust_remote_code=True, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.export, trust_remote_code=True)  # no prompt; its tokenizer has no code
    image_token_id = m.config.mllm_config.image_token_id
    gen_kwargs = json.loads(args.generation_kwargs)
    cases = [int(c) for c in args.cases.split(",")] if args.cases else list(range(len(CASES)))

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

    # ---- maskport's side (the same images as LISA's: inputs.py; checked against LISA's PNGs below)
    ours = {}
    for i in cases:
        w, h, question = CASES[i]
        rec.clear()
        img = Image.fromarray(image_array(i))
        t1 = time.time()
        r = m.predict_forward(image=img, text=question, tokenizer=tok, max_new_tokens=MAX_NEW_TOKENS,
                              generation_kwargs=gen_kwargs or None)
        secs = time.time() - t1
        ids, mm = m.prompt_inputs(img, question, "", tok)
        seq = rec["sequence"]
        sam_px, input_size = m.sam_preprocess(img)
        with torch.no_grad():
            llm_logits = m.mllm(input_ids=seq[None], pixel_values=mm["pixel_values"],
                                attention_mask=torch.ones_like(seq[None])).logits[0].float()
        gen = seq[len(ids):].tolist()
        o = {"ids": ids, "gen": gen, "answer": r["prediction"],
             "masks": [np.asarray(x)[0] for x in r["prediction_masks"]],
             "clip_pixels": mm["pixel_values"][0].numpy(), "sam_pixels": sam_px[0].numpy(),
             "llm_logits": llm_logits[len(ids) - 1: len(ids) - 1 + len(gen)].numpy(), "seconds": round(secs, 1)}
        if "image_emb" in rec:
            o["image_emb"] = rec["image_emb"][0].numpy()
        if "seg_embeds" in rec:
            o["seg_embeds"] = rec["seg_embeds"].numpy()
        if rec.get("low_res") is not None:
            lr = rec["low_res"][0, :, 0].float()  # [N, 256, 256]
            o["low_res"] = lr.numpy()
            o["mask_logits"] = m.sam_postprocess(lr, input_size, (h, w)).numpy()
        ours[i] = o
        print(json.dumps({"case": i, "answer": o["answer"], "gen": gen, "masks": len(o["masks"]),
                          "seconds": o["seconds"]}), flush=True)

    # ---- LISA's side
    npz = args.lisa_out / "lisa.npz"
    while args.wait and not npz.exists():
        time.sleep(20)
    theirs = np.load(npz)
    lisa_meta = json.loads(str(theirs["meta"]))
    rows = []
    for i in cases:
        w, h, question = CASES[i]
        o = ours[i]
        assert np.array_equal(np.asarray(Image.open(args.lisa_out / f"image{i}.png").convert("RGB")), image_array(i))
        lisa_in_expanded = []
        for t in theirs[f"input_ids{i}"].tolist():
            lisa_in_expanded.extend([image_token_id] * m.image_seq_length if t == -200 else [t])
        lisa_gen = theirs[f"gen_ids{i}"].tolist()
        lisa_masks = theirs[f"masks{i}"]
        differing = [int((a != b).sum()) for a, b in zip(o["masks"], lisa_masks)]
        d = {"clip_pixels": maxdiff(o["clip_pixels"], theirs[f"clip_pixels{i}"]),
             "sam_pixels": maxdiff(o["sam_pixels"], theirs[f"sam_pixels{i}"]),
             "llm_logits_answer": maxdiff(o["llm_logits"], theirs[f"llm_logits{i}"]) if o["gen"] == lisa_gen else None}
        if "image_emb" in o:
            d["sam_image_embeddings"] = maxdiff(o["image_emb"], theirs[f"image_emb{i}"][0])
        if "seg_embeds" in o:
            d["seg_embeddings"] = maxdiff(o["seg_embeds"], theirs[f"seg_embeds{i}"])
        if "low_res" in o:
            d["sam_low_res_logits"] = maxdiff(o["low_res"], theirs[f"low_res{i}"][:, 0])
            d["mask_logits"] = maxdiff(o["mask_logits"], theirs[f"mask_logits{i}"])
        row = {
            "image": [w, h], "question": question,
            "prompt_ids_equal": o["ids"] == lisa_in_expanded,
            "generated_ids_equal": o["gen"] == lisa_gen, "generated_tokens": len(o["gen"]),
            "answer": o["answer"], "lisa_answer": lisa_meta["cases"][i]["answer"],
            "answer_equal": o["answer"] == lisa_meta["cases"][i]["answer"].strip(),
            # LISA's slow tokenizer decodes a piece after an added token with its dummy-prefix space ("[SEG]  .")
            "answer_equal_without_spaces": o["answer"].replace(" ", "") == lisa_meta["cases"][i]["answer"].replace(
                " ", ""),
            "masks": [len(o["masks"]), int(lisa_masks.shape[0])],
            "pixels_differing": differing, "pixels": w * h,
            "mask_fraction_positive": [round(float(x.mean()), 4) for x in lisa_masks],
            "max_abs_diff": d,
            "seconds": {"maskport": o["seconds"], "lisa": lisa_meta["cases"][i]["seconds"]},
        }
        if lisa_masks.shape[0]:
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
