"""Run maskport's export on the same inputs as run_sa2va.py and compare with Sa2VA's answers and masks.

    PYTHONPATH=. .venv/bin/python benchmarks/parity/compare.py OUT/export OUT/sa2va.npz [--json OUT/parity.json]
"""

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from inputs import MAX_NEW_TOKENS, PROMPT, SEG_BIAS, SIZES, image  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("export")
    ap.add_argument("sa2va_npz")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    theirs = np.load(args.sa2va_npz)
    m = AutoModel.from_pretrained(args.export, trust_remote_code=True, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.export, trust_remote_code=True)
    seg = tok.convert_tokens_to_ids("[SEG]")
    rows = []
    for i, (w, h) in enumerate(SIZES):
        r = m.predict_forward(image=image(i, w, h), text=PROMPT, tokenizer=tok,
                              max_new_tokens=MAX_NEW_TOKENS, generation_kwargs={"sequence_bias": {(seg,): SEG_BIAS}})
        keys = sorted((k for k in theirs.files if k.startswith(f"mask{i}_")), key=lambda k: int(k.split("_")[1]))
        masks = [theirs[k] for k in keys]
        differing = [int((a != b).sum()) for a, b in zip(r["prediction_masks"], masks)]
        t = str(theirs[f"text{i}"])
        row = {"image": [w, h], "text_equal": r["prediction"] == t,
               # a slow SentencePiece tokenizer's decode puts spaces between added tokens ("[SEG] [SEG]")
               "text_equal_without_spaces": r["prediction"].replace(" ", "") == t.replace(" ", ""),
               "masks": [len(r["prediction_masks"]), len(masks)], "pixels_differing": differing,
               "pixels": w * h}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
