#!/usr/bin/env bash
# The demo: setup (first use installs .venv and the offline data), then a transfer experiment
# on Fashion-MNIST under four fine-tuning plans; results in workdirs/demo/results.{md,png}.
# Extra arguments go to scripts/demo.py (e.g. `--readme README.md` to refresh the README table).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python scripts/demo.py --workdir workdirs/demo "$@"
