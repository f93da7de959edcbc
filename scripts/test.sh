#!/usr/bin/env bash
# Installs the package with its test extras into ./.venv (created when absent) and runs the test suite.
# Usage: scripts/test.sh [extra pytest args]   (e.g. scripts/test.sh -m "not slow")
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[test.sh] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
# torch is pinned to the CPU build (2.13.0); install it first so nothing pulls a CUDA build.
.venv/bin/python -m pip install --quiet --upgrade pip setuptools wheel
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test]"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export TF_CPP_MIN_LOG_LEVEL=3
exec .venv/bin/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder -q -rs "$@" tests
