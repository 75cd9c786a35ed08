#!/usr/bin/env bash
# IKL-AT end to end on CPU: the UCI digits shipped with scikit-learn, a WRN-16-1, 15 epochs; then
# PGD-20 on the 360 test images and standard AutoAttack on the first $DEMO_AA_IMAGES (default 20)
# of them, and one table with the clean, PGD-20 and AutoAttack accuracy.
# Extra dotted.key=value arguments override the training config.
set -euo pipefail
cd "$(dirname "$0")/.."
source sh/venv.sh
run="runs/demo_$(date +%Y%m%d_%H%M%S)"
python -m at.train -c configs/digits/ikl_at.yaml "out_dir=$run" "$@"
python -m eval.pgd "$run" --steps 20
python -m eval.autoattack "$run" --n-ex "${DEMO_AA_IMAGES:-20}"
echo
python -m eval.summary "$run"
