#!/usr/bin/env bash
# One device call for issue 23 (carry .device/wheels; prepare.sh fetches them): 2:4 semi-structured kernels
# against dense, per weight shape and for a whole model loaded with prunekit.load_pretrained(sparse_kernels=True)
# (bench.sparse24 --e2e 2), then the 7B-shaped SparseGPT / Wanda timing with SparseGPT's phases (bench.speed;
# SKIP_7B=1 leaves it out).
#   BENCH_GIT=$(git rev-parse --short HEAD) bash bench/device/gpu_issue23.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device/wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout "${T24:-250}" python3 -m bench.sparse24 --dtypes bfloat16 --tokens 1 32 2048 8192 32768 \
  --e2e "${E2E_BLOCKS:-2}" 2>&1 | tr '\r' '\n' \
  | grep -v 'it/s\|batch/s' | tee "$OUT/sparse24.log"
cp bench/results/sparse24.json bench/results/sparse24.md "$OUT/"
[ -n "${SKIP_7B:-}" ] && exit 0
timeout "${T7B:-380}" python3 -m bench.speed --model llama7b-random --device cuda --metric sparsegpt,wanda \
  --phases sparsegpt --forward 1 2>&1 | tr '\r' '\n' | tee "$OUT/speed7b.log" | grep -v 'block/s'
cp bench/results/speed.json bench/results/speed.md bench/results/scale.md "$OUT/"
