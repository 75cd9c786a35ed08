#!/usr/bin/env bash
# Run the test suite on CPU. Creates .venv on first use, installs the requirements, runs pytest.
# Extra arguments go to pytest (e.g. `bash sh/test.sh -k losses`). `--fast` (first argument) leaves
# out the end-to-end tests marked slow: a check to run while editing (CI runs everything).
# `bash sh/test.sh -m identity` runs only the refactor-identity check.
set -euo pipefail
cd "$(dirname "$0")/.."
select=()
if [ "${1:-}" = --fast ]; then select=(-m "not slow"); shift; fi
source sh/venv.sh
pip_install -r requirements-test.txt
# robustbench and what its load_model imports (the zoo tests load published entries through it);
# its `autoattack` import is pyautoattack, aliased by eval/robustbench_import.py.
pip_install -r requirements-zoo.txt
export CUDA_VISIBLE_DEVICES="" WANDB_MODE=disabled MPLBACKEND=Agg
set +e
python -m pytest -q -p no:cacheprovider --timeout=900 --durations=15 "${select[@]}" tests "$@"
rc=$?
set -e
# pytest exits 5 when it collected nothing: that is a failure, not a pass.
if [ "$rc" -eq 5 ]; then echo "sh/test.sh: no tests were collected" >&2; exit 1; fi
exit "$rc"
