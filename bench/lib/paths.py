"""Where the benchmarks read and write. No prunekit import: bench/mask_hashes.py uses it without one.

``BENCH_RESULTS`` puts the results elsewhere (a quick check of a script must not touch bench/results/)."""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = Path(os.environ.get("BENCH_RESULTS") or REPO / "bench" / "results")


def shared_dir() -> Path:
    """The read-only folder holding data/ and models/: ``$PRUNEKIT_SHARED`` (as for the tests), else the parent of
    ``$PRUNEKIT_DATA_DIR`` (prunekit reads its data there), else ``shared`` next to the repository."""
    if os.environ.get("PRUNEKIT_SHARED"):
        return Path(os.environ["PRUNEKIT_SHARED"])
    data = os.environ.get("PRUNEKIT_DATA_DIR")
    return Path(data).resolve().parent if data else REPO.parent / "shared"
