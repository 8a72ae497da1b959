"""Accuracy and speed of the Hessian product X^T X: float32 GEMM vs bf16 inputs with float32 output.

    python bench/hessian_gemm.py                 # GPU: 128 x 2048 tokens, d = 4096 and 11008 (LLaMA-7B widths)
    python bench/hessian_gemm.py --tokens 8192   # CPU: float32 path only (no out_dtype kernel on CPU)

Three paths on the same bf16 activations: the float32 GEMM, a bf16 x bf16 GEMM with float32 output
(``torch.mm(x.T, x, out_dtype=torch.float32)``) and ``prunekit.core.stats.gram`` (TF32 GEMMs on
float32 row chunks, result checked on its diagonal). Each is measured against a float64 product of those
inputs (relative Frobenius error, and the worst relative error on the diagonal) and timed. (The first GPU
run, 2026-11-29, had only the first two: gram() then used the out_dtype GEMM, whose 1.4e-3 error made
it switch to TF32.) Writes
bench/results/hessian_gemm.json (merged by key) and prints the rows.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, load_results, save_json, timed  # noqa: E402

from prunekit.core.stats import gram  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--dims", default="4096,11008")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    tokens = a.tokens or (128 * 2048 if cuda else 8192)
    g = torch.Generator(device=dev).manual_seed(0)
    rows = {}
    for d in (int(x) for x in a.dims.split(",")):
        # activation-like inputs: a few outlier features, bf16 as the model computes them
        scale = torch.ones(d, device=dev)
        scale[torch.randperm(d, generator=g, device=dev)[: d // 100]] = 20.0
        x = (torch.randn(tokens, d, generator=g, device=dev) * scale).to(torch.bfloat16)
        ref = x.double().t() @ x.double()
        paths = {"fp32 x fp32": lambda: x.float().t() @ x.float()}
        if cuda:
            paths["bf16 x bf16 -> fp32 (torch.mm out_dtype)"] = lambda: torch.mm(x.t(), x, out_dtype=torch.float32)
            paths["gram(): TF32 row chunks + diagonal check"] = lambda: gram(x)
        for name, fn in paths.items():
            h, s = timed(fn, cuda)
            err = float((h.double() - ref).norm() / ref.norm())
            diag = float(((h.diagonal().double() - ref.diagonal()).abs() / ref.diagonal()).max())
            flops = 2 * tokens * d * d
            rows[f"{dev}|{tokens}x{d}|{name}"] = {"device": dev, "tokens": tokens, "d": d, "path": name,
                                                   "seconds": round(s, 4), "tflops": round(flops / s / 1e12, 1),
                                                   "rel_err_fro": err, "max_rel_err_diag": diag}
            print(f"d={d} {name}: {s * 1e3:.1f} ms ({flops / s / 1e12:.1f} TFLOP/s), rel. error {err:.2e}, "
                  f"diag {diag:.2e}", flush=True)
            del h
        del x, ref
    out = RESULTS / "hessian_gemm.json"
    data = load_results(out)
    data.update(rows)
    data["environment" + ("_gpu" if cuda else "_cpu")] = environment()
    save_json(out, data)


if __name__ == "__main__":
    main()
