#!/usr/bin/env bash
# Cloud TPU pod slice: the same command on every worker of an existing slice (this creates nothing).
#
#   TPU_NAME=my-v5p-32 ZONE=us-east5-a launch/tpu_pod.sh configs/llama3_8b.yaml model.name=gs://bucket/llama3-8b-hf
#
# Expects: the slice exists (gcloud compute tpus tpu-vm create ...), mrjax is checked out and
# installed (`make install`, with jax[tpu]) at this same path on every worker, and run_dir is on
# storage every worker sees (a GCS bucket mount or NFS). jax.distributed finds the slice by itself.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME (the slice)}" "${ZONE:?set ZONE}"
CONFIG=${1:?config file}; shift
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE" --format='value(state)' | grep -qx READY \
  || { echo "error: TPU $TPU_NAME in $ZONE is not READY (create it first; this script creates nothing)" >&2; exit 2; }
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
  "cd $(printf %q "$(pwd)") && python3 -m mrjax.train --config $(printf %q "$CONFIG")$ARGS"
