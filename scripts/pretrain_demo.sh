#!/usr/bin/env bash
# A second experiment without ImageNet weights: pretrain a narrow VGG11-BN on Fashion-MNIST
# classes 0-4, then fine-tune on classes 5-9 under four plans (a study); the report in
# workdirs/demo/report.{md,json}. Extra arguments go to scripts/pretrain_demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python scripts/pretrain_demo.py --workdir workdirs/demo "$@"
