#!/usr/bin/env bash
# Runs ftlab's checks: setup (first use installs $VENV, default .venv, with $PYTHON), the
# formatter and linter, and the test suite on 8 fake CPU devices. Extra arguments go to
# pytest, e.g. `-k policies` or `-m "not slow"` (the fast tier).
#   PYTHON=python3.13 VENV=.venv-py313 bash scripts/test.sh -m "not slow"   # another Python
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
venv=${VENV:-.venv}
"$venv/bin/ruff" format --check --quiet ftlab tests scripts configs
"$venv/bin/ruff" check --quiet ftlab tests scripts configs
# Two workers, whole files each (module fixtures are shared); `-n 0` runs in one process.
"$venv/bin/python" -m pytest -n 2 --dist loadfile "$@"
