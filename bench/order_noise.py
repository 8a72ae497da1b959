"""How much of a protocol-S perplexity is float rounding? The same pipeline on the same 64 calibration windows,
fed in different orders (only the order of float summations changes), on SmolLM2.

Why: a change that only moves float rounding (a bit-level change in a solver, another summation order) can flip
near-tied mask entries and, compounded over the blocks, move a high-sparsity perplexity by more than a real
pipeline difference; this measures how much, so that such differences are read against it (NOTES.md has the
case that prompted it).

    python -m bench.order_noise --metric sparsegpt --sparsity 0.7 --orders 3
    python -m bench.order_noise --model stories260K --orders 2         # a quick check (mind the results file)
Writes bench/results/order_noise.json (merged by key) and .md.
"""
from __future__ import annotations

import argparse

import torch

from bench.lib.env import environment
from bench.lib.models import ProtocolModel
from bench.lib.protocols import PROTOCOLS
from bench.lib.results import RESULTS, load_results, save_results
from bench.lib.tables import document, table


def markdown(data: dict) -> str:
    lines = ["# Rounding noise: one pipeline, the same calibration windows in different orders (SmolLM2, protocol S)",
             "", "Order 0 is the protocol's; order k > 0 a seeded permutation of the same 64 windows. Only the order of "
             "floating-point summations differs between runs.", ""]
    rows = []
    for k, r in data.items():
        v = [r["ppl_by_order"][o] for o in sorted(r["ppl_by_order"], key=int)]
        rows.append([k, " / ".join(f"{x:.2f}" for x in v), f"{max(v) / min(v):.3f}"])
    return document(lines + table(["pipeline", "PPL per order", "max / min"], rows))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--metric", default="sparsegpt")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--orders", type=int, default=3, help="order 0 = the protocol's; k > 0: a seeded permutation")
    a = ap.parse_args(argv)
    proto = PROTOCOLS["S"]
    out = RESULTS / "order_noise.json"
    data = load_results(out)
    pm = ProtocolModel(a.model, proto)
    key = f"{a.metric}/{a.sparsity:.2f}"
    rec = data.setdefault(key, {"metric": a.metric, "sparsity": a.sparsity, "protocol": proto, "ppl_by_order": {}})
    for k in range(a.orders):
        if str(k) in rec["ppl_by_order"]:
            continue
        n = pm.calib.shape[0]
        perm = torch.arange(n) if k == 0 else torch.randperm(n, generator=torch.Generator().manual_seed(k))
        _, seconds = pm.prune({"metric": a.metric, "sparsity": a.sparsity}, calib_ids=pm.calib[perm])
        ppl = pm.evaluate()["ppl"]
        rec["ppl_by_order"][str(k)] = ppl
        print(key, "order", k, "ppl", round(ppl, 3), f"{seconds:.0f}s", flush=True)
        rec["environment"] = environment()
        save_results(out, data, markdown)


if __name__ == "__main__":
    main()
