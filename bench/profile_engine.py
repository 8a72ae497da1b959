"""Where the engine's time goes on a GPU: torch.profiler over a prune of a few 7B-shaped blocks.

    python bench/profile_engine.py --blocks 4 --metric wanda
Prints the top operators by self CPU time and by self device time (not saved: a diagnostic)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import random_llama  # noqa: E402

import prunekit  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--metric", default="wanda")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    a = ap.parse_args(argv)
    model = random_llama(a.blocks, torch.bfloat16)
    calib = torch.randint(0, 32000, (a.nsamples, a.seqlen), generator=torch.Generator().manual_seed(0))
    cfg = {"metric": a.metric, "sparsity": 0.5, "device": "cuda", "nsamples": a.nsamples, "seqlen": a.seqlen}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.time()
        prunekit.prune(model, None, cfg, calib_ids=calib)
        torch.cuda.synchronize()
        print(f"{a.metric}: {a.blocks} blocks in {time.time() - t:.2f} s (profiled)", flush=True)
    ka = prof.key_averages()
    print(ka.table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=60))
    print(ka.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
