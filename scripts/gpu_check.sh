#!/usr/bin/env bash
# One prepared GPU check: ftlab vs PyTorch, VGG16 at 224 px, float32 and bfloat16, plans full
# and linear_probe, JSON and a markdown table into $OUT (or the first argument).
#
#   bash scripts/gpu_check.sh [OUT_DIR]
#
# On a CUDA machine it first makes sure jax has a GPU backend (else `pip install jax[cuda12]`;
# offline, it says so and goes on with what is installed). The whole check stays under 8
# minutes: one bench process (one model build per dtype, one compile per plan), 5 repeats,
# each part under `timeout`. FTLAB_GPU_CHECK_SMOKE=1 runs the same invocation on a tiny model on
# the CPU (tests/test_bench.py does), so the command itself is tested without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT_DIR=${1:-${OUT:-workdirs/gpu_check}}
mkdir -p "$OUT_DIR"

if [[ "${FTLAB_GPU_CHECK_SMOKE:-0}" == 1 ]]; then
  size=(--model vgg11 --width 0.0625 --image-size 32 --batch 4 --repeats 1 --warmup 1)
  # A hang guard only: the smoke run takes under a minute, longer on a busy machine.
  budget=${FTLAB_GPU_CHECK_BUDGET:-600}
else
  size=(--model vgg16 --width 1.0 --image-size 224 --batch 64 --repeats 5 --warmup 2)
  budget=${FTLAB_GPU_CHECK_BUDGET:-420}  # seconds for the bench; the install check has 120 s
  if ! timeout 60 "$PY" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')"; then
    echo "gpu_check: jax has no GPU backend; installing jax[cuda12]" >&2
    version=$("$PY" -c "import jax; print(jax.__version__)")
    timeout 120 "$PY" -m pip install -q "jax[cuda12]==$version" \
      || echo "gpu_check: could not install jax[cuda12] (offline?); using jax as installed" >&2
  fi
  timeout 60 "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" \
    || echo "gpu_check: this torch has no CUDA; its numbers are CPU numbers (see the JSON)" >&2
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT_DIR/gpu.csv" 2>&1 || true
fi

XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5} \
  timeout "$budget" "$PY" scripts/bench.py "${size[@]}" --head gap --frameworks ftlab,torch \
  --plans full linear_probe --dtype float32,bfloat16 --json "$OUT_DIR/bench_gpu.json" \
  | tee "$OUT_DIR/bench_gpu.md"
