#!/usr/bin/env bash
# The README's first command: install into .venv, then build a tiny Sa2VA training run with the real libraries,
# convert it with maskport and predict with transformers alone (CPU is enough, a few minutes with the install).
# The trained demo (examples/tiny-sa2va) replaces this once its held-out evaluation lands.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DS_ACCELERATOR=cpu
exec .venv/bin/python examples/quickstart.py "$@"
