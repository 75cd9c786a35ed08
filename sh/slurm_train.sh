#!/usr/bin/env bash
# Multi-node training under Slurm: one torchrun per node, one process per GPU.
#
#   sbatch --nodes=4 --gpus-per-node=8 sh/slurm_train.sh configs/cifar100/ikl_at_50m.yaml out_dir=runs/c100_50m
#
# The run directory (out_dir) and data.root / data.generated.path must be on a filesystem every
# node sees: rank 0 writes the checkpoints, every rank reads them on --resume. Requeued or
# resubmitted jobs continue the run: add --resume (it starts afresh when there is nothing to resume).
#SBATCH --job-name=ikl-at
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=48:00:00
#SBATCH --output=slurm-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
source sh/venv.sh
config="${1:?usage: sbatch [options] sh/slurm_train.sh CONFIG [dotted.key=value ...] [--resume]}"
shift
gpus_per_node="${SLURM_GPUS_ON_NODE:-$(python -c 'import torch; print(torch.cuda.device_count())')}"
head_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
# srun starts one torchrun per node; the c10d rendezvous on the first node joins them.
srun --kill-on-bad-exit=1 torchrun \
  --nnodes="$SLURM_JOB_NUM_NODES" \
  --nproc_per_node="$gpus_per_node" \
  --rdzv_id="$SLURM_JOB_ID" \
  --rdzv_backend=c10d \
  --rdzv_endpoint="$head_node:${MASTER_PORT:-29500}" \
  -m at.train -c "$config" "$@"
