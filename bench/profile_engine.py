"""Where the engine's time goes on a GPU: torch.profiler over a prune of a few 7B-shaped blocks.

    python -m bench.profile_engine --blocks 4 --metric wanda
    python -m bench.profile_engine --blocks 1 --nsamples 2 --seqlen 64 --device cpu     # a quick check
Prints the top operators by self CPU time and by self device time (not saved: a diagnostic)."""
from __future__ import annotations

import argparse
import time

from torch.profiler import ProfilerActivity, profile

import prunekit
from prunekit.core.offload import resolve_device

from bench.lib.models import RANDOM_LLAMA, calibration, load
from bench.lib.protocols import PROTOCOLS
from bench.lib.timing import sync


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--metric", default="wanda")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args(argv)
    device = resolve_device(a.device).type
    model, _ = load(RANDOM_LLAMA, "bfloat16", blocks=a.blocks)
    proto = {**PROTOCOLS["P"], "nsamples": a.nsamples, "seqlen": a.seqlen}
    calib = calibration(None, proto)
    cfg = {"metric": a.metric, "sparsity": 0.5, "device": device, "nsamples": a.nsamples, "seqlen": a.seqlen}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        t = time.time()
        prunekit.prune(model, None, cfg, calib_ids=calib)
        sync(device)
        print(f"{a.metric}: {a.blocks} blocks in {time.time() - t:.2f} s (profiled)", flush=True)
    ka = prof.key_averages()
    print(ka.table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=60))
    if device == "cuda":
        print(ka.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
