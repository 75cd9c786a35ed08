# Sourced by the sh/ scripts: create .venv when missing, activate it, install requirements.txt.
# A stamp file skips pip when requirements.txt has not changed since the last install.
# VENV=DIR picks another environment directory; an already activated environment (VIRTUAL_ENV or
# CONDA_PREFIX set, e.g. one with a CUDA build of torch) is used as it is.
if [ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] && [ -z "${VENV:-}" ]; then
  VENV="${VIRTUAL_ENV:-$CONDA_PREFIX}"
fi
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating virtual environment in $VENV" >&2
  python3 -m venv "$VENV"
fi
if [ -f "$VENV/bin/activate" ]; then
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
else
  export PATH="$VENV/bin:$PATH"
fi
pip_install() { python -m pip install -q --disable-pip-version-check "$@"; }
stamp="$VENV/.requirements.sha"
want=$(cat requirements.txt requirements-test.txt 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  pip_install -r requirements.txt
  echo "$want" > "$stamp"
fi
