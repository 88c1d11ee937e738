#!/usr/bin/env bash
# Create .venv and install maskport with the pinned test/runtime set. Idempotent; safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# pip keeps no second copy of the (multi-GB) wheels it downloads: CI machines may have little disk.
export PIP_NO_CACHE_DIR=${PIP_NO_CACHE_DIR:-1}
free_kb=$(df -Pk . | awk 'NR==2 {print $4}')
if [ -n "$free_kb" ] && [ "$free_kb" -lt $((8 * 1024 * 1024)) ] && [ ! -x .venv/bin/python ]; then
  echo "warning: only $((free_kb / 1024)) MiB free here; the pinned set needs about 8 GiB in .venv (torch with CUDA libraries)" >&2
fi
# gptqmodel's dependency PyPcre compiles against PCRE2: make sure its headers and pkg-config are there.
if ! (command -v pkg-config >/dev/null 2>&1 && pkg-config --exists libpcre2-8); then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get install -y -q libpcre2-dev pkg-config >/dev/null 2>&1 ||
      (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libpcre2-dev pkg-config >/dev/null))
  else
    echo "please install libpcre2-dev and pkg-config (needed to build gptqmodel's PyPcre)" >&2
  fi
fi
# the web page test of `maskport serve` drives Debian's chromium through Playwright (no browser download)
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get install -y -q chromium >/dev/null 2>&1 ||
      (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) ||
      echo "warning: could not install chromium; the serve page test will be skipped" >&2
  else
    echo "note: no chromium found; the serve page test will be skipped (apt-get install chromium)" >&2
  fi
fi
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
