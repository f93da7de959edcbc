#!/usr/bin/env bash
# The cross-lingual toy demonstration of factorized language x task prompts (Vu et al. 2022), on CPU,
# through the gin entry points (configs/demo/crosslingual/, configs/methods/factorized*.gin):
#   0. pre-trains a small T5 1.1 on two toy languages (A: the toy world of tasks/toy.py; B: a generated
#      re-lexicalisation of it, tasks/toy_crosslingual.py): span corruption + 3 supervised tasks in each
#      language (cached in .cache/crosslingual),
#   a. freezes it and learns a language prompt per language on unlabeled text (span corruption),
#   b. learns the prompt of a held-out task (indoors? yes/no) in language A only, after A's frozen
#      language prompt (evaluated before training too: the untrained baseline),
#   c. evaluates zero-shot in language B with B's language prompt swapped in, against A's prompt kept,
#   then prints the table and writes a bar plot.
# Environment: XL_OUTPUT (default crosslingual_output/), XL_CACHE (default .cache/crosslingual), PYTHON,
# XL_ANCHORED=1 (the variant whose backbone also sees cross-lingual signal: a code-switched corpus and
# "describe" from B to A, tasks/toy_crosslingual.py; the default backbone sees the two languages apart).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="$(realpath -m "${XL_OUTPUT:-crosslingual_output}")"
CACHE="$(realpath -m "${XL_CACHE:-.cache/crosslingual}")"
export TF_CPP_MIN_LOG_LEVEL=3 JAX_PLATFORMS=cpu XLA_PYTHON_CLIENT_PREALLOCATE=false

if [ ! -x .venv/bin/python ]; then
  echo "[xl-demo] creating .venv"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import prompt_tuning, seqio, jax, flax, gin, matplotlib" >/dev/null 2>&1; then
  echo "[xl-demo] installing the package into .venv (first run only)"
  .venv/bin/python -m pip install --quiet --upgrade pip setuptools wheel
  .venv/bin/python -m pip install --quiet -e .
fi

run() {  # run NAME DIR MODULE GIN_FILE [extra flags...]
  local name=$1 dir=$2 module=$3 gin=$4; shift 4
  echo "[xl-demo] $name: python -m prompt_tuning.$module --gin_file=$gin $*"
  local t0; t0=$(date +%s)
  if ! .venv/bin/python -m "prompt_tuning.$module" --gin_file="$gin" "$@" > "$dir.log" 2>&1; then
    tail -n 30 "$dir.log"; echo "[xl-demo] $name failed; full log: $dir.log" >&2; exit 1
  fi
  TIMINGS="${TIMINGS:-}${TIMINGS:+,}${name%% *}=$(( $(date +%s) - t0 ))"
  grep -E "step [0-9]+/[0-9]+:|inference eval|eval toy" "$dir.log" | sed -E 's/^.*\] //' | awk 'NR % 5 == 0 || /eval/' | tail -n 6 || true
}
latest() {  # latest NUMPY_DIR_PARENT FILE
  echo "$(ls -d "$1"/numpy_checkpoints/checkpoint_* | sort -t_ -k2 -n | tail -n 1)/$2"
}

start=$(date +%s)
echo "[xl-demo] load at start: $(cut -d' ' -f1-3 /proc/loadavg)"
mkdir -p "$CACHE" "$OUT"
BACKBONE_FLAGS=()
if [ "${XL_ANCHORED:-0}" = 1 ]; then
  BACKBONE_FLAGS=(--gin.MIXTURE_OR_TASK_NAME="'toy_xl_anchored_backbone_mixture'")
  echo "[xl-demo] variant: anchored backbone (code-switched corpus + describe B -> A)"
fi
KEY=$( (echo "${BACKBONE_FLAGS[@]}"; cat configs/demo/crosslingual/backbone.gin configs/demo/crosslingual/size.gin configs/demo/size.gin \
  tasks/toy.py tasks/toy_crosslingual.py prompt_tuning/architectures/*.py) | sha1sum | cut -c1-12)
BACKBONE="$CACHE/backbone-$KEY"
if [ -f "$BACKBONE/DONE" ]; then
  echo "[xl-demo] reusing the cached backbone $BACKBONE"
else
  rm -rf "$BACKBONE"; mkdir -p "$BACKBONE"
  run "backbone pre-training (both languages)" "$BACKBONE" train demo/crosslingual/backbone.gin \
    --gin.MODEL_DIR="'$BACKBONE'" "${BACKBONE_FLAGS[@]}"
  touch "$BACKBONE/DONE"
fi
CKPT=$(ls -d "$BACKBONE"/checkpoint_* | sort -t_ -k2 -n | tail -n 1)

rm -rf "$OUT/languages" "$OUT/task" "$OUT/eval"
mkdir -p "$OUT/languages" "$OUT/task" "$OUT/eval"
run "a_language_prompts (unlabeled text)" "$OUT/languages" train demo/crosslingual/languages.gin \
  --gin.MODEL_DIR="'$OUT/languages'" --gin.INITIAL_CHECKPOINT_PATH="'$CKPT'"
LANG_FILE=$(latest "$OUT/languages" encoder.prompt.prompt.lang_prompts.embedding.npy)
run "b_task_prompt (language A only)" "$OUT/task" train demo/crosslingual/task.gin \
  --gin.MODEL_DIR="'$OUT/task'" --gin.INITIAL_CHECKPOINT_PATH="'$CKPT'" --gin.LANG_PROMPTS_FILE="'$LANG_FILE'"
TASK_FILE=$(latest "$OUT/task" encoder.prompt.prompt.task_prompts.embedding.npy)
run "c_zero_shot_eval (swap in B's prompt)" "$OUT/eval" eval demo/crosslingual/eval.gin \
  --gin.EVAL_OUTPUT_DIR="'$OUT/eval'" --gin.CHECKPOINT_PATH="'$CKPT'" \
  --gin.LANG_PROMPTS_FILE="'$LANG_FILE'" --gin.TASK_PROMPTS_FILE="'$TASK_FILE'"

cp "$LANG_FILE" "$OUT/lang_prompts.npy"; cp "$TASK_FILE" "$OUT/task_prompt.npy"
.venv/bin/python scripts/crosslingual_report.py --task_dir "$OUT/task" --eval_dir "$OUT/eval" \
  --output "$OUT" --timings "$TIMINGS"
echo "[xl-demo] total $(( $(date +%s) - start )) s; load at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
