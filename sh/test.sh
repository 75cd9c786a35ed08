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
# One worker per core, up to 4; TEST_WORKERS=N sets the number (1: all in this process).
cores=$(nproc)
workers=${TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}
if ! [[ "$workers" =~ ^[1-9][0-9]*$ ]]; then
  echo "sh/test.sh: error: TEST_WORKERS must be a whole number >= 1, got '$workers'" >&2
  exit 1
fi
source sh/venv.sh
# The test requirements, and robustbench with what its load_model imports (the zoo tests load
# published entries through it; its `autoattack` import is pyautoattack, aliased by
# eval/robustbench_import.py). A stamp, as in sh/venv.sh, skips pip when neither file changed.
test_stamp="$VENV/.test-requirements.sha"
test_want=$(cat requirements-test.txt requirements-zoo.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$test_stamp" 2>/dev/null)" != "$test_want" ]; then
  pip_install -r requirements-test.txt
  pip_install -r requirements-zoo.txt
  echo "$test_want" > "$test_stamp"
fi
export CUDA_VISIBLE_DEVICES="" WANDB_MODE=disabled MPLBACKEND=Agg
# Parallel workers (pytest-xdist; the cores are shared out so that the workers' torch threads do
# not oversubscribe them). Tests that share a fixture run on one worker (tests/conftest.py).
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
