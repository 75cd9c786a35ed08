#!/usr/bin/env bash
# Standard AutoAttack (L-inf 8/255, all 10,000 test images, float32, eval mode) on a training run:
#   bash sh/eval_autoattack.sh runs/cifar100_ikl_at [--weights last] [--n-ex 1000] [--batch-size 500]
# Resumable: rerun the same command after a crash or preemption. Result: <run>/eval/autoattack-standard_linf_eps8-255_n<images>_<weights>.json
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: bash sh/eval_autoattack.sh RUN_DIR [python -m eval.autoattack options]" >&2
  exit 2
fi
target=$(realpath -m -- "$1")  # the path as the user meant it, before changing directory
shift
cd "$(dirname "$0")/.."
source sh/venv.sh
exec python -m eval.autoattack "$target" "$@"
