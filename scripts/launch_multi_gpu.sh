#!/usr/bin/env bash
# One process per GPU on a single host, joined with jax.distributed (NCCL collectives).
# Usage: NUM_GPUS=8 scripts/launch_multi_gpu.sh --gin_file=... --gin.MODEL_DIR="'/path'" ...
# With one process owning all GPUs instead, simply run `python -m prompt_tuning.train ...`.
set -euo pipefail
cd "$(dirname "$0")/.."
NUM_GPUS=${NUM_GPUS:-$(nvidia-smi -L | wc -l)}
PORT=${PORT:-12355}
pids=()
for ((i = 0; i < NUM_GPUS; i++)); do
  CUDA_VISIBLE_DEVICES=$i .venv/bin/python -m prompt_tuning.train --multiprocess_gpu \
    --coordinator_address="127.0.0.1:${PORT}" --process_count="$NUM_GPUS" --process_index="$i" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
