#!/usr/bin/env bash
# Run the test suite on CPU. Creates .venv on first use, installs the requirements, runs pytest.
# Extra arguments go to pytest (e.g. `bash sh/test.sh -k losses`). `--fast` (first argument) leaves
# out the end-to-end tests marked slow: a check to run while editing (CI runs everything).
# `bash sh/test.sh -m identity` runs only the refactor-identity check. The tests run on parallel
# workers (below); TEST_WORKERS=1 runs them one after another.
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
# Parallel workers (pytest-xdist), one per core up to 4 (TEST_WORKERS=N sets the number; 1 runs
# in this process). Tests that share a fixture run on one worker (tests/conftest.py groups them);
# the cores are shared out so that the workers' torch threads do not oversubscribe them.
cores=$(nproc)
workers=${TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}
parallel=()
if [ "$workers" -gt 1 ]; then
  parallel=(-n "$workers" --dist loadgroup --no-loadscope-reorder)
  threads=$(( cores / workers > 0 ? cores / workers : 1 ))
  export OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads
fi
set +e
python -m pytest -q -p no:cacheprovider --timeout=900 --durations=15 "${parallel[@]}" \
  "${select[@]}" tests "$@"
rc=$?
set -e
# pytest exits 5 when it collected nothing: that is a failure, not a pass.
if [ "$rc" -eq 5 ]; then echo "sh/test.sh: no tests were collected" >&2; exit 1; fi
exit "$rc"
