#!/usr/bin/env bash
# Load test of `maskport serve` on a GPU machine (benchmarks/serve.md, GPU section): a random-weight export with
# Sa2VA-Qwen2.5-VL-3B shapes, 1/8/32 concurrent clients, batching on vs off, GPU memory over time.
#
# Inputs (this script downloads nothing):
#   - a checkout of this repository (the demo artifacts in examples/tiny-sa2va/artifacts are the tokenizer and
#     config source of the 3B-shaped export);
#   - torch + transformers (+ accelerate) already in the machine's image;
#   - .whl/ at the repository root with the serve stack's wheels for the machine's Python (3.12 on the lent GPU
#     machines), made on a machine with a package index:
#       pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl \
#           fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 python-multipart==0.0.34 httpx==0.29.0 \
#           pycocotools==2.0.11 psutil==7.2.2 click==8.5.1
#     (pip pulls their own needs too: pydantic, pydantic-core, anyio, h11, httpcore, annotated-doc, ...); only
#     what the image cannot import already is installed, into /tmp/site-serve.
# Usage: bash benchmarks/gpu/serve.sh [DURATION_S] [CLIENTS]      (defaults: 120 and 1,8,32)
# Output: $OUT/serve-3b.json (+ .server.log), one JSON line per point on stdout. About 2 x 3 x DURATION plus
# ~5 minutes (conversion of the demo, writing the 3B-shaped export, two model loads).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH=/tmp/site-serve:$PWD/src
OUT=${OUT:-/tmp/mp/out}; mkdir -p "$OUT" /tmp/mp /tmp/site-serve
DURATION=${1:-120}; CLIENTS=${2:-1,8,32}
# install each wheel of .whl/ whose distribution the image does not have already
python3 - <<'PY'
import glob, importlib.metadata as md, subprocess, sys
todo = []
for w in sorted(glob.glob(".whl/*.whl")):
    name = w.split("/")[-1].split("-")[0]
    try:
        md.version(name)
    except md.PackageNotFoundError:
        todo.append(w)
if todo:
    print("installing into /tmp/site-serve:", " ".join(t.split("/")[-1] for t in todo))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--target", "/tmp/site-serve", *todo], check=True)
PY
python3 -c "import torch, transformers, fastapi, uvicorn, pycocotools; print('torch', torch.__version__, 'transformers', transformers.__version__, 'fastapi', fastapi.__version__, torch.cuda.get_device_name(0), 'x', torch.cuda.device_count())"
A=examples/tiny-sa2va/artifacts
[ -d /tmp/mp/demo ] || python3 -m maskport.cli convert mmengine-to-hf $A/stage2/iter_*.pth --base $A/base \
    --sam2 $A/sam2/tiny_sam2.pt --dtype bf16 -o /tmp/mp/demo --no-progress | tail -1
[ -d /tmp/mp/3b ] || python3 benchmarks/quantize_bench.py shaped --size 3b --like /tmp/mp/demo -o /tmp/mp/3b
# one replica per visible GPU (--device auto); random weights: answers run to max_new_tokens, so every request
# generates the same 32 tokens and the comparison of batching on/off is one of generation throughput
python3 benchmarks/serve_load.py --export /tmp/mp/3b --device auto --clients "$CLIENTS" --duration "$DURATION" \
    --max-batch 16 --max-new-tokens 32 --json-out "$OUT/serve-3b.json"
