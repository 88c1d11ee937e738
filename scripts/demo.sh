#!/usr/bin/env bash
# The README's first command: install into .venv, then convert the embedded tiny Sa2VA (really trained with
# mmengine, examples/tiny-sa2va) with maskport, and evaluate the export on its held-out set (CPU is enough).
# Extra arguments go to `maskport demo` (e.g. --without-stage2, -o DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DS_ACCELERATOR=cpu
exec .venv/bin/maskport demo "$@"
