"""Quantize an export with every visible GPU (GPTQModel spreads the calibration forward over them) and record
the time and each GPU's peak memory. Run by benchmarks/gpu/multigpu.sh with CUDA_VISIBLE_DEVICES=0 and =0,1."""

import json
import sys
import time
from pathlib import Path

import torch

from maskport.quantize.api import quantize_export
from maskport.testing.samples import synthetic_samples

export, out, method, kernel, json_out = sys.argv[1:6]
n_calib = int(sys.argv[6]) if len(sys.argv) > 6 else 32
calib = synthetic_samples(Path(out).parent / f"calib-mgpu-{n_calib}", n_calib)
torch.cuda.init()  # the memory-statistics calls below do not initialise CUDA themselves
n = torch.cuda.device_count()
for i in range(n):
    torch.cuda.reset_peak_memory_stats(i)
t = time.time()
res = quantize_export(export, out, method=method, bits=4, group_size=128, calib=calib, calib_samples=n_calib,
                      device="cuda", overwrite=True, kernel=kernel or None, log=lambda m: print(m, file=sys.stderr))
row = {"gpus": n, "calib_samples": n_calib, "names": [torch.cuda.get_device_name(i) for i in range(n)], "method": method,
       "wall_s": round(time.time() - t, 1), "timings_s": res.report["timings_s"],
       "peak_gpu_bytes_per_gpu": [int(torch.cuda.max_memory_allocated(i)) for i in range(n)],
       "decoder_linears_after": res.report["sizes"]["after"]["param_bytes"]["decoder_linears"]}
Path(json_out).write_text(json.dumps(row, indent=2) + "\n")
print(json.dumps(row))
