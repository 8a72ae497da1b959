#!/usr/bin/env bash
# On the device (second call): join the GGUF parts, install the carried wheels, print what to pass.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p /tmp/smol
cat /tmp/part-aa .device/part-ab > /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device/wheels/*.whl
echo "export PYTHONPATH=/tmp/site:$PWD; model: /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf"
# e.g. PYTHONPATH=/tmp/site:$PWD python3 bench/quality.py --protocol P --model /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf
