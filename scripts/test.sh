#!/usr/bin/env bash
# Runs ftlab's checks: sets up .venv on first use (pip install -e .[test]), then the
# formatter/linter check and the test suite on 8 fake CPU devices. Extra arguments go to
# pytest, e.g. `bash scripts/test.sh -k policies`.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/ruff format --check --quiet ftlab tests scripts configs
.venv/bin/ruff check --quiet ftlab tests scripts configs
.venv/bin/python -m pytest "$@"
