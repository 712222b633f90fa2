# Sourced by the scripts: makes sure .venv exists and holds the project with its dev extras.
# Re-installs when pyproject.toml changed since the last install. Needs Python 3.11+
# (PYTHON=/path/to/python3.x to choose one).
set -euo pipefail
# Without PYTHON, the system's interpreter is taken when it is 3.11+ and can make a venv:
# a distribution's build is compiled with profile-guided and link-time optimisation, which
# a pyenv build is not by default (on the project's machines a pure-Python loop runs 18 %
# faster on Debian's 3.11 than on pyenv's, importing Prefect ≈ 10 %). Else python3 on PATH.
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  if /usr/bin/python3 -c 'import sys, ensurepip, venv; sys.exit(sys.version_info < (3, 11))' \
    2>/dev/null; then
    PYTHON=/usr/bin/python3
  fi
fi
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
# Every Python process of .venv (the CLI, servers, workers, flow runs, the tests) collects
# cyclic garbage after 10,000 new container objects instead of 700: importing Prefect
# creates hundreds of thousands, and with the default the collector ran so often that it
# took ≈ 20 % of the import's CPU, in each of the ≈ 250 processes a test run starts. A
# collection still comes, just less often (peak memory of an import: the same, measured).
for site in .venv/lib/python3*/site-packages; do
  [ -d "$site" ] || continue
  [ -f "$site/backjobs_gc.pth" ] || echo 'import gc; gc.set_threshold(10000, 10, 10)' >"$site/backjobs_gc.pth"
done
