#!/usr/bin/env bash
# Usage: TPU_NAME=my-slice ZONE=us-central2-b launch/tpu_pod.sh configs/X.yaml [key=value ...]
# Copies nothing: the repo must already be checked out at the same path on every worker.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
CONFIG=${1:?config file}; shift
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
  "cd $(pwd) && python3 -m mrjax.train --config $CONFIG $*"
