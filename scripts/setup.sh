#!/usr/bin/env bash
# Set up peftvlm in ./.venv: CPU PyTorch where no NVIDIA GPU is present, then the package with
# its test extras, every dependency at the version CI tested (requirements/lock.txt, used as
# pip constraints; scripts/check_latest.sh moves it). Safe to re-run (it only installs what is
# missing, and puts drifted packages back to their locked versions).
# Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOCK=requirements/lock.txt
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
TORCH=$(sed -n 's/^torch==//p' "$LOCK")
if ! .venv/bin/python -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$TORCH')" \
    2>/dev/null; then
  # the locked torch: the CUDA build from PyPI on GPU machines, else the CPU build, which never
  # pulls multi-GB CUDA wheels
  .venv/bin/pip install -q -c "$LOCK" "torch==$TORCH"
fi
# Every other dependency comes from a wheelhouse outside the checkout when it holds them all,
# offline: pip's HTTP cache stays empty on these machines, so each clean clone would download
# ~430 MB again (~2 min). The first run fills it (one download, sdists built once); on CUDA
# machines, whose torch pulls GBs of nvidia wheels, it is skipped. PEFTVLM_WHEELHOUSE= skips it.
# The lock holds both paths to the tested versions: a wheelhouse filled with other versions
# (an older lock, another project) fails the offline install, and `pip wheel` adds the locked
# ones next to them.
WHEELS=${PEFTVLM_WHEELHOUSE-${XDG_CACHE_HOME:-$HOME/.cache}/peftvlm/wheels}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then WHEELS=; fi
offline() { .venv/bin/pip install -q --no-index --find-links "$WHEELS" -c "$LOCK" "$@"; }
if [ -z "$WHEELS" ]; then
  .venv/bin/pip install -q -c "$LOCK" -e ".[test]"
elif ! { [ -d "$WHEELS" ] && offline -e ".[test]" 2>/dev/null; }; then
  .venv/bin/pip wheel -q --wheel-dir "$WHEELS" --find-links "$WHEELS" -c "$LOCK" ".[test]" \
    "torch==$TORCH" "setuptools>=77"   # setuptools: the offline editable build needs it
  rm -f "$WHEELS"/peftvlm-*.whl "$WHEELS"/torch-*.whl  # our own source; torch is installed
  offline -e ".[test]"
fi
# Name any installed package that is not at its locked version (a torch installed before the
# lock, a hand-installed upgrade): the suite would not test what CI tested.
.venv/bin/python - "$LOCK" <<'PY'
import re
import sys
from importlib.metadata import distributions

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

pins = dict(line.strip().split("==") for line in open(sys.argv[1]) if "==" in line)
pins = {norm(name): version for name, version in pins.items()}
drift = sorted(f"{d.metadata['Name']} {d.version} (locked: {pins[norm(d.metadata['Name'])]})"
               for d in distributions() if norm(d.metadata["Name"]) in pins
               and d.version.split("+")[0] != pins[norm(d.metadata["Name"])])
if drift:
    sys.exit(f"not the locked versions ({sys.argv[1]}): {', '.join(drift)}\n"
             f"fix: .venv/bin/pip install -c {sys.argv[1]} NAME (or remove .venv and re-run)")
PY
# The demo's browser test drives Debian's Chromium (Playwright cannot download its own here);
# skipped quickly when present, and the test skips itself where apt is not available.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
    >/dev/null || echo "note: could not install chromium; the demo browser test will skip"
fi
echo "peftvlm is set up in .venv with the locked versions (activate: source .venv/bin/activate)"
