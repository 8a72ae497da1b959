#!/usr/bin/env bash
# Device call 1 (carry .device/part-aa and .device/wheels; see prepare.sh): keep GGUF part 1 and the wheels
# on the machine for call 2, then the Hessian GEMM check, SparseGPT's factor of H^-1 (bench.sparsegpt_factor)
# and its sweep methods on 7B layer shapes (bench.sweep_speed) and the 7B-shaped SparseGPT / Wanda timing, each
# with its time per part (capture, statistics, solve, masks, rest = forward passes and copies) and beside one dense
# blocks-only forward of the same 128 x 2048 tokens (SWEEP=columns|triangular in the environment forces SparseGPT's
# sweep method, its metric parameter; default auto: the device's).
#   BENCH_GIT=$(git rev-parse --short HEAD) bash bench/device/gpu_7b.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
cp .device/part-aa /tmp/part-aa
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device/wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
SWEEP=${SWEEP:-auto}
timeout "${THESS:-90}" python3 -m bench.hessian_gemm 2>&1 | tee "$OUT/hessian_gemm.log"
timeout "${TFACTOR:-90}" python3 -m bench.sparsegpt_factor --reps 2 2>&1 | tee "$OUT/sparsegpt_factor.log"
if ! timeout "${TSWEEP:-120}" python3 -m bench.sweep_speed 2>&1 | tee "$OUT/sweep_speed.log"; then
  echo "bench.sweep_speed failed: the 7B run uses the column loop (--sweep columns)"
  SWEEP=columns
fi
timeout "${T7B:-480}" python3 -m bench.speed --model llama7b-random --device cuda --metric sparsegpt,wanda \
  --phases sparsegpt,wanda --forward 1 --sweep "$SWEEP" 2>&1 | tr '\r' '\n' | tee "$OUT/speed7b.log" | grep -v 'block/s'
cp bench/results/speed.json bench/results/speed.md bench/results/scale.md bench/results/hessian_gemm.json \
  bench/results/sweep_speed.json bench/results/sweep_speed.md bench/results/sparsegpt_factor.json \
  bench/results/sparsegpt_factor.md "$OUT/"
