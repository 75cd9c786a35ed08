#!/usr/bin/env bash
# One prepared check of every CUDA path and GPU speed figure (docs/device_check.md):
#   bash bench/device_check.sh [--quick] [--device cpu] [--out DIR] [...]   (--help: all options)
# Creates or updates .venv from requirements.txt (sh/venv.sh; an activated environment is used as
# it is), adds the test requirements when pytest is missing, then runs bench/device_check.py.
# The time budget (8 minutes, --quick 3) counts from here, so it includes the install.
set -u
export DEVICE_CHECK_STARTED="${DEVICE_CHECK_STARTED:-$(date +%s)}"
cd "$(dirname "$0")/.." || exit 1
# shellcheck source=../sh/venv.sh
source sh/venv.sh || echo "device_check: the environment setup failed; trying anyway" >&2
python -c "import pytest, pytest_timeout" 2>/dev/null || pip_install -r requirements-test.txt \
  || echo "device_check: could not install the test requirements" >&2
exec python -m bench.device_check "$@"
