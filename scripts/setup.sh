#!/usr/bin/env bash
# Set up peftvlm in ./.venv: CPU PyTorch where no NVIDIA GPU is present, then the package with
# its test extras. Safe to re-run (it only installs what is missing).
# Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    .venv/bin/pip install -q torch            # CUDA build for GPU machines
  else
    .venv/bin/pip install -q torch==2.13.0    # CPU build: never pulls multi-GB CUDA wheels
  fi
fi
.venv/bin/pip install -q -e ".[test]"
# The demo's browser test drives Debian's Chromium (Playwright cannot download its own here);
# skipped quickly when present, and the test skips itself where apt is not available.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
    >/dev/null || echo "note: could not install chromium; the demo browser test will skip"
fi
echo "peftvlm is set up in .venv (activate with: source .venv/bin/activate)"
