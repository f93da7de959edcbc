#!/usr/bin/env bash
# The Power-of-Scale trends in miniature, on CPU, through the sweep tool (python -m prompt_tuning.sweep):
#   1. pre-trains a family of three toy backbones (0.26M, 0.92M, 3.4M parameters; cached in
#      .cache/toy, keyed by the configs and the toy task code, so a second run reuses them),
#   2. prompt-tunes each frozen backbone on a held-out toy task: prompt length {1, 5, 20} x
#      initialization {random uniform, sampled vocabulary, class labels} x 2 seeds (runs that
#      differ only in the initialization or the seed train together as one vectorized job),
#   3. model-tunes each backbone on the same tasks (2 seeds),
#   4. writes the tables (toy_results.md) and the figure (toy_trends.png) and says which of the
#      paper's trends the numbers show.
# Usage: scripts/reproduce_toy.sh [--quick]    (--quick: two sizes, short runs, a smaller grid)
# Environment: TOY_OUTPUT (default toy_output/), TOY_CACHE (default .cache/toy), PYTHON (an
# interpreter that has the package; default: ./.venv, created as by scripts/demo.sh).
# Rerunning the command skips finished runs and resumes interrupted ones.
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK=0
if [ "${1:-}" = "--quick" ]; then QUICK=1; fi
OUT="$(realpath -m "${TOY_OUTPUT:-toy_output}")"
CACHE="$(realpath -m "${TOY_CACHE:-.cache/toy}")"
export TF_CPP_MIN_LOG_LEVEL=3 JAX_PLATFORMS=cpu XLA_PYTHON_CLIENT_PREALLOCATE=false
export JAX_COMPILATION_CACHE_DIR="$CACHE/jax_cache" JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0

if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
else
  if [ ! -x .venv/bin/python ]; then
    echo "[toy] creating .venv"
    python3 -m venv .venv
  fi
  if ! .venv/bin/python -c "import prompt_tuning, seqio, jax, flax, gin" >/dev/null 2>&1; then
    echo "[toy] installing the package into .venv (first run only)"
    .venv/bin/python -m pip install --quiet --upgrade pip setuptools wheel
    .venv/bin/python -m pip install --quiet -e .
  fi
  PY=.venv/bin/python
fi

GRID=()
BACKBONE_STEPS=1500
if [ "$QUICK" = 1 ]; then
  BACKBONE_STEPS=300
  OUT="$OUT/quick"
  GRID=(
    "--gin.SIZES={'label': ['small', 'base'], 'plot_x': [263168, 919296]}"
    "--gin.BACKBONE_STEPS=$BACKBONE_STEPS"
    "--gin.TASK_LABELS=['indoor']"
    "--gin.TASK_NAMES=['toy_heldout_indoor']"
    "--gin.TASK_CLASS_LABELS=[['yes', 'no']]"
    "--gin.LENGTHS=[1, 5]"
    "--gin.INITS={'label': ['random_uniform', 'class_label'], 'gin_file': ['prompts/random_uniform.gin', 'toy/init_class_label.gin']}"
    "--gin.PROMPT_STEPS=300"
    "--gin.MODEL_STEPS=150"
  )
fi

start=$(date +%s)
mkdir -p "$CACHE" "$OUT"
# The backbones' cache key: the files that define them (not the prompt-tuning settings; a changed
# size or step count changes their runs' settings, which the sweep refuses to mix in one root).
KEY=$(cat configs/toy/{common,backbone,size_small,size_base,size_large}.gin \
  configs/sweeps/toy/backbones.gin tasks/toy.py prompt_tuning/architectures/*.py \
  | sha1sum | cut -c1-12)
BACKBONE_ROOT="$CACHE/backbones-$KEY$([ "$QUICK" = 1 ] && echo -quick || true)"
sweep() {  # sweep SPEC ROOT [flags...]
  local spec=$1 root=$2; shift 2
  echo "[toy] python -m prompt_tuning.sweep run $spec --root $root"
  "$PY" -m prompt_tuning.sweep run "$spec" --root "$root" "${GRID[@]}" "$@" \
    | grep -E "^\[sweep\] (started|done|FAILED|all|not finished|[0-9]+ of)" || true
  "$PY" -m prompt_tuning.sweep status --root "$root" > "$root.status.txt" || {
    cat "$root.status.txt"; echo "[toy] $spec did not finish; rerun the same command to resume." >&2
    exit 1
  }
}
sweep sweeps/toy/backbones.gin "$BACKBONE_ROOT"
BACKBONES="$BACKBONE_ROOT/size={size}/checkpoint_$BACKBONE_STEPS"
sweep sweeps/toy/prompt_tuning.gin "$OUT/prompt_tuning" --gin.BACKBONES="'$BACKBONES'"
sweep sweeps/toy/model_tuning.gin "$OUT/model_tuning" --gin.BACKBONES="'$BACKBONES'"

# The generic sweep outputs (CSV/JSON of every run, a table per sweep) next to the report.
"$PY" -m prompt_tuning.sweep collect --root "$OUT/prompt_tuning" --output "$OUT/collected" \
  --name prompt_tuning > /dev/null
"$PY" -m prompt_tuning.sweep collect --root "$OUT/model_tuning" --output "$OUT/collected" \
  --name model_tuning > /dev/null
COMMAND="scripts/reproduce_toy.sh$([ "$QUICK" = 1 ] && echo ' --quick' || true)"
"$PY" scripts/toy_report.py --prompt_tuning "$OUT/prompt_tuning" --model_tuning "$OUT/model_tuning" \
  --output "$OUT" --elapsed "$(( $(date +%s) - start ))" --command "$COMMAND" \
  --load "$(cut -d' ' -f1-3 /proc/loadavg)"
