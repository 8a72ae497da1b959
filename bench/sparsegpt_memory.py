"""Peak host memory of one SparseGPT layer solve, in units of the layer's (in, in) fp32 Hessian.

    python bench/sparsegpt_memory.py                       # LLaMA-7B down_proj shape: W 4096 x 11008
    python bench/sparsegpt_memory.py --out 512 --inp 1536  # small, quick

Runs the engine's path: a LayerStats holding the accumulated Hessian (as after calibration) and the
registered solver adapter ``get_metric('sparsegpt').solver``. Measures the process RSS high-water mark
(``ru_maxrss``) just before the solve and after it; the difference divided by the Hessian's size says how
many (in, in)-sized matrices the solver held at once (W-sized copies add a little). One solve per process
(the high-water mark never goes down), so compare versions by running this file once per checkout:
``PYTHONPATH=<checkout> python bench/sparsegpt_memory.py --label <name>``; results merge into
bench/results/sparsegpt_memory.json / .md.
"""
from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, load_results, save_json  # noqa: E402


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=int, default=4096)
    ap.add_argument("--inp", type=int, default=11008)
    ap.add_argument("--label", default="current")
    a = ap.parse_args(argv)
    import prunekit
    from prunekit.core.metric import get_metric
    from prunekit.core.stats import LayerStats

    g = torch.Generator().manual_seed(0)
    W = torch.randn(a.out, a.inp, generator=g)
    st = LayerStats(frozenset({"hessian"}), a.inp)
    X = torch.randn(256, a.inp, generator=g)
    st.update(X)  # a full-rank-ish Hessian would need >= inp tokens; damping makes this one positive-definite
    del X
    gc.collect()
    before = rss_mib()
    t = time.time()
    Wn, mask = get_metric("sparsegpt").solver(W, st, 0.5, None, None)
    seconds = time.time() - t
    peak = rss_mib()
    h_mib = a.inp * a.inp * 4 / 2**20
    w_mib = a.out * a.inp * 4 / 2**20
    row = {"label": a.label, "prunekit_file": prunekit.__file__, "shape": [a.out, a.inp],
           "rss_before_mib": round(before, 1), "rss_peak_mib": round(peak, 1),
           "solve_extra_mib": round(peak - before, 1), "hessian_mib": round(h_mib, 1), "weight_mib": round(w_mib, 1),
           "extra_in_hessians": round((peak - before) / h_mib, 2), "seconds": round(seconds, 1),
           "sparsity": float(mask.float().mean()), "environment": environment()}
    print(row)
    path = RESULTS / "sparsegpt_memory.json"
    data = load_results(path)
    data[f"{a.label} {a.out}x{a.inp}"] = row
    save_json(path, data)
    write_md(data)


def write_md(data: dict) -> None:
    lines = ["# SparseGPT: peak host memory of one layer solve", "",
             "Engine path (LayerStats with the accumulated Hessian, the registered solver adapter), CPU fp32, "
             "sparsity 0.5. 'extra' = RSS high-water mark after the solve minus before it; one solve per process. "
             "'git' is the checkout the benchmark ran from; 'prunekit' the package it imported (PYTHONPATH).", "",
             "| version | prunekit | W shape | Hessian MiB | W MiB | extra MiB | extra / Hessian | solve s | machine |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in data.values():
        env = r["environment"]
        lines.append(f"| {r['label']} (git {env.get('git', '?')}) | {Path(r['prunekit_file']).parent.parent} | {r['shape'][0]} x {r['shape'][1]} | {r['hessian_mib']} | "
                     f"{r['weight_mib']} | {r['solve_extra_mib']} | {r['extra_in_hessians']} | {r['seconds']} | "
                     f"{env['processor']}, {env['cpu_count']} CPUs, torch {env['torch']}, {env['date']} |")
    (RESULTS / "sparsegpt_memory.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
