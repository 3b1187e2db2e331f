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
# Every other dependency comes from a wheelhouse outside the checkout when it holds them all,
# offline: pip's HTTP cache stays empty on these machines, so each clean clone would download
# ~430 MB again (~2 min). The first run fills it (one download, sdists built once); on CUDA
# machines, whose torch pulls GBs of nvidia wheels, it is skipped. PEFTVLM_WHEELHOUSE= skips it.
WHEELS=${PEFTVLM_WHEELHOUSE-${XDG_CACHE_HOME:-$HOME/.cache}/peftvlm/wheels}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then WHEELS=; fi
offline() { .venv/bin/pip install -q --no-index --find-links "$WHEELS" "$@"; }
if [ -z "$WHEELS" ]; then
  .venv/bin/pip install -q -e ".[test]"
elif ! { [ -d "$WHEELS" ] && offline -e ".[test]" 2>/dev/null; }; then
  TORCH=$(.venv/bin/python -c "import torch; print(torch.__version__.split('+')[0])")
  .venv/bin/pip wheel -q --wheel-dir "$WHEELS" --find-links "$WHEELS" ".[test]" \
    "torch==$TORCH" "setuptools>=77"   # setuptools: the offline editable build needs it
  rm -f "$WHEELS"/peftvlm-*.whl "$WHEELS"/torch-*.whl  # our own source; torch is installed
  offline -e ".[test]"
fi
# The demo's browser test drives Debian's Chromium (Playwright cannot download its own here);
# skipped quickly when present, and the test skips itself where apt is not available.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
    >/dev/null || echo "note: could not install chromium; the demo browser test will skip"
fi
echo "peftvlm is set up in .venv (activate with: source .venv/bin/activate)"
