#!/usr/bin/env bash
# SLURM batch script for multi-GPU hosts: one mrjax process per host driving all its GPUs (default),
# or one process per GPU (PER_GPU=1). jax.distributed reads the job from SLURM's environment.
#
#   sbatch --nodes=2 --gpus-per-node=8 launch/slurm.sh configs/llama3_8b.yaml model.name=/data/Meta-Llama-3-8B-Instruct
#   PER_GPU=1 sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 launch/slurm.sh configs/llama3_8b.yaml
#
# Expects: the repository (installed with `make install`) at the same path on every host, and
# run_dir on a filesystem every host sees (NFS, Lustre, a GCS/S3 mount): process 0 writes it, the
# others read it, and orbax writes the checkpoints from every process.
#SBATCH --job-name=mrjax
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --output=mrjax-%j.out
set -euo pipefail
CONFIG=${1:?config file}; shift
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
if [[ "${PER_GPU:-0}" != 1 ]]; then
  # One process per host: it drives every GPU of its host (JAX would otherwise give it one).
  GPUS=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L | wc -l)}
  export JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((GPUS - 1)))
fi
srun --kill-on-bad-exit=1 python3 -m mrjax.train --config "$CONFIG" "$@"
