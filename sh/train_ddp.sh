#!/usr/bin/env bash
# One node, several GPUs: bash sh/train_ddp.sh CONFIG [dotted.key=value ...] [--resume]
# GPUS=N picks the number of processes (default: every visible GPU). optim.batch_size is the
# global batch, split over the GPUs; model.sync_bn=true takes BatchNorm statistics over all of it.
set -euo pipefail
cd "$(dirname "$0")/.."
source sh/venv.sh
config="${1:?usage: bash sh/train_ddp.sh CONFIG [dotted.key=value ...] [--resume]}"
shift
gpus="${GPUS:-$(python -c 'import torch; print(torch.cuda.device_count())')}"
if [ "$gpus" -lt 1 ]; then echo "sh/train_ddp.sh: no GPU visible (set GPUS=N for N CPU processes)" >&2; exit 1; fi
exec torchrun --standalone --nproc_per_node="$gpus" -m at.train -c "$config" "$@"
