#!/usr/bin/env bash
# One host with several GPUs: one process drives them all (the mesh spans every local GPU).
#
#   launch/multi_gpu.sh configs/llama3_8b.yaml model.name=/data/Meta-Llama-3-8B-Instruct
#
# Several hosts without SLURM: run this on every host with the job's coordinates exported first:
#   JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=<0|1> launch/multi_gpu.sh CONFIG
# (run_dir on a filesystem every host sees). Under SLURM use launch/slurm.sh. Check the config first
# with python -m mrjax.plan --config CONFIG --devices <all GPUs of the job> --device-memory <GiB>.
set -euo pipefail
CONFIG=${1:?config file}; shift
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec python3 -m mrjax.train --config "$CONFIG" "$@"
