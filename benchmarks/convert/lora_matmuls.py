"""Time the LoRA merge arithmetic alone: the float32 ``addmm`` of every merged linear, at real shapes.

    python benchmarks/convert/lora_matmuls.py --size 3b [--threads 1]

On random bf16 inputs held in memory, with buffers allocated and touched beforehand (no file I/O): the seconds
of whole-matrix float32 ``addmm`` calls alone, of the whole-matrix merge including the bf16->fp32 copy-in and the
fp32->bf16 cast-out, and of maskport's own merge (:func:`maskport.convert.ops.lora_merge_rows`, row blocks that
stay in the caches, in place into the bf16 weight). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes  # noqa: E402


def linear_shapes(size: str) -> list[tuple[int, int]]:
    t = shapes.SIZES[size]["text"]
    h, inter, kv = t["hidden_size"], t["intermediate_size"], t["num_key_value_heads"] * 128
    one = [(h, h), (kv, h), (kv, h), (h, h), (inter, h), (inter, h), (h, inter)]
    return one * t["num_hidden_layers"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=sorted(shapes.SIZES), default="3b")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (maskport computes with cores - 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    r, scaling = shapes.LORA_R, shapes.LORA_ALPHA / shapes.LORA_R
    lin = linear_shapes(args.size)
    g = torch.Generator().manual_seed(0)
    # one set of inputs per distinct shape (all layers have the same shapes); buffers touched before timing
    inputs = {}
    for o, i in set(lin):
        w = (torch.randn(o, i, generator=g) * 0.02).bfloat16()
        a = (torch.randn(r, i, generator=g) * 0.02).bfloat16()
        b = (torch.randn(o, r, generator=g) * 0.02).bfloat16()
        acc = torch.zeros(o, i)
        inputs[(o, i)] = (w, a, b, acc)
    from maskport.convert import ops

    t_addmm = t_all = 0.0
    flops = 0
    for o, i in lin:
        w, a, b, acc = inputs[(o, i)]
        t0 = time.perf_counter()
        acc.copy_(w)
        b32, a32 = b.float(), a.float()
        t1 = time.perf_counter()
        acc.addmm_(b32, a32, alpha=scaling)
        t2 = time.perf_counter()
        w.copy_(acc)
        t3 = time.perf_counter()
        t_addmm += t2 - t1
        t_all += t3 - t0
        flops += 2 * o * i * r
    t_engine = 0.0
    outs = {k: torch.empty_like(v[0]) for k, v in inputs.items()}
    for o, i in lin:
        w, a, b, _ = inputs[(o, i)]
        t0 = time.perf_counter()
        ops.lora_merge_rows(outs[(o, i)], w, a, b, scaling)
        t_engine += time.perf_counter() - t0
    # the engine's blocked merge gives the whole-matrix values (to float32 rounding before the bf16 cast)
    w, a, b, acc = inputs[lin[0]]
    ref = torch.addmm(w.float(), b.float(), a.float(), alpha=scaling)
    torch.testing.assert_close(ops.lora_merge(w, a, b, scaling), ref, rtol=0, atol=1e-5)
    print(json.dumps({"size": args.size, "threads": args.threads, "linears": len(lin), "r": r,
                      "addmm_s": round(t_addmm, 2), "merge_with_casts_s": round(t_all, 2),
                      "engine_merge_s": round(t_engine, 2),
                      "gflop": round(flops / 1e9, 1), "gflops_per_s": round(flops / t_addmm / 1e9, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
