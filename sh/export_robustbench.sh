#!/usr/bin/env bash
# Package a run for a RobustBench submission (checkpoint, model_info card, zoo entry) in export/,
# after standard AutoAttack on the full test set, e.g.
#   bash sh/export_robustbench.sh runs/cifar100_ikl_at --name Cui2023Decoupled_WRN-34-10 \
#     --paper-link https://arxiv.org/abs/2305.13948 --venue "NeurIPS 2024"
set -euo pipefail
cd "$(dirname "$0")/.."
source sh/venv.sh
exec python -m eval.export_robustbench "$@"
