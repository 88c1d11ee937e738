#!/usr/bin/env bash
# Create .venv and install maskport with the pinned test/runtime set. Idempotent; safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -r requirements/ci.txt
# Meta's sam2 ships only as a source package; build it against the installed torch, without its CUDA extension.
if ! .venv/bin/python -c "import sam2" >/dev/null 2>&1; then
  SAM2_BUILD_CUDA=0 .venv/bin/python -m pip install -q --no-build-isolation --no-deps sam2==1.1.0
fi
.venv/bin/python -m pip install -q --no-deps -e .
echo "maskport installed in .venv ($(.venv/bin/maskport --version))"
