#!/usr/bin/env bash
# benchmarks/multigpu.md: verify and quantize on 1 vs 2 GPUs of one host (NVLink multicast off).
#   bash benchmarks/gpu/multigpu.sh verify     3B-shaped export, 64 samples, --num-processes 1 and 2, reports compared
#   [CALIB=N] bash benchmarks/gpu/multigpu.sh quant   GPTQ 4-bit of a 7B-shaped export with 1 GPU, then 2 GPUs
set -euo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 GPTQMODEL_OFFLINE=1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH=/tmp/site:$PWD/src
OUT=${OUT:-/tmp/mp/out}; mkdir -p "$OUT"
case "$1" in
  verify)
    bash benchmarks/gpu/run.sh setup >/dev/null 2>&1; bash benchmarks/gpu/run.sh shaped 3b 2>&1 | tail -1
    python3 -c "from pathlib import Path; from maskport.testing.samples import synthetic_samples as s; s(Path('/tmp/mp/vs'), 64)"
    for n in 1 2; do
      s=$(date +%s.%N)
      python3 -m maskport.cli verify /tmp/mp/3b /tmp/mp/3b --samples /tmp/mp/vs/samples.jsonl --device cuda \
        --num-processes $n --report /tmp/mp/verify-$n --no-progress --overlays 0 \
        --generation-kwargs '{"sequence_bias": {"[SEG]": 30.0}}' 2>&1 | grep -v "^W1123\|Loading weights" | tail -4
      echo "verify --num-processes $n: $(python3 -c "print(round($(date +%s.%N)-$s,1))") s wall"
      cp /tmp/mp/verify-$n/report.json "$OUT/verify-$n.json"
    done
    python3 - <<'PY'
import json
a, b = (json.load(open(f"/tmp/mp/verify-{n}/report.json")) for n in (1, 2))
for r in (a, b):
    r.pop("run", None)
print("reports equal (without the run section):", a == b)
PY
    ;;
  quant)
    [ -d /tmp/mp/7b ] || { bash benchmarks/gpu/run.sh setup >/dev/null 2>&1; bash benchmarks/gpu/run.sh shaped 7b | tail -1; }
    n=${CALIB:-32}
    for g in 1 2; do
      CUDA_VISIBLE_DEVICES=$([ $g = 1 ] && echo 0 || echo 0,1) python3 benchmarks/gpu/quant_gpus.py /tmp/mp/7b \
          /tmp/mp/q7-${g}gpu gptq gptq_triton "$OUT/multigpu-quant-7b-${g}gpu-$n.json" "$n" > "$OUT/quant-${g}gpu-$n.log" 2>&1
      tail -1 "$OUT/quant-${g}gpu-$n.log"
    done
    ;;
esac
