"""2:4 speed: dense vs torch's semi-structured sparse tensors for linear layers (GPU only).

    python -m bench.sparse24                           # LLaMA-7B shapes and SmolLM2 shapes
    python -m bench.sparse24 --model runs/x-2of4       # the linear layers of a saved 2:4 model

For each weight shape, fp16 and bf16, prefill (2048 tokens) and decode (1, 8, 32 tokens) inputs: median
time of ``F.linear`` with the dense weight and with ``to_sparse_semi_structured(W)``. Writes
bench/results/sparse24.json and .md. The honest expectation: speed-ups at prefill for large
matrices, often none (or a slowdown) at decode.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch.sparse import to_sparse_semi_structured

from prunekit.core.families import block_linears, weight_view

from bench.lib.env import environment
from bench.lib.models import load
from bench.lib.results import RESULTS, save_results
from bench.lib.tables import document, table
from bench.lib.timing import cuda_median_ms

SHAPES = {"llama7b q/o (4096x4096)": (4096, 4096), "llama7b gate/up (11008x4096)": (11008, 4096),
          "llama7b down (4096x11008)": (4096, 11008), "smollm2 gate/up (1536x576)": (1536, 576)}


def shapes_of_model(spec: str) -> dict:
    """The weight shapes of the first block's linear layers of a model."""
    model, _ = load(spec)
    out = {}
    for n, m in block_linears(model)[0].items():
        W = weight_view(m)
        out[n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] + f" ({W.shape[0]}x{W.shape[1]})"] = tuple(W.shape)
    return out


def markdown(data: dict) -> str:
    env = data["environment"]
    lines = ["# 2:4 semi-structured sparse vs dense linear layers", "", f"{env.get('gpu')}, torch {env['torch']}, "
             f"median of 50 CUDA-event timings. tokens = rows of the input (2048: prefill; 1-32: decode).", ""]
    rows = [[r["shape"], r["dtype"], r["tokens"], f"{r['dense_ms']:.4f}", f"{r['sparse_ms']:.4f}", f"{r['speedup']:.2f}x"]
            if r.get("dense_ms") else [r["shape"], r["dtype"], r.get("tokens", "-"), "-", "-", f"error: {r.get('error')}"]
            for r in data["rows"]]
    return document(lines + table(["weight", "dtype", "tokens", "dense ms", "2:4 ms", "speed-up"], rows))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--tokens", type=int, nargs="*", default=[2048, 1, 8, 32])
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.sparse24 needs a CUDA GPU (semi-structured sparse kernels); nothing measured on CPU")
        return 0
    shapes = shapes_of_model(a.model) if a.model else SHAPES
    rows = []
    for name, (o, i) in shapes.items():
        for dtype in (torch.float16, torch.bfloat16):
            W = torch.randn(o, i, device="cuda", dtype=dtype)
            mask = torch.tensor([0, 0, 1, 1], device="cuda", dtype=torch.bool).repeat(o, i // 4)
            W = W.masked_fill(~mask, 0)
            try:
                Ws = to_sparse_semi_structured(W)
            except Exception as e:  # unsupported shape or GPU
                rows.append({"shape": name, "dtype": str(dtype), "error": str(e)[:200]})
                continue
            for t in a.tokens:
                x = torch.randn(t, i, device="cuda", dtype=dtype)
                try:
                    dense = cuda_median_ms(lambda: F.linear(x, W))
                    sparse = cuda_median_ms(lambda: F.linear(x, Ws))
                    err = None
                except Exception as e:
                    dense = sparse = None
                    err = str(e)[:200]
                rows.append({"shape": name, "dtype": str(dtype).replace("torch.", ""), "tokens": t,
                             "dense_ms": dense, "sparse_ms": sparse,
                             "speedup": (dense / sparse) if dense and sparse else None, "error": err})
                print(rows[-1], flush=True)
    save_results(RESULTS / "sparse24.json", {"environment": environment(), "rows": rows}, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
