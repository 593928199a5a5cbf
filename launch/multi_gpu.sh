#!/usr/bin/env bash
# Usage on each host: launch/multi_gpu.sh configs/X.yaml [key=value ...]
# Single host: all local GPUs form the mesh. Several hosts: export JAX_COORDINATOR_ADDRESS=host0:1234,
# JAX_NUM_PROCESSES=<hosts> and JAX_PROCESS_ID=<this host's index> before running.
set -euo pipefail
CONFIG=${1:?config file}; shift
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec python3 -m mrjax.train --config "$CONFIG" "$@"
