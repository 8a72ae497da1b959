"""Accuracy and speed of the Hessian product X^T X: float32 GEMM vs bf16 inputs with float32 output.

    python -m bench.hessian_gemm                 # GPU: 128 x 2048 tokens, d = 4096 and 11008 (LLaMA-7B widths)
    python -m bench.hessian_gemm --tokens 8192   # CPU: float32 path only (no out_dtype kernel on CPU)
    python -m bench.hessian_gemm --tokens 256 --dims 64          # a quick check

Three paths on the same bf16 activations: the float32 GEMM, a bf16 x bf16 GEMM with float32 output
(``torch.mm(x.T, x, out_dtype=torch.float32)``) and ``prunekit.core.stats.gram`` (TF32 GEMMs on
float32 row chunks, result checked on its diagonal). Each is measured against a float64 product of those
inputs (relative Frobenius error, and the worst relative error on the diagonal) and timed. Writes
bench/results/hessian_gemm.json (merged by key) and prints the rows.
"""
from __future__ import annotations

import argparse

import torch

from prunekit.core.stats import gram

from bench.lib.env import per_device
from bench.lib.results import RESULTS, merge_results
from bench.lib.timing import timed


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
    merge_results(RESULTS / "hessian_gemm.json", {**rows, **per_device(dev)})


if __name__ == "__main__":
    main()
