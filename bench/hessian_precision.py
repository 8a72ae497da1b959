"""Does SparseGPT care whether its Hessian is float32-exact or rounded to bf16?

A fast GPU product of bf16 activations (``torch.mm(x.T, x, out_dtype=torch.float32)``) can be as far from
float64 as a rounding to bf16 (bench.hessian_gemm measures it). This benchmark runs SparseGPT on SmolLM2
(protocol S, CPU) twice per sparsity: with
the float32 Hessian, and with every X^T X product rounded to bf16 (what the GPU measurement looks like),
and reports the perplexities and the relative error of the rounded Hessian.

    python -m bench.hessian_precision                 # 50% and 70%, protocol S
    python -m bench.hessian_precision --model stories260K --sparsity 0.5   # a quick check (mind the results file)
Writes bench/results/hessian_precision.json and .md; runs already there are skipped unless --redo.
"""
from __future__ import annotations

import argparse

import torch

from prunekit.core import stats as stats_mod

from bench.lib.env import describe as machine_line
from bench.lib.env import environment
from bench.lib.models import ProtocolModel
from bench.lib.protocols import PROTOCOLS
from bench.lib.results import RESULTS, Runs
from bench.lib.tables import document, table

EXACT = stats_mod.gram
ERRORS: list[float] = []


def gram_bf16_rounded(x: torch.Tensor) -> torch.Tensor:
    h = EXACT(x)
    r = h.to(torch.bfloat16).float()
    ERRORS.append(float((r.double() - h.double()).norm() / h.double().norm()))
    return r


def markdown(data: dict) -> str:
    lines = ["# SparseGPT with a float32 vs a bf16-rounded Hessian (SmolLM2, protocol S, CPU)", "",
             "Why: on an H200 the bf16 x bf16 -> float32 GEMM (`torch.mm(..., out_dtype=torch.float32)`, torch 2.11) "
             "gave X^T X with a relative error of 1.4e-3 against float64 (float32 GEMM: 5e-5 to 8e-5; "
             "hessian_gemm.json). Here each layer's X^T X is rounded to bf16 before SparseGPT uses it.", "",
             f"Machine: {machine_line(data['environment'])}.", ""]
    rows = [[f"{r['sparsity']:.2f}", r["hessian"], f"{r['ppl']:.3f}",
             f"{r['hessian_rel_err_median']:.2e} / {r['hessian_rel_err_max']:.2e}" if "hessian_rel_err_median" in r
             else "-"] for r in data["runs"].values()]
    return document(lines + table(["sparsity", "Hessian", "WikiText-2 PPL (64 x 512)",
                                   "median / max rel. error of H"], rows))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sparsity", default="0.5,0.7")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--redo", action="store_true")
    a = ap.parse_args(argv)
    proto = PROTOCOLS["S"]
    file = Runs(RESULTS / "hessian_precision.json", {"protocol": proto}, a.redo, markdown)
    file.data["environment"] = environment()
    pm = ProtocolModel(a.model, proto)
    for s in (float(x) for x in a.sparsity.split(",")):
        for arm, fn in (("float32", EXACT), ("bf16-rounded", gram_bf16_rounded)):
            key = f"sparsegpt/{s:.2f}/{arm}"
            if not file.todo(key):
                continue
            ERRORS.clear()
            stats_mod.gram = fn
            try:
                _, seconds = pm.prune({"metric": "sparsegpt", "sparsity": s})
            finally:
                stats_mod.gram = EXACT
            rec = {"sparsity": s, "hessian": arm, "ppl": pm.evaluate()["ppl"], "prune_s": round(seconds, 1)}
            if ERRORS:
                rec["hessian_rel_err_median"] = sorted(ERRORS)[len(ERRORS) // 2]
                rec["hessian_rel_err_max"] = max(ERRORS)
            print(key, rec, flush=True)
            file.add(key, rec)
    file.save()


if __name__ == "__main__":
    main()
