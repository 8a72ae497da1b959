#!/usr/bin/env bash
# Protocol P on Qwen2.5-Coder-1.5B on one device machine, its GGUF brought in parts (prepare_qwen15.sh first).
# The machine keeps /tmp only while warm (~30 s after a call), so issue each call as soon as the last returns:
#   calls 1-18: carry [".device/q15/part-XX"] (aa, ab, ... ar in order), command `bash bench/device/gpu_qwen15.sh part`
#   call 19:    carry [".device/wheels", ".device/data"], command
#               `BENCH_GIT=<commit> bash bench/device/gpu_qwen15.sh run` (timeout_s <= 600; TQ: the suite's limit)
# `run` joins the parts, checks size and sha256, then runs `bench.quality --protocol qwen15-P --suite gpu-p15` with
# its results in /tmp/q15res (kept on the machine: a second `run` continues the suite) and copies them to $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
G=/tmp/q15/Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf
SHA=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
mkdir -p /tmp/q15 /tmp/q15res
case "${1:-}" in
part)
  cp .device/q15/part-* /tmp/q15/ && ls /tmp/q15 | tr '\n' ' ' && du -cb /tmp/q15/part-* | tail -1 ;;
run)
  [ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .device/wheels/*.whl
  if [ ! -f $G ]; then
    cat /tmp/q15/part-* > $G.tmp && echo "$SHA  $G.tmp" | sha256sum -c - && mv $G.tmp $G && rm -f /tmp/q15/part-* \
      || { echo "the joined GGUF is incomplete or wrong: $(ls /tmp/q15 | tr '\n' ' ')"; exit 3; }
  fi
  export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD PRUNEKIT_DATA_DIR=$PWD/.device/data BENCH_RESULTS=/tmp/q15res
  timeout "${TQ:-540}" python3 -m bench.quality --protocol qwen15-P --model $G --suite gpu-p15 2>&1 \
    | tr '\r' '\n' | grep -v 'block/s\|it/s\|batch/s' | tee -a /tmp/q15res/quality_qwen15-P.log
  cp /tmp/q15res/quality_qwen15-P.* "$OUT/" ;;
*) echo "usage: gpu_qwen15.sh part|run"; exit 2 ;;
esac
