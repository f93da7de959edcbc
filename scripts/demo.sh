#!/usr/bin/env bash
# The demo: a real prompt-tuning run on CPU that shows learning, through the gin entry points.
#   1. pre-trains a small T5 1.1 on the bundled toy corpus + toy training tasks (cached in .cache/demo),
#   2. freezes it and prompt-tunes a 10-token prompt (class-label init) on a held-out toy task,
#   3. model-tunes the same backbone on that task (the paper's baseline),
#   4. prints a table, saves the prompt .npy and a PNG of loss/accuracy against steps.
# Environment: DEMO_OUTPUT (default demo_output/), DEMO_CACHE (default .cache/demo), PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="$(realpath -m "${DEMO_OUTPUT:-demo_output}")"
CACHE="$(realpath -m "${DEMO_CACHE:-.cache/demo}")"
export TF_CPP_MIN_LOG_LEVEL=3 JAX_PLATFORMS=cpu XLA_PYTHON_CLIENT_PREALLOCATE=false

if [ ! -x .venv/bin/python ]; then
  echo "[demo] creating .venv"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import prompt_tuning, seqio, jax, flax, gin" >/dev/null 2>&1; then
  echo "[demo] installing the package into .venv (first run only)"
  .venv/bin/python -m pip install --quiet --upgrade pip setuptools wheel
  .venv/bin/python -m pip install --quiet -e .
fi

train() {  # train NAME GIN_FILE MODEL_DIR [extra flags...]
  local name=$1 gin=$2 dir=$3; shift 3
  echo "[demo] $name: python -m prompt_tuning.train --gin_file=$gin --gin.MODEL_DIR='$dir' $*"
  if ! .venv/bin/python -m prompt_tuning.train --gin_file="$gin" --gin.MODEL_DIR="'$dir'" "$@" \
      > "$dir.log" 2>&1; then
    tail -n 30 "$dir.log"; echo "[demo] $name failed; full log: $dir.log" >&2; exit 1
  fi
  grep -E "step [0-9]+/[0-9]+:|inference eval" "$dir.log" | sed -E 's/^.*\] //' | awk 'NR % 5 == 0 || /inference/' | tail -n 8
}

start=$(date +%s)
mkdir -p "$CACHE" "$OUT"
KEY=$(cat configs/demo/backbone.gin configs/demo/size.gin tasks/toy.py prompt_tuning/architectures/*.py | sha1sum | cut -c1-12)
BACKBONE="$CACHE/backbone-$KEY"
if [ -f "$BACKBONE/DONE" ]; then
  echo "[demo] reusing the cached backbone $BACKBONE"
else
  rm -rf "$BACKBONE"; mkdir -p "$BACKBONE"
  train "backbone pre-training" demo/backbone.gin "$BACKBONE"
  touch "$BACKBONE/DONE"
fi
CKPT=$(ls -d "$BACKBONE"/checkpoint_* | sort -t_ -k2 -n | tail -n 1)

rm -rf "$OUT/prompt_tuning" "$OUT/model_tuning"
mkdir -p "$OUT/prompt_tuning" "$OUT/model_tuning"
train "prompt tuning (frozen backbone)" demo/prompt_tuning.gin "$OUT/prompt_tuning" \
  --gin.INITIAL_CHECKPOINT_PATH="'$CKPT'"
train "model tuning (baseline)" demo/model_tuning.gin "$OUT/model_tuning" \
  --gin.INITIAL_CHECKPOINT_PATH="'$CKPT'"

.venv/bin/python scripts/demo_report.py --prompt_tuning "$OUT/prompt_tuning" --model_tuning "$OUT/model_tuning" \
  --output "$OUT" --elapsed "$(( $(date +%s) - start ))"
