#!/usr/bin/env bash
# Train one run: bash sh/train.sh CONFIG [dotted.key=value ...] [--resume]
# CONFIG is an experiment YAML (a path from here, or from the repository root, e.g.
# configs/cifar100/ikl_at.yaml); the overrides are applied last. Relative paths in the overrides
# (out_dir=runs/try) are relative to the repository root, where the run is started.
set -euo pipefail
config="${1:?usage: bash sh/train.sh CONFIG [dotted.key=value ...] [--resume]}"
shift
# A config named relative to the caller's directory; otherwise it is looked up from the root.
if [ -f "$config" ]; then config=$(realpath -- "$config"); fi
cd "$(dirname "$0")/.."
source sh/venv.sh
exec python -m at.train -c "$config" "$@"
