#!/usr/bin/env bash
# Device call 2, issued at once after gpu_7b.sh (the machine stays warm ~30 s; carry .device/part-ab and
# .device/data): join SmolLM2's GGUF and run protocol P (python -m bench.quality --suite gpu-p).
#   BENCH_GIT=$(git rev-parse --short HEAD) bash bench/device/gpu_smollm2.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
[ -f /tmp/part-aa ] && [ -d /tmp/site ] || { echo "no /tmp/part-aa or /tmp/site: not the machine of call 1"; exit 3; }
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD PRUNEKIT_DATA_DIR=$PWD/.device/data
mkdir -p /tmp/smol
cat /tmp/part-aa .device/part-ab > /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf
timeout "${TQ:-300}" python3 -m bench.quality --protocol P --model /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf \
  --suite gpu-p 2>&1 | tr '\r' '\n' | grep -v 'block/s\|it/s' | tee "$OUT/quality_P.log"
cp bench/results/quality_P.json bench/results/quality_P.md "$OUT/"
