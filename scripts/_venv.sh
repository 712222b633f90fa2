# Sourced by the scripts: makes sure .venv exists and holds the project with its dev extras.
# Re-installs when pyproject.toml changed since the last install. Needs Python 3.11+
# (PYTHON=/path/to/python3.x to choose one).
set -euo pipefail
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "backjobs needs Python 3.11 or newer; set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi
if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
  echo "installing backjobs and its dependencies into .venv"
  # uv (from PyPI, into .venv) installs the same packages as pip in half the time (the
  # whole set-up ≈ 10 s against ≈ 21 s on 2 cores); where uv cannot be had, pip does it.
  # Compiled at install, as pip does: the tests start hundreds of Python processes, which
  # may not write .pyc.
  if .venv/bin/python -m pip install --quiet 'uv<1' 2>/dev/null; then
    .venv/bin/uv pip install --quiet --compile-bytecode --python .venv/bin/python -e '.[dev]'
  else
    echo "uv is not available; installing with pip"
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e '.[dev]'
  fi
  touch .venv/.installed
fi
