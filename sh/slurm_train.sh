#!/usr/bin/env bash
# Multi-node training under Slurm: one torchrun per node, one process per GPU.
#
#   sbatch --nodes=4 --gpus-per-node=8 sh/slurm_train.sh configs/cifar100/ikl_at_50m.yaml out_dir=runs/c100_50m
#
# Preemption: Slurm sends SIGTERM ahead of the time limit (--signal below) or on preemption;
# every rank saves last.pt at its next step, rank 0 writes preempted.json, and at.train exits with
# status 75. The job then requeues itself and continues with --resume (added when last.pt exists).
# The run directory (out_dir) and data.root / data.generated.path must be on a filesystem every
# node sees: rank 0 writes the checkpoints, every rank reads them on --resume.
#SBATCH --job-name=ikl-at
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=48:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%j.out
set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
source sh/venv.sh
config="${1:?usage: sbatch [options] sh/slurm_train.sh CONFIG [dotted.key=value ...]}"
shift
# The run directory, resolved by the project's own config loader (base + config + overrides).
out_dir="$(python -c 'import sys; from at.config import load_config; print(load_config(sys.argv[1], sys.argv[2:])["out_dir"])' "$config" "$@")" || exit 1
resume=()
if [ -f "$out_dir/last.pt" ]; then resume=(--resume); fi
gpus_per_node="${SLURM_GPUS_ON_NODE:-$(python -c 'import torch; print(torch.cuda.device_count())')}"
head_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
# srun starts one torchrun per node; the c10d rendezvous on the first node joins them. torchrun
# passes SIGTERM on to its workers.
srun --kill-on-bad-exit=1 torchrun \
  --nnodes="$SLURM_JOB_NUM_NODES" \
  --nproc_per_node="$gpus_per_node" \
  --rdzv_id="$SLURM_JOB_ID" \
  --rdzv_backend=c10d \
  --rdzv_endpoint="$head_node:${MASTER_PORT:-29500}" \
  -m at.train -c "$config" "$@" "${resume[@]}"
status=$?
# torchrun reports a worker's exit status 75 as a failure of its own, so the run directory says
# what happened: preempted.json is written only when a signal stopped the run after saving
# (requeueing after an error would fail forever).
if [ -f "$out_dir/preempted.json" ]; then
  echo "slurm_train.sh: preempted ($(cat "$out_dir/preempted.json")); requeueing job $SLURM_JOB_ID" >&2
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$status"
