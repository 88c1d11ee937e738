#!/usr/bin/env bash
# GPU benchmarks of benchmarks/quantize.md and benchmarks/multigpu.md, as run on the lent GPU machines.
# That machine's image has torch and transformers but not GPTQModel: its wheels (and a few of their needs) are
# carried in .whl/ (see benchmarks/quantize.md). Usage: bash benchmarks/gpu/run.sh STEP [ARGS...]
#   setup                      install the carried wheels, convert the demo checkpoint (bf16) to /tmp/mp/demo
#   shaped SIZE                random-weight export with Sa2VA-Qwen2.5-VL-SIZE shapes in /tmp/mp/SIZE
#   quant SIZE METHODS BITS    python benchmarks/quantize_bench.py gpu on it -> $OUT/SIZE-METHODS-BITS.json
set -euo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=/tmp/site:$PWD/src
OUT=${OUT:-/tmp/mp/out}; mkdir -p "$OUT" /tmp/mp
step=$1; shift
case "$step" in
  setup)
    if [ ! -d /tmp/site/gptqmodel ]; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/gptqmodel-*.whl .whl/defuser-*.whl .whl/device_smi-*.whl .whl/logbar-*.whl .whl/tokenicer-*.whl \
        .whl/pypcre-*.whl .whl/torchao-*.whl .whl/datasets-*.whl .whl/dill-*.whl .whl/multiprocess-*.whl \
        .whl/xxhash-*.whl .whl/fsspec-*.whl .whl/optimum-*.whl
    fi
    python3 -c "import torch, transformers, gptqmodel; print('torch', torch.__version__, 'transformers', transformers.__version__, 'gptqmodel', gptqmodel.__version__, torch.cuda.get_device_name(0), torch.cuda.device_count())"
    A=examples/tiny-sa2va/artifacts
    [ -d /tmp/mp/demo ] || python3 -m maskport.cli convert mmengine-to-hf $A/stage2/iter_1000.pth --base $A/base \
        --sam2 $A/sam2/tiny_sam2.pt --dtype bf16 -o /tmp/mp/demo --no-progress | tail -3
    ;;
  shaped)
    [ -d /tmp/mp/$1 ] || python3 benchmarks/quantize_bench.py shaped --size "$1" --like /tmp/mp/demo -o /tmp/mp/$1
    du -sh /tmp/mp/$1
    ;;
  quant)
    python3 benchmarks/quantize_bench.py gpu --export /tmp/mp/$1 --methods "$2" --bits "$3" --work /tmp/mp/q-$1 \
        --json-out "$OUT/$1-${2//,/_}-${3//,/_}.json" --kernel gptq=gptq_triton,awq=awq_torch:gemm_triton
    ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac
