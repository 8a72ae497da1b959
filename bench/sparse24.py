"""2:4 speed: dense vs torch's semi-structured sparse tensors for linear layers (GPU only).

    python -m bench.sparse24                           # LLaMA-7B shapes and SmolLM2 shapes
    python -m bench.sparse24 --model runs/x-2of4       # the linear layers of a saved 2:4 model
    python -m bench.sparse24 --e2e 2                   # also a whole model: 2 LLaMA-7B-shaped blocks, pruned 2:4,
                                                       # saved compressed, loaded with sparse_kernels=True
    python -m bench.sparse24 --graphs                  # also each call inside a CUDA graph (no host work)

For each weight shape, dtype and semi-structured backend (CUTLASS, cuSPARSELt), decode (1-32 tokens) and prefill
(2048 and more) inputs: median time of ``F.linear`` with the dense weight and with the 2:4 tensor. Writes
bench/results/sparse24.json and .md. The honest expectation: speed-ups at prefill for large matrices, often
none (or a slowdown) at decode; measured on an H200 (torch 2.11), eager calls lose everywhere below ~32k tokens.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.sparse import (SparseSemiStructuredTensor, SparseSemiStructuredTensorCUSPARSELT,
                          SparseSemiStructuredTensorCUTLASS)

import prunekit
from prunekit.core.families import block_linears, weight_view
from prunekit.pruning.compressed import load_pretrained

from bench.lib.env import environment
from bench.lib.models import load, random_llama
from bench.lib.results import RESULTS, save_results
from bench.lib.tables import document, table
from bench.lib.timing import cuda_graph_median_ms, cuda_median_ms, sync

BACKENDS = {"cutlass": SparseSemiStructuredTensorCUTLASS, "cusparselt": SparseSemiStructuredTensorCUSPARSELT}
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
    lines = ["# 2:4 semi-structured sparse vs dense linear layers", ""]
    if data.get("runs"):  # merged from several device calls
        lines += ["Merged from device calls: " + "; ".join(data["runs"]) + ".", ""]
    lines += [f"{env.get('gpu')}, torch {env['torch']}, median of 50 CUDA-event timings of one eager `F.linear` "
              "call (host-side work between the events counts, as it does for a user). tokens = rows of the input "
              "(1-32: decode; 2048 and more: prefill).", ""]
    rows = [[r["shape"], r["dtype"], r.get("backend", "-"), r["tokens"], f"{r['dense_ms']:.4f}",
             f"{r['sparse_ms']:.4f}", f"{r['speedup']:.2f}x"] if r.get("dense_ms") else
            [r["shape"], r["dtype"], r.get("backend", "-"), r.get("tokens", "-"), "-", "-", f"error: {r.get('error')}"]
            for r in data["rows"]]
    out = lines + table(["weight", "dtype", "kernels", "tokens", "dense ms", "2:4 ms", "speed-up"], rows)
    graphs = [r for r in data["rows"] if r.get("sparse_graph_ms") or r.get("graph_error")]
    if graphs:
        out += ["", "Inside a CUDA graph (10 calls captured, replayed; ms per call: the GPU's time alone):", ""]
        out += table(["weight", "dtype", "kernels", "tokens", "dense ms", "2:4 ms", "speed-up"],
                     [[r["shape"], r["dtype"], r["backend"], r["tokens"], f"{r['dense_graph_ms']:.4f}",
                       f"{r['sparse_graph_ms']:.4f}", f"{r['dense_graph_ms'] / r['sparse_graph_ms']:.2f}x"]
                      if r.get("sparse_graph_ms") else [r["shape"], r["dtype"], r["backend"], r["tokens"], "-", "-",
                                                        f"error: {r['graph_error']}"] for r in graphs])
    if data.get("model"):
        m = data["model"]
        out += ["", f"## A whole model: {m['model']}", "", "Pruned 2:4 (magnitude) by prunekit, saved with "
                "`--save-format compressed`, loaded by `prunekit.load_pretrained` with and without "
                f"`sparse_kernels=True` ({m.get('swapped', '-')} linears swapped). Max |logit difference| sparse "
                f"vs dense: {m.get('max_logit_diff', '-')}. Times: median of {m['reps']} runs, batch 1.", ""]
        out += table(["phase", "dense tokens/s", "2:4 tokens/s", "speed-up"],
                     [[ph, f"{r['dense_tok_s']:.1f}" if r.get("dense_tok_s") else "-",
                       f"{r['sparse_tok_s']:.1f}" if r.get("sparse_tok_s") else f"error: {r.get('error')}",
                       f"{r['sparse_tok_s'] / r['dense_tok_s']:.2f}x"
                       if r.get("sparse_tok_s") and r.get("dense_tok_s") else "-"]
                      for ph, r in m["phases"].items()])
    return document(out)


def _median_s(fn, device, reps: int) -> float:
    """Median wall seconds of ``fn`` over ``reps`` calls after one warm-up (GPU synchronised around each)."""
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def _phase_speeds(model, prefill: int, decode: int, reps: int) -> dict:
    """Tokens/s of one prefill of ``prefill`` tokens and of ``decode`` greedy steps after a 128-token prompt."""
    dev = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (1, prefill), generator=torch.Generator().manual_seed(0)).to(dev)

    def decode_steps():
        out = model(ids[:, :128], use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(decode):
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)

    prompt_s = _median_s(lambda: model(ids[:, :128]), dev, reps)
    out = {"prefill": prefill / _median_s(lambda: model(ids), dev, reps),
           "decode": decode / max(_median_s(decode_steps, dev, reps) - prompt_s, 1e-9)}
    if dev.type == "cuda":  # the whole prefill captured in one CUDA graph: no per-call host work
        try:
            out["prefill in a CUDA graph"] = prefill / (cuda_graph_median_ms(
                lambda: model(ids, use_cache=False), reps=reps, calls=1) / 1000)
        except Exception as e:
            print(f"prefill in a CUDA graph: {type(e).__name__}: {str(e)[:200]}", flush=True)
    return out


def model_speed(blocks: int, prefill: int = 2048, decode: int = 32, reps: int = 5) -> dict:
    """A LLaMA-7B-shaped random model (``blocks`` blocks, bf16) pruned 2:4 by magnitude, saved compressed and loaded
    back dense and with ``sparse_kernels=True``: the largest logit difference and prefill / decode tokens/s."""
    t0 = time.time()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = random_llama(blocks, torch.bfloat16).to(dev)  # pruned and probed where it runs
    report = prunekit.prune(model, None, {"metric": "magnitude", "pattern": "2:4"})
    print(f"[{time.time() - t0:.1f} s] built and pruned", flush=True)
    res = {"model": f"llama7b-random ({blocks} blocks, bf16)", "reps": reps, "phases": {}}
    with tempfile.TemporaryDirectory(prefix="sparse24-") as tmp:
        cfg = prunekit.make_config(metric="magnitude", pattern="2:4", save_format="compressed")
        prunekit.save_pruned(model, None, report, cfg, f"{tmp}/m")
        del model
        print(f"[{time.time() - t0:.1f} s] saved compressed", flush=True)
        dense = load_pretrained(f"{tmp}/m").to(dev)
        speeds = _phase_speeds(dense, prefill, decode, reps)
        print(f"[{time.time() - t0:.1f} s] dense timed: {speeds}", flush=True)
        ids = torch.randint(0, dense.config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = dense(ids.to(dev)).logits.float().cpu()
        del dense
        for ph, v in speeds.items():
            res["phases"][ph] = {"dense_tok_s": v}
        try:
            sparse = load_pretrained(f"{tmp}/m", sparse_kernels=True)
            print(f"[{time.time() - t0:.1f} s] loaded with sparse kernels", flush=True)
            res["swapped"] = sum(1 for m in sparse.modules() if isinstance(m, torch.nn.Linear)
                                 and isinstance(m.weight.data, SparseSemiStructuredTensor))
            with torch.no_grad():
                got = sparse(ids.to(dev)).logits.float().cpu()
            res["max_logit_diff"] = float((got - ref).abs().max())
            for ph, v in _phase_speeds(sparse, prefill, decode, reps).items():
                res["phases"].setdefault(ph, {})["sparse_tok_s"] = v
        except Exception as e:  # no GPU, or kernels missing in this torch build
            res["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            for r in res["phases"].values():
                r["error"] = res["error"][:80]
    print(res, flush=True)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--tokens", type=int, nargs="*", default=[2048, 1, 8, 32])
    ap.add_argument("--dtypes", nargs="*", default=["float16", "bfloat16"])
    ap.add_argument("--backends", nargs="*", default=["cutlass", "cusparselt"], choices=sorted(BACKENDS))
    ap.add_argument("--graphs", action="store_true",
                    help="also time each call inside a CUDA graph (no per-call host work)")
    ap.add_argument("--e2e", type=int, default=0, metavar="BLOCKS",
                    help="also time a whole model of BLOCKS LLaMA-7B-shaped blocks, dense vs sparse_kernels=True")
    ap.add_argument("--cpu-dry-run", action="store_true", help="run --e2e's dense path on the CPU (a script check)")
    a = ap.parse_args(argv)
    if a.cpu_dry_run:
        print(model_speed(a.e2e or 1, prefill=64, decode=4, reps=1))
        return 0
    if not torch.cuda.is_available():
        print("bench.sparse24 needs a CUDA GPU (semi-structured sparse kernels); nothing measured on CPU")
        return 0
    shapes = shapes_of_model(a.model) if a.model else SHAPES
    rows = []
    dtypes = [getattr(torch, d) for d in a.dtypes]
    for name, (o, i) in shapes.items():
        for dtype in dtypes:
            W = torch.randn(o, i, device="cuda", dtype=dtype)
            mask = torch.tensor([0, 0, 1, 1], device="cuda", dtype=torch.bool).repeat(o, i // 4)
            W = W.masked_fill(~mask, 0)
            for backend in a.backends:
                try:
                    Ws = BACKENDS[backend].from_dense(W)
                except Exception as e:  # unsupported shape, GPU or backend
                    rows.append({"shape": name, "dtype": str(dtype).replace("torch.", ""), "backend": backend,
                                 "error": str(e)[:200]})
                    print(rows[-1], flush=True)
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
                    row = {"shape": name, "dtype": str(dtype).replace("torch.", ""), "backend": backend,
                           "tokens": t, "dense_ms": dense, "sparse_ms": sparse,
                           "speedup": (dense / sparse) if dense and sparse else None, "error": err}
                    if a.graphs and dense and sparse:
                        try:
                            row["dense_graph_ms"] = cuda_graph_median_ms(lambda: F.linear(x, W))
                            row["sparse_graph_ms"] = cuda_graph_median_ms(lambda: F.linear(x, Ws))
                        except Exception as e:  # a kernel that cannot be captured
                            row["graph_error"] = f"{type(e).__name__}: {str(e)[:150]}"
                    rows.append(row)
                    print(rows[-1], flush=True)
    data = {"environment": environment(), "rows": rows}
    save_results(RESULTS / "sparse24.json", data, markdown)  # kept if the whole-model run below is cut short
    if a.e2e:
        data["model"] = model_speed(a.e2e)
        save_results(RESULTS / "sparse24.json", data, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
