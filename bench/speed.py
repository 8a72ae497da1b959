"""Speed and memory benchmark of a prune.

    python bench/speed.py                       # SmolLM2, Wanda 50%, protocol S (64 x 512), CPU
    python bench/speed.py --model llama7b-random --device cuda      # 7B-shaped random LLaMA, 128 x 2048
    python bench/speed.py --model llama7b-random --blocks 2 --nsamples 4 --seqlen 256   # same path, small, CPU

Reports wall time of ``prunekit.prune`` (model already loaded), peak memory (RSS on CPU,
``torch.cuda.max_memory_allocated`` on GPU), and, on GPU, the floor of 2 x params x calibration tokens
FLOPs at the GPU's dense bf16 peak. Writes bench/results/speed.json (merged by key) and speed.md.
"""
from __future__ import annotations

import argparse
import contextlib
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, load_results, save_json  # noqa: E402

import prunekit  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM datasheets


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def random_llama(blocks: int, dtype, hidden=4096, mlp=11008, heads=32, vocab=32000):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=blocks, num_attention_heads=heads,
                      num_key_value_heads=heads, vocab_size=vocab, max_position_embeddings=4096)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model = model.to_empty(device="cpu")
    # drawn on the GPU when there is one (7B normals on one CPU thread take minutes), then copied to the CPU
    gen_dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=gen_dev).manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.fill_(1.0)
            else:
                p.copy_((torch.randn(p.shape, generator=g, dtype=torch.float32, device=gen_dev) * 0.02).to(dtype))
    model.model.rotary_emb.__init__(cfg)  # buffers were left empty by to_empty
    model.eval()
    return model


# (hidden, intermediate, kv width, blocks, vocab) of the shapes projected on paper
LLAMA_SHAPES = {"7b": ("7B (LLaMA-2-7B shape)", (4096, 11008, 4096, 32, 32000)),
                "70b": ("70B (LLaMA-2-70B shape, GQA 8 KV heads)", (8192, 28672, 1024, 80, 32000))}


def projection(hidden, inter, kv, blocks, vocab, tokens, gpu_gib=80.0, dtype_bytes=2) -> dict:
    """On-paper GPU peak of prunekit's engine for a LLaMA shape: one block's weights, the activations of
    the largest calibration batch that fits in 40% of the GPU (prunekit's auto batch size), the non-block
    modules (embeddings, lm_head) during capture, and the fp32 statistics of one layer (Wanda: a vector;
    SparseGPT: a d x d Hessian). While SparseGPT solves the largest layer it holds four d x d fp32 matrices
    (the accumulated Hessian, its damped working copy, the Cholesky factor and the inverse) and two fp32
    copies of the weight: measured on CPU, bench/results/sparsegpt_memory.md (5.1 Hessians of extra RSS
    for 4096 x 11008, with the weight copies). Hidden states of all samples live in pinned CPU memory."""
    block = (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter) * dtype_bytes
    per_token = (10 * hidden + 4 * inter) * dtype_bytes
    act_budget = 0.4 * gpu_gib * 2**30
    act = min(tokens * per_token, act_budget)
    non_block = 2 * vocab * hidden * dtype_bytes
    hessian = max(hidden, inter) ** 2 * 4
    solve = 4 * hessian + 2 * hidden * inter * 4
    return {"block_gib": round(block / 2**30, 2), "activations_gib": round(act / 2**30, 2),
            "non_block_gib": round(non_block / 2**30, 2), "sparsegpt_hessian_gib": round(hessian / 2**30, 2),
            "peak_wanda_gib": round((block + act + non_block) / 2**30, 1),
            "sparsegpt_solve_gib": round(solve / 2**30, 2),
            "peak_sparsegpt_gib": round((block + act + non_block + solve) / 2**30, 1),
            "cpu_hidden_states_gib": round(tokens * hidden * dtype_bytes / 2**30, 1),
            "cpu_weights_gib": round((blocks * block + non_block) / 2**30, 1)}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", help="smollm2 | llama7b-random | any model spec")
    ap.add_argument("--metric", default="wanda", help="one metric or a comma-separated list (one process)")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--nsamples", type=int)
    ap.add_argument("--seqlen", type=int)
    ap.add_argument("--blocks", type=int, default=32, help="for llama7b-random")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--phases", default="", help="comma-separated metrics that get one more, instrumented run "
                    "(time per phase), right after their plain run")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and a.device != "cpu"
    device = "cuda" if cuda else "cpu"
    big = a.model == "llama7b-random"
    nsamples = a.nsamples or (128 if big else 64)
    seqlen = a.seqlen or (2048 if big else 512)
    t = time.time()
    if big:
        dtype = getattr(torch, a.dtype or ("bfloat16" if cuda else "float32"))
        model, tok = random_llama(a.blocks, dtype), None
        calib = torch.randint(0, 32000, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    else:
        model, tok = prunekit.load_model(a.model, a.dtype or "auto")
        from prunekit.core.data import calibration_windows

        calib = calibration_windows(tok, "c4", nsamples, seqlen, 0)
    load_s = time.time() - t
    params = sum(p.numel() for p in model.parameters())
    block_params = sum(p.numel() for p in prunekit.core.families.get_blocks(model).parameters())
    rss_before = rss_gib()
    metrics = a.metric.split(",")
    phased = [m for m in a.phases.split(",") if m]
    runs = [(m, instr) for m in metrics for instr in ((False, True) if m in phased else (False,))]
    dense = {k: v.clone() for k, v in model.state_dict().items()} if len(runs) > 1 else None
    for metric, instrumented in runs:
        if dense is not None:
            model.load_state_dict(dense)  # every run starts from the dense weights
        times, phases = [], {}
        for _ in range(1 if instrumented else a.repeat):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                torch.cuda.synchronize()
            with timed_phases(phases, cuda, instrumented):
                t = time.time()
                report = prunekit.prune(model, tok, {"metric": metric, "sparsity": a.sparsity, "device": device,
                                                     "nsamples": nsamples, "seqlen": seqlen}, calib_ids=calib)
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.time() - t)
        if instrumented:
            record_phases(a, big, metric, device, nsamples, seqlen, times[0], phases)
        else:
            record(a, big, metric, cuda, device, model, nsamples, seqlen, params, block_params, load_s, times,
                   rss_before, report, dense is not None)


# since edae39d the engine's SparseGPT adapter factors H^-1 (factor_hessian, once per shared Hessian) before
# it calls sparsegpt_solve with the factor, so the two are separate phases; records made before that commit
# carry "SparseGPT solve (Cholesky + sweep)" with the Cholesky nested inside it; records made before session 10
# carry "SparseGPT factor of H^-1 (Cholesky, inverse, Cholesky)", the textbook chain then used
PHASES = (("prunekit.core.stats", "gram", "statistics: X^T X (Hessian)"),
          ("prunekit.methods.sparsegpt", "factor_hessian",
           "SparseGPT factor of H^-1 (reversed Cholesky, triangular inverse)"),
          ("prunekit.methods.sparsegpt", "sparsegpt_solve", "SparseGPT column sweep"),
          ("prunekit.pruning.layer_pruner", "pack_mask", "mask packing"))


@contextlib.contextmanager
def timed_phases(acc: dict, cuda: bool, on: bool):
    """Time the engine's phases by wrapping their functions (a GPU sync before and after each call, so
    an instrumented run is a little slower than a plain one; the remainder is the forward passes,
    block transfers and the rest). Each phase's time is exclusive: a wrapped call made inside another
    (the SparseGPT factor is computed lazily inside ``sparsegpt_solve``) counts for its own phase only."""
    if not on:
        yield
        return
    import importlib

    saved, inner = [], []  # inner: per open wrapped call, the time spent in wrapped calls nested in it
    for mod_name, fn_name, label in PHASES:
        mod = importlib.import_module(mod_name)
        fn = getattr(mod, fn_name)

        def wrapped(*args, _fn=fn, _label=label, **kw):
            if cuda:
                torch.cuda.synchronize()
            inner.append(0.0)
            t = time.time()
            try:
                out = _fn(*args, **kw)
                if cuda:
                    torch.cuda.synchronize()
            finally:
                dt = time.time() - t
                nested = inner.pop()
                acc[_label] = acc.get(_label, 0.0) + dt - nested
                if inner:
                    inner[-1] += dt
            return out
        saved.append((mod, fn_name, fn))
        setattr(mod, fn_name, wrapped)
    try:
        yield
    finally:
        for mod, fn_name, fn in saved:
            setattr(mod, fn_name, fn)


def model_label(a, big: bool) -> str:
    return a.model + (f" ({a.blocks} blocks)" if big else "")


def run_key(a, big: bool, metric: str, device: str, nsamples: int, seqlen: int) -> str:
    """One run's key in speed.json (the plain run's record; an instrumented run adds its phases to it)."""
    return f"{model_label(a, big)}|{metric}|{a.sparsity}|{device}|{nsamples}x{seqlen}"


def record_phases(a, big, metric, device, nsamples, seqlen, total, phases) -> None:
    out = RESULTS / "speed.json"
    data = load_results(out)
    key = run_key(a, big, metric, device, nsamples, seqlen)
    if key in data:
        data[key]["phases_s"] = {"instrumented_total": round(total, 2), **{k: round(v, 2) for k, v in phases.items()},
                                 "rest (forward passes, block transfers, masks, bookkeeping)":
                                     round(total - sum(v for k, v in phases.items() if not k.startswith(" ")), 2)}
        save_json(out, data)
        write_markdown(data)
    print(key, "phases", phases, "total", round(total, 2))


def record(a, big, metric, cuda, device, model, nsamples, seqlen, params, block_params, load_s, times, rss_before,
           report, dense_kept: bool) -> None:
    res = {"model": model_label(a, big), "metric": metric,
           "sparsity": a.sparsity, "device": device, "dtype": str(next(model.parameters()).dtype),
           "nsamples": nsamples, "seqlen": seqlen, "calibration_tokens": nsamples * seqlen,
           "params": params, "block_params": block_params, "load_s": round(load_s, 2),
           "prune_s": round(min(times), 2), "prune_s_all": [round(x, 2) for x in times],
           "peak_rss_gib": round(rss_gib(), 2), "rss_before_prune_gib": round(rss_before, 2),
           "overall_sparsity": report["overall_sparsity"], "engine": "sequential, one batch per block",
           "dense_copy_in_rss": dense_kept}  # a copy of the dense weights, kept to restore them between runs
    if "sparsegpt" in metric:
        from prunekit.methods.sparsegpt import sweep_method

        res["sparsegpt_sweep"] = sweep_method(device)  # how each 128-column block is solved
    if cuda and "sparsegpt" in metric:
        from prunekit.core import stats as stats_mod

        low = res["dtype"] in ("torch.bfloat16", "torch.float16")
        res["hessian_gemm"] = ("fp32 x fp32" if not low else "TF32 row chunks, diagonal-checked"
                               if not stats_mod.FAST_GRAM_FAILED else
                               f"fp32 x fp32 (TF32 failed its check: {stats_mod.FAST_GRAM_FAILED[0]:.2e})")
    if cuda:
        name = torch.cuda.get_device_name(0)
        res["gpu"] = name
        res["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        if peak:
            floor = 2 * block_params * nsamples * seqlen / (peak * 1e12)
            res["flops_floor_s"] = round(floor, 2)
            res["x_floor"] = round(min(times) / floor, 2)
            res["peak_tflops_assumed"] = peak
        one_block = block_params / len(prunekit.core.families.get_blocks(model)) * model.dtype.itemsize
        res["one_block_gib"] = round(one_block / 2**30, 3)
        res["hidden_states_gib"] = round(nsamples * seqlen * model.config.hidden_size * model.dtype.itemsize / 2**30, 2)
    if big:  # the same formula on paper for 7B (checked against the measurement when a GPU is lent) and 70B
        tokens = nsamples * seqlen
        for key, (_, shape) in LLAMA_SHAPES.items():
            res[f"projection_{key}"] = projection(*shape, tokens)
    res["environment"] = environment()
    key = run_key(a, big, metric, device, nsamples, seqlen)
    out = RESULTS / "speed.json"
    data = load_results(out)
    data[key] = res
    save_json(out, data)
    write_markdown(data)
    print(res)


def write_markdown(data: dict) -> None:
    lines = ["# Speed benchmark", "", "Wall time of `prunekit.prune` with the model already loaded (min over repeats); "
             "peak RSS is the process high-water mark (model included).", "",
             "| model | metric | device | calibration | prune s | peak RSS GiB | peak GPU GiB | x FLOPs floor | machine |",
             "|---|---|---|---|---|---|---|---|---|"]
    for k, r in data.items():
        lines.append(f"| {r['model']} | {r['metric']} {r['sparsity']} | {r['device']} | {r['nsamples']} x {r['seqlen']} | "
                     f"{r['prune_s']} | {r['peak_rss_gib']} | {r.get('peak_gpu_gib', '-')} | {r.get('x_floor', '-')} | "
                     f"{r['environment'].get('gpu', r['environment']['processor'])}, {r['environment']['cpu_count']} CPUs, "
                     f"torch {r['environment']['torch']} |")
    for k, r in data.items():
        if "phases_s" in r:
            lines += ["", f"Phases of `{k}` (a second, instrumented run: GPU synchronised around each phase):", ""]
            lines += [f"- {name.strip()}{' (inside the solve)' if name.startswith(' ') else ''}: {v} s"
                      for name, v in r["phases_s"].items()]
    (RESULTS / "speed.md").write_text("\n".join(lines) + "\n")
    write_scale(data)


def gpu_check(data: dict) -> str:
    """The projection next to what a GPU run of the 7B shape measured (if one was)."""
    got = [r for r in data.values() if r["device"] == "cuda" and r["model"] == "llama7b-random (32 blocks)"]
    if not got:
        return "Not yet checked against a GPU measurement."
    p = projection(*LLAMA_SHAPES["7b"][1], 128 * 2048)
    meas = "; ".join(f"{r['metric']} {r['peak_gpu_gib']} GiB (projected {p['peak_' + r['metric'] + '_gib']})"
                     for r in got if f"peak_{r['metric']}_gib" in p)
    return (f"Measured on {got[0].get('gpu', 'a GPU')} (LLaMA-7B shape, 128 x 2048, bf16): {meas}. The projection's "
            "activation term is the 40% batch budget, an upper bound; Wanda measured above it because its feature "
            "norms take float32 copies of each layer's input (the down_proj input of 262k tokens: 2 x 11.5 GB), "
            "which the projection leaves out.")


def write_scale(data: dict) -> None:
    """bench/results/scale.md: measured peaks (CPU RSS, GPU when lent) and the on-paper GPU peak for 7B and
    70B LLaMA shapes at protocol P (128 x 2048 calibration tokens, bf16, 80 GiB GPU)."""
    lines = ["# Scale: memory peaks and the 7B / 70B projection", "",
             "## Measured", "",
             "Peak RSS is the process high-water mark (model, calibration hidden states and statistics included); "
             "peak GPU is `torch.cuda.max_memory_allocated`.", "",
             "| model | params | metric | device | calibration | prune s | peak RSS GiB | peak GPU GiB | machine |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in data.values():
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.0f} M | {r['metric']} {r['sparsity']} | {r['device']} | "
                     f"{r['nsamples']} x {r['seqlen']} | {r['prune_s']} | {r['peak_rss_gib']} | "
                     f"{r.get('peak_gpu_gib', '-')} | {r['environment'].get('gpu', r['environment']['processor'])}, "
                     f"{r['environment']['cpu_count']} CPUs, {r['environment']['date']} |")
    tokens = 128 * 2048
    lines += ["", "## On paper: GPU peak of the block-by-block engine, protocol P (128 x 2048 tokens, bf16, 80 GiB GPU)", "",
              "Weights stay on the CPU; the GPU holds one block, the calibration batch's activations (at most 40% of "
              "the GPU: the automatic batch size), the embeddings / lm_head while block 0's inputs are captured, and "
              "one layer's fp32 statistics (SparseGPT: while solving the largest layer, four fp32 Hessian-sized "
              "matrices and two fp32 weight copies, as measured on CPU in sparsegpt_memory.md). Formula: "
              "`projection()` in bench/speed.py. " + gpu_check(data), "",
              "| shape | one block GiB | activations GiB | non-block GiB | SparseGPT Hessian GiB | SparseGPT solve GiB | "
              "peak Wanda GiB | peak SparseGPT GiB | CPU hidden states GiB | CPU weights GiB |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, shape in LLAMA_SHAPES.values():
        p = projection(*shape, tokens)
        lines.append(f"| {name} | {p['block_gib']} | {p['activations_gib']} | {p['non_block_gib']} | "
                     f"{p['sparsegpt_hessian_gib']} | {p['sparsegpt_solve_gib']} | {p['peak_wanda_gib']} | "
                     f"{p['peak_sparsegpt_gib']} | "
                     f"{p['cpu_hidden_states_gib']} | {p['cpu_weights_gib']} |")
    (RESULTS / "scale.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
