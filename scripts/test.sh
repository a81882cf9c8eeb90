#!/usr/bin/env bash
# Runs ftlab's checks: setup (first use installs .venv), the formatter and linter, and the
# test suite on 8 fake CPU devices. Extra arguments go to pytest, e.g. `-k policies`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff format --check --quiet ftlab tests scripts configs
.venv/bin/ruff check --quiet ftlab tests scripts configs
# Two workers, whole files each (module fixtures are shared); `-n 0` runs in one process.
.venv/bin/python -m pytest -n 2 --dist loadfile "$@"
