#!/usr/bin/env bash
# Runs the same training command on every worker of a Cloud TPU pod slice.
# Usage: scripts/launch_tpu_pod.sh TPU_NAME ZONE -- --gin_file=... --gin.MODEL_DIR="'gs://...'" ...
# Each worker calls jax.distributed.initialize() (flag --tpu_multihost); MODEL_DIR and the data must be
# on GCS so that every worker sees them.
set -euo pipefail
if [ $# -lt 3 ] || [ "$3" != "--" ]; then
  echo "usage: $0 TPU_NAME ZONE -- [train flags]" >&2; exit 2
fi
TPU_NAME=$1; ZONE=$2; shift 3
ARGS=$(printf " %q" "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
  "cd ~/prompt_tuning && .venv/bin/python -m prompt_tuning.train --tpu_multihost $ARGS"
