#!/usr/bin/env bash
# IKL-AT end to end on CPU in a few minutes: the UCI digits shipped with scikit-learn, a WRN-16-1,
# 15 epochs; prints per-epoch validation and a final test table (clean and PGD-10 accuracy).
# Extra dotted.key=value arguments override the config; the run goes to runs/demo_<time> by default.
set -euo pipefail
cd "$(dirname "$0")/.."
source sh/venv.sh
exec python -m at.train -c configs/digits/ikl_at.yaml "out_dir=runs/demo_$(date +%Y%m%d_%H%M%S)" "$@"
