"""Peak host memory of one layer solve (SparseGPT, or another solver: ``--solver admm|alps``), in units of the
layer's (in, in) fp32 Hessian.

    python -m bench.sparsegpt_memory                       # LLaMA-7B down_proj shape: W 4096 x 11008
    python -m bench.sparsegpt_memory --out 512 --inp 1536  # small, quick
    python -m bench.sparsegpt_memory --solver admm --fixed-mask --out 1024 --inp 4096   # --reconstruct admm

Runs the engine's path: a LayerStats holding the accumulated Hessian (as after calibration) and the
registered solver adapter ``get_metric(solver).solver`` (with ``--fixed-mask``: on a given 50% magnitude mask, as
``--reconstruct`` runs it). Measures the process RSS high-water mark
(VmHWM, reset to the current RSS just before the solve on Linux) before the solve and after it; the difference
divided by the Hessian's size says how many (in, in)-sized matrices the solver held at once (W-sized copies add a
little). One solve per process (a solver's first call also pays one-off allocations), so compare versions by
running this file once per checkout:
``PYTHONPATH=<checkout>:. python -P -m bench.sparsegpt_memory --label <name>`` (``-P``: the current folder does
not go first on the path, so the other checkout's prunekit is the one imported); results merge into
bench/results/sparsegpt_memory.json / .md.
"""
from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch

import prunekit
import prunekit.methods  # noqa: F401  (registers every method: get_metric below needs SparseGPT's)
from prunekit.core.metric import get_metric
from prunekit.core.stats import LayerStats

from bench.lib.env import describe as machine_line
from bench.lib.env import environment
from bench.lib.results import RESULTS, merge_results
from bench.lib.tables import document, table
from bench.lib.timing import peak_rss_gib, reset_peak_rss


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=int, default=4096)
    ap.add_argument("--inp", type=int, default=11008)
    ap.add_argument("--label", default="current")
    ap.add_argument("--solver", default="sparsegpt", help="a registered solver metric: sparsegpt, admm, alps")
    ap.add_argument("--fixed-mask", action="store_true", help="solve on a given mask (what --reconstruct runs)")
    ap.add_argument("--mmap", action="store_true", help="glibc serves every allocation over 128 KiB by mmap and "
                    "unmaps it on free: the high-water mark is then the solver's live bytes, without heap reuse "
                    "and fragmentation (which make the default numbers vary by about a Hessian on small shapes)")
    a = ap.parse_args(argv)
    if a.mmap:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD (fixed: no dynamic adjustment)
    g = torch.Generator().manual_seed(0)
    W = torch.randn(a.out, a.inp, generator=g)
    st = LayerStats(frozenset({"hessian"}), a.inp)
    X = torch.randn(256, a.inp, generator=g)
    st.update(X)  # a full-rank-ish Hessian would need >= inp tokens; damping makes this one positive-definite
    del X
    gc.collect()
    given = (W.abs() <= W.abs().median()) if a.fixed_mask else None
    reset_peak_rss()  # the mask's temporaries above must not raise the mark the solve is measured from
    before = peak_rss_gib() * 1024
    t = time.time()
    Wn, mask = get_metric(a.solver).solver(W, st, 0.5, None, given)
    seconds = time.time() - t
    peak = peak_rss_gib() * 1024
    h_mib = a.inp * a.inp * 4 / 2**20
    w_mib = a.out * a.inp * 4 / 2**20
    solver = a.solver + (" (fixed mask)" if a.fixed_mask else "") + (" mmap" if a.mmap else "")
    row = {"label": a.label, "solver": solver,
           "prunekit_file": prunekit.__file__, "shape": [a.out, a.inp],
           "rss_before_mib": round(before, 1), "rss_peak_mib": round(peak, 1),
           "solve_extra_mib": round(peak - before, 1), "hessian_mib": round(h_mib, 1), "weight_mib": round(w_mib, 1),
           "extra_in_hessians": round((peak - before) / h_mib, 2), "seconds": round(seconds, 1),
           "sparsity": float(mask.float().mean()), "environment": environment()}
    print(row)
    key = f"{a.label} {a.out}x{a.inp}" + ("" if a.solver == "sparsegpt" and not (a.fixed_mask or a.mmap)
                                         else f" {row['solver']}")
    merge_results(RESULTS / "sparsegpt_memory.json", {key: row}, markdown)


def markdown(data: dict) -> str:
    lines = ["# Solvers (SparseGPT, ADMM, ALPS): peak host memory of one layer solve", "",
             "Engine path (LayerStats with the accumulated Hessian, the registered solver adapter), CPU fp32, "
             "sparsity 0.5. 'extra' = RSS high-water mark after the solve minus before it; one solve per process. "
             "'prunekit' is the checkout whose package the benchmark imported (PYTHONPATH), 'git' its commit. "
             "'fixed mask': the solver given a 50% magnitude mask (what --reconstruct runs). 'mmap': glibc maps every "
             "allocation over 128 KiB and unmaps it on free (--mmap), so 'extra' is the solver's live bytes; without it "
             "heap reuse and fragmentation move small shapes by about a Hessian between runs.", ""]
    rows = [[f"{r['label']} (git {r['environment'].get('git', '?')})", r.get("solver", "sparsegpt"),
             Path(r["prunekit_file"]).parent.parent, f"{r['shape'][0]} x {r['shape'][1]}", r["hessian_mib"],
             r["weight_mib"], r["solve_extra_mib"], r["extra_in_hessians"], r["seconds"], machine_line(r["environment"])]
            for r in data.values()]
    return document(lines + table(["version", "solver", "prunekit", "W shape", "Hessian MiB", "W MiB", "extra MiB",
                                   "extra / Hessian", "solve s", "machine"], rows))


if __name__ == "__main__":
    main()
