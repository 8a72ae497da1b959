"""Does SparseGPT care whether its Hessian is float32-exact or rounded to bf16?

On an H200 (bench/results/hessian_gemm.json), ``torch.mm(x.T, x, out_dtype=torch.float32)`` on bf16 inputs
came out with a relative error of 1.4e-3 against float64, the size of a rounding to bf16, while the float32
GEMM had 5e-5 to 8e-5. This benchmark runs SparseGPT on SmolLM2 (protocol S, CPU) twice per sparsity: with
the float32 Hessian, and with every X^T X product rounded to bf16 (what the GPU measurement looks like),
and reports the perplexities and the relative error of the rounded Hessian.

    python bench/hessian_precision.py                 # 50% and 70%, protocol S
Writes bench/results/hessian_precision.json and .md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PROTOCOLS, RESULTS, environment, load_results, save_json  # noqa: E402

import prunekit  # noqa: E402
from prunekit.core.data import calibration_windows  # noqa: E402
from prunekit.evaluate.perplexity import eval_token_ids, perplexity  # noqa: E402
from prunekit.core import stats as stats_mod  # noqa: E402

EXACT = stats_mod.gram
ERRORS: list[float] = []


def gram_bf16_rounded(x: torch.Tensor) -> torch.Tensor:
    h = EXACT(x)
    r = h.to(torch.bfloat16).float()
    ERRORS.append(float((r.double() - h.double()).norm() / h.double().norm()))
    return r


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsity", default="0.5,0.7")
    ap.add_argument("--model", default="smollm2")
    a = ap.parse_args(argv)
    proto = PROTOCOLS["S"]
    out = RESULTS / "hessian_precision.json"
    data = load_results(out)
    data.update({"protocol": proto, "environment": environment()})
    runs = data.setdefault("runs", {})
    model, tok = prunekit.load_model(a.model)
    dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    seqlen = proto["seqlen"]
    eval_ids = eval_token_ids(tok, "wikitext2", seqlen)
    calib = calibration_windows(tok, proto["calib"], proto["nsamples"], seqlen, proto["seed"])
    for s in (float(x) for x in a.sparsity.split(",")):
        for arm, fn in (("float32", EXACT), ("bf16-rounded", gram_bf16_rounded)):
            key = f"sparsegpt/{s:.2f}/{arm}"
            if key in runs:
                continue
            model.load_state_dict(dense)
            ERRORS.clear()
            stats_mod.gram = fn
            t = time.time()
            try:
                prunekit.prune(model, tok, {"metric": "sparsegpt", "sparsity": s, "seqlen": seqlen, "device": "cpu",
                                            "nsamples": proto["nsamples"], "calib": proto["calib"], "seed": proto["seed"]},
                               calib_ids=calib)
            finally:
                stats_mod.gram = EXACT
            ev = perplexity(model, tok, "wikitext2", seqlen, proto["eval_windows"], "cpu", batch_size=4, ids=eval_ids)
            runs[key] = {"sparsity": s, "hessian": arm, "ppl": ev["ppl"], "prune_s": round(time.time() - t, 1)}
            if ERRORS:
                runs[key]["hessian_rel_err_median"] = sorted(ERRORS)[len(ERRORS) // 2]
                runs[key]["hessian_rel_err_max"] = max(ERRORS)
            print(key, runs[key], flush=True)
            save_json(out, data)
    lines = ["# SparseGPT with a float32 vs a bf16-rounded Hessian (SmolLM2, protocol S, CPU)", "",
             "Why: on an H200 the bf16 x bf16 -> float32 GEMM (`torch.mm(..., out_dtype=torch.float32)`, torch 2.11) "
             "gave X^T X with a relative error of 1.4e-3 against float64 (float32 GEMM: 5e-5 to 8e-5; "
             "hessian_gemm.json). Here each layer's X^T X is rounded to bf16 before SparseGPT uses it.", "",
             f"Machine: {data['environment']['processor']}, {data['environment']['cpu_count']} CPUs, torch "
             f"{data['environment']['torch']}, prunekit {data['environment'].get('git', '?')}, {data['environment']['date']}.", "",
             "| sparsity | Hessian | WikiText-2 PPL (64 x 512) | median / max rel. error of H |", "|---|---|---|---|"]
    for r in runs.values():
        err = (f"{r['hessian_rel_err_median']:.2e} / {r['hessian_rel_err_max']:.2e}"
               if "hessian_rel_err_median" in r else "-")
        lines.append(f"| {r['sparsity']:.2f} | {r['hessian']} | {r['ppl']:.3f} | {err} |")
    (RESULTS / "hessian_precision.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
