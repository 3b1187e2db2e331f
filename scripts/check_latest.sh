#!/usr/bin/env bash
# Test peftvlm against the newest releases of its dependencies and, when the whole suite passes,
# rewrite requirements/lock.txt (the versions `bash scripts/setup.sh` and CI install) to them.
#
# A deliberate maintenance step, not part of CI: run it when you want the lock to move (a new
# transformers, TRL, peft...). It builds a throwaway venv with the newest release of every
# dependency, ignoring both the lock and pyproject.toml's tested upper bounds, and runs the
# test suite there. Red: the lock stays; fix the code for the new releases and run it again.
# Green: the lock is rewritten from that venv; raise pyproject.toml's upper bounds to what it
# prints, review `git diff requirements/ pyproject.toml`, and commit both with the code.
#
# Usage: bash scripts/check_latest.sh [PYTEST ARGS...]   e.g. -x; with arguments (a partial
#                                                         run) the lock is left as it is
#        bash scripts/check_latest.sh --lock-from VENV    rewrite the lock from a venv whose
#                                                         suite already passed (no test run)
# Environment: PEFTVLM_LATEST_VENV (the throwaway venv; default: a temporary folder removed at
# the end), PYTHON (its interpreter; default python3), JOBS (pytest -n; default 2),
# LATEST_TORCH (the torch to test on a CPU machine; default: the locked one, see below).
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK=requirements/lock.txt

if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,18p' "$0" | sed -E 's/^# ?//'
  exit 0
fi

# Write the lock from a venv: every installed distribution but peftvlm itself and pip (the
# installer); torch without its local build tag (+cpu, +cu128), so CPU and CUDA builds match.
write_lock() {
  local venv=$1 where
  where=$("$venv/bin/python" -c \
    'import platform, sys; print("Python %d.%d, %s %s" % (*sys.version_info[:2], platform.system(), platform.machine()))')
  {
    echo "# The versions CI tested: pip constraints for scripts/setup.sh (pip install -c)."
    echo "# Written by scripts/check_latest.sh from a venv whose test suite passed"
    echo "# ($where); do not edit by hand. pyproject.toml keeps ranges."
    "$venv/bin/pip" freeze --all --exclude-editable \
      | grep -viE '^(pip|peftvlm)==' | sed -E 's/^(torch==[^+]+)\+.*/\1/' | LC_ALL=C sort -f
  } > "$LOCK.tmp"
  mv "$LOCK.tmp" "$LOCK"
  echo "wrote $LOCK ($(grep -vc '^#' "$LOCK") pins)"
  "$venv/bin/python" - "$LOCK" <<'PY'
import sys

pins = dict(line.strip().split("==") for line in open(sys.argv[1]) if "==" in line)
for name in ("torch", "transformers", "trl", "peft", "datasets", "accelerate"):
    if name in pins:
        major, minor = pins[name].split(".")[:2]
        print(f"  tested {name} {pins[name]}: pyproject.toml bound {name}<{major}.{int(minor) + 1}")
PY
}

if [ "${1:-}" = "--lock-from" ]; then
  write_lock "${2:?--lock-from needs a venv folder}"
  exit 0
fi

VENV=${PEFTVLM_LATEST_VENV:-}
if [ -z "$VENV" ]; then
  VENV=$(mktemp -d "${TMPDIR:-/tmp}/peftvlm-latest.XXXXXX")
  trap 'rm -rf "$VENV"' EXIT
fi
"${PYTHON:-python3}" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch: the newest on GPU machines; on CPU ones the locked build unless LATEST_TORCH names
# another (e.g. "torch==2.14.1 --index-url https://download.pytorch.org/whl/cpu"): PyPI's newest
# Linux wheel is the CUDA build, GBs of nvidia wheels. The other upgrades leave it as it is.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  TORCH_REQ=${LATEST_TORCH:-torch}
else
  TORCH_REQ=${LATEST_TORCH:-torch==$(sed -n 's/^torch==//p' "$LOCK")}
fi
# shellcheck disable=SC2086  # LATEST_TORCH may carry pip options
"$VENV/bin/pip" install -q --upgrade $TORCH_REQ
# The newest release of every other dependency peftvlm names (test and serve extras included),
# each without its version range: pip still resolves them against each other.
"$VENV/bin/pip" install -q --no-deps -e .
NAMES=$("$VENV/bin/python" - <<'PY'
import re
from importlib.metadata import requires

names = set()
for spec in requires("peftvlm"):
    marker = spec.partition(";")[2]
    if not marker or re.search(r"extra == .(test|serve).", marker):
        names.add(re.match(r"[A-Za-z0-9._-]+", spec).group(0))
print(" ".join(sorted(names - {"peftvlm", "torch"})))  # torch: above
PY
)
echo "installing the newest releases of: $NAMES"
# shellcheck disable=SC2086  # one argument per name
"$VENV/bin/pip" install -q --upgrade $NAMES "setuptools>=77"
"$VENV/bin/pip" check
"$VENV/bin/pip" freeze | grep -iE '^(torch|transformers|trl|peft|datasets|accelerate)=='
echo "running the test suite on them"
if ! "$VENV/bin/python" -m pytest -q -p no:cacheprovider -n "${JOBS:-2}" "$@"; then
  echo "red: $LOCK unchanged; fix the code for these releases (or pin one back) and rerun" >&2
  exit 1
elif [ $# -gt 0 ]; then
  echo "green on a partial run ($*): $LOCK unchanged (it moves only on the whole suite)"
else
  write_lock "$VENV"
  echo "green: review git diff $LOCK pyproject.toml, then commit"
fi
