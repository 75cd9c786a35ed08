#!/usr/bin/env bash
# Training under Slurm: one process per GPU (one on a node without GPUs), on one node or several.
#
#   sbatch sh/slurm_train.sh configs/cifar10/ikl_at.yaml out_dir=runs/c10        # one node
#   sbatch --nodes=4 --gpus-per-node=8 sh/slurm_train.sh configs/cifar100/ikl_at_50m.yaml \
#       out_dir=runs/c100_50m
#
# Submit from the repository root. Preemption and time limits: the batch shell gets SIGTERM 5 min
# before the time limit (--signal below), passes it on to the training, which saves last.pt at its
# next step, and the job requeues itself (an array task only itself); the next start continues the
# run. A run that wrote final.json succeeds, whatever signal came during its final test; an error
# is not requeued. How it works and the signals Slurm sends: docs/scale.md#preemption-and-slurm
# (the logic is in sh/slurm_lib.sh). The run directory (out_dir) and data.root /
# data.generated.path must be on a filesystem every node sees.
#SBATCH --job-name=ikl-at
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=48:00:00
#SBATCH --signal=B:TERM@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%j.out
set -uo pipefail
# sbatch runs a copy of this file, so the repository is the directory it was submitted from.
repo="${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
if [ ! -f "$repo/sh/slurm_lib.sh" ] || [ ! -f "$repo/at/train.py" ]; then
  echo "slurm_train.sh: error: submitted from $repo, which is not the repository root; cd to" \
       "the repository and submit again" >&2
  exit 1
fi
# shellcheck source=sh/slurm_lib.sh
source "$repo/sh/slurm_lib.sh"
slurm_setup "$repo"
slurm_train "$@"
