"""Speed and memory benchmark of a prune.

    python -m bench.speed                       # SmolLM2, Wanda 50%, protocol S (64 x 512), CPU
    python -m bench.speed --model llama7b-random --device cuda      # 7B-shaped random LLaMA, 128 x 2048
    python -m bench.speed --model llama7b-random --blocks 2 --nsamples 4 --seqlen 256   # same path, small, CPU
    python -m bench.speed --model stories260K --metric sparsegpt,wanda --phases sparsegpt --sweep columns

Reports wall time of ``prunekit.prune`` (model already loaded), peak memory (RSS on CPU,
``torch.cuda.max_memory_allocated`` on GPU), and, on GPU, the floor of 2 x params x calibration tokens
FLOPs at the GPU's dense bf16 peak. ``--sweep`` chooses SparseGPT's within-block solve (its ``sweep`` metric
parameter; ``auto``: triangular on CUDA, the column loop on the CPU). Writes bench/results/speed.json (merged by
key), speed.md and scale.md (the measured peaks next to the on-paper 7B / 70B projection).
"""
from __future__ import annotations

import argparse
import time

import torch

import prunekit
from prunekit.core import stats as stats_mod
from prunekit.core.blocks import HeapKeeper, auto_batch_size, capture_inputs, tune_malloc
from prunekit.core.families import get_blocks
from prunekit.core.offload import on_device, resolve_device, store_device
from prunekit.methods.sparsegpt import sweep_method

from bench.lib.env import environment
from bench.lib.models import RANDOM_LLAMA, calibration, dense_snapshot, load
from bench.lib.protocols import PROTOCOLS, config_fields
from bench.lib.results import RESULTS, load_results, merge_results, save_markdown
from bench.lib.tables import document, table
from bench.lib.timing import PeakRSS, peak_rss_gib, phase_timer, sync

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM datasheets
SPEED = RESULTS / "speed.json"

# the engine's phases timed by --phases: (module, function, label); SparseGPT's factor of H^-1 is computed once
# per shared Hessian (factor_hessian) before sparsegpt_solve gets it, so the two are separate phases (records of
# older versions name other phases: the labels are stored as they were measured)
PHASES = (("prunekit.core.blocks", "capture_inputs", "capture of block 0's inputs (embeddings)"),
          ("prunekit.core.blocks", "probe_block_kwargs", "probe of every block's arguments"),
          ("prunekit.core.stats:LayerStats", "_accumulate", "statistics: feature sums and counts"),
          ("prunekit.core.stats", "gram", "statistics: X^T X (Hessian)"),
          ("prunekit.pruning.layer_pruner", "make_mask", "mask selection"),
          ("prunekit.core.blocks", "release_memory", "heap trim after each block"),
          ("prunekit.methods.sparsegpt", "factor_hessian",
           "SparseGPT factor of H^-1 (reversed Cholesky, triangular inverse)"),
          ("prunekit.methods.sparsegpt", "sparsegpt_solve", "SparseGPT column sweep"),
          ("prunekit.pruning.layer_pruner", "pack_mask", "mask packing"))
REST = "rest (block forward passes, metric scores, zeroing, bookkeeping)"


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
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="smollm2 | stories260K | llama7b-random | any model spec")
    ap.add_argument("--metric", default="wanda", help="one metric or a comma-separated list (one process)")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--nsamples", type=int, help="default: protocol S's (P's for llama7b-random)")
    ap.add_argument("--seqlen", type=int, help="default: protocol S's (P's for llama7b-random)")
    ap.add_argument("--blocks", type=int, default=32, help="for llama7b-random")
    ap.add_argument("--dtype", default=None, help="default: the model's (llama7b-random: bf16 with a GPU, else fp32)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--phases", default="", help="comma-separated metrics that get one more, instrumented run "
                    "(time per phase), right after their plain run")
    ap.add_argument("--sweep", choices=("auto", "columns", "triangular"), default="auto",
                    help="SparseGPT's within-block solve (metric parameter sweep); auto: the device's default")
    ap.add_argument("--forward", type=int, default=2, help="dense blocks-only forwards of the calibration set, each "
                    "timed in a fresh process of its own (half before the prunes, half after; the minimum is the "
                    "reference the prune times are divided by); 0: none")
    a = ap.parse_args(argv)
    device = resolve_device(a.device).type
    cuda = device == "cuda"
    big = a.model == RANDOM_LLAMA
    proto = PROTOCOLS["P" if big else "S"]
    proto = {**proto, "nsamples": a.nsamples or proto["nsamples"], "seqlen": a.seqlen or proto["seqlen"]}
    t = time.time()
    model, tok = load(a.model, a.dtype or "auto", blocks=a.blocks)
    calib = calibration(tok, proto)
    load_s = time.time() - t
    rss_before = peak_rss_gib()
    phased = [m for m in a.phases.split(",") if m]
    runs = [(m, instr) for m in a.metric.split(",") for instr in ((False, True) if m in phased else (False,))]
    dense = dense_snapshot(model) if len(runs) > 1 else None
    forwards = [forward_in_child(a, proto, device) for _ in range((a.forward + 1) // 2)]
    keys = []
    for metric, instrumented in runs:
        if dense is not None:
            dense.restore()  # every run starts from the dense weights
        cfg = {"metric": metric, "sparsity": a.sparsity, "device": device, **config_fields(proto),
               **({"metric_params": {"sweep": a.sweep}} if metric == "sparsegpt" else {})}
        times, phases = [], {}
        for _ in range(1 if instrumented else a.repeat):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                torch.cuda.synchronize()
            with phase_timer(phases, PHASES, cuda, instrumented), PeakRSS() as rss:
                t = time.time()
                report = prunekit.prune(model, tok, cfg, calib_ids=calib)
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.time() - t)
        key = run_key(a, metric, device, proto)
        if instrumented:
            record_phases(key, times[0], phases)
        else:
            record(key, a, metric, device, model, proto, load_s, times, rss_before, report, dense is not None, rss.peak)
            keys.append(key)
    if a.forward:  # on the pruned weights: the same dense kernels, the same time
        forwards += [forward_in_child(a, proto, device) for _ in range(a.forward // 2)]
        record_forward(keys, forwards)


def forward_in_child(a, proto: dict, device: str) -> tuple[float, int]:
    """``forward_time`` in a fresh process (the model loaded there, not timed): glibc's heap carries over from one
    run to the next in one process, so a forward before a prune changed the prune's time and peak memory (and the
    other way round); each prune and each forward starts from a fresh heap, as a user's run does."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_forward_child, (a.model, a.dtype, a.blocks, proto, device))


def _forward_child(spec: str, dtype: str | None, blocks: int, proto: dict, device: str) -> tuple[float, int]:
    model, tok = load(spec, dtype or "auto", blocks=blocks)
    return forward_time(model, calibration(tok, proto), device)


@torch.no_grad()
def forward_time(model, calib: torch.Tensor, device: str) -> tuple[float, int]:
    """(seconds, batch size) of one dense blocks-only forward of the calibration set: block 0's inputs captured,
    then every block run once on all windows, nothing else (no statistics, no heap trims, the batch size a prune
    would choose): the one pass that any calibration-based method needs, the floor of the engine's time. glibc's
    heap is tuned and anchored as in a prune (``tune_malloc``, ``HeapKeeper``), so that the forward does not pay
    page faults that the engine avoids; it is never trimmed."""
    tune_malloc()
    _anchored = HeapKeeper()  # held while the forward runs: the engine's heap anchors; never asked to trim
    dev = torch.device(device)
    blocks = get_blocks(model)
    bs = auto_batch_size(model, calib.shape[0], calib.shape[1], dev)
    sync(device)
    t = time.time()
    inputs = capture_inputs(model, blocks, calib, bs, dev, store_device(model, calib, dev, None))
    for b, block in enumerate(blocks):
        inputs.block_index = b
        with on_device(block, dev):
            for i in range(inputs.n_batches):
                inputs.hidden[i] = inputs.call(block, i, dev).to(inputs.hidden[i].device)
    sync(device)
    return time.time() - t, bs


def record_forward(keys: list[str], runs: list[tuple[float, int]]) -> None:
    """Add the dense forward's time (and the batch size it ran with) to this invocation's records, and each prune's
    multiple of it."""
    forwards = [t for t, _ in runs]
    batch = sorted({b for _, b in runs})
    data = load_results(SPEED)
    for key in keys:
        r = data[key]
        r["forward_s"] = round(min(forwards), 2)
        r["forward_s_all"] = [round(x, 2) for x in forwards]
        r["forward_batch"] = batch[0] if len(batch) == 1 else batch
        r["x_forward"] = round(r["prune_s"] / min(forwards), 3)
        save({key: r})
    print("dense blocks-only forward", [round(x, 2) for x in forwards], "s")


def model_label(a) -> str:
    return a.model + (f" ({a.blocks} blocks)" if a.model == RANDOM_LLAMA else "")


def run_key(a, metric: str, device: str, proto: dict) -> str:
    """One run's key in speed.json (the plain run's record; an instrumented run adds its phases to it). A forced
    SparseGPT sweep method is part of the key (the default's runs keep the key they always had)."""
    sweep = f"|sweep={a.sweep}" if metric == "sparsegpt" and a.sweep != "auto" else ""
    return f"{model_label(a)}|{metric}|{a.sparsity}|{device}|{proto['nsamples']}x{proto['seqlen']}{sweep}"


def save(data: dict) -> None:
    merge_results(SPEED, data, markdown)
    save_markdown(RESULTS / "scale.md", scale_markdown(load_results(SPEED)))


def record_phases(key: str, total: float, phases: dict) -> None:
    data = load_results(SPEED)
    if key in data:
        rest = total - sum(v for k, v in phases.items() if not k.startswith(" "))
        data[key]["phases_s"] = {"instrumented_total": round(total, 2), **{k: round(v, 2) for k, v in phases.items()},
                                 REST: round(rest, 2)}
        save({key: data[key]})
    print(key, "phases", phases, "total", round(total, 2))


def record(key, a, metric, device, model, proto, load_s, times, rss_before, report, dense_kept: bool,
           run_peak: float) -> None:
    cuda = device == "cuda"
    nsamples, seqlen = proto["nsamples"], proto["seqlen"]
    blocks = get_blocks(model)
    block_params = sum(p.numel() for p in blocks.parameters())
    res = {"model": model_label(a), "metric": metric,
           "sparsity": a.sparsity, "device": device, "dtype": str(next(model.parameters()).dtype),
           "nsamples": nsamples, "seqlen": seqlen, "calibration_tokens": nsamples * seqlen,
           "params": sum(p.numel() for p in model.parameters()), "block_params": block_params,
           "load_s": round(load_s, 2), "prune_s": round(min(times), 2), "prune_s_all": [round(x, 2) for x in times],
           "peak_rss_gib": round(peak_rss_gib(), 2), "rss_before_prune_gib": round(rss_before, 2),
           "peak_rss_last_prune_gib": round(run_peak, 2),
           "overall_sparsity": report["overall_sparsity"], "engine": "sequential, one batch per block",
           "dense_copy_in_rss": dense_kept}  # a copy of the dense layer weights, kept to restore them between runs
    if metric == "sparsegpt":  # how each 128-column block is solved
        res["sparsegpt_sweep"] = sweep_method(device) if a.sweep == "auto" else a.sweep
    if cuda and metric == "sparsegpt":
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
        res["one_block_gib"] = round(block_params / len(blocks) * model.dtype.itemsize / 2**30, 3)
        res["hidden_states_gib"] = round(nsamples * seqlen * model.config.hidden_size * model.dtype.itemsize / 2**30, 2)
    if a.model == RANDOM_LLAMA:  # the same formula on paper for 7B (checked against a GPU measurement) and 70B
        for shape_key, (_, shape) in LLAMA_SHAPES.items():
            res[f"projection_{shape_key}"] = projection(*shape, nsamples * seqlen)
    res["environment"] = environment()
    save({key: res})
    print(res)


def machine_cell(env: dict) -> str:
    return f"{env.get('gpu', env['processor'])}, {env['cpu_count']} CPUs"


def markdown(data: dict) -> str:
    lines = ["# Speed benchmark", "", "Wall time of `prunekit.prune` with the model already loaded (min over repeats); "
             "peak RSS is the process high-water mark (model included; where a second figure is given, the first is "
             "the last prune's own peak, sampled while it ran). \"forward s\" is one dense blocks-only forward of the "
             "same calibration windows, run by the same benchmark in a fresh process of its own (block 0's inputs "
             "captured, every block run once), the "
             "floor of any calibration-based method; \"x forward\" is the prune's multiple of it.", ""]
    lines += table(["model", "metric", "device", "calibration", "prune s", "forward s", "x forward", "peak RSS GiB",
                    "peak GPU GiB", "x FLOPs floor", "machine", "commit"],
                   [[r["model"], f"{r['metric']} {r['sparsity']}" + (f" ({r['sparsegpt_sweep']})" if "|sweep=" in k
                                                                      else ""),
                     r["device"], f"{r['nsamples']} x {r['seqlen']}", r["prune_s"], r.get("forward_s", "-"),
                     r.get("x_forward", "-"),
                     (f"{r['peak_rss_last_prune_gib']} / " if "peak_rss_last_prune_gib" in r else "")
                     + str(r["peak_rss_gib"]),
                     r.get("peak_gpu_gib", "-"), r.get("x_floor", "-"),
                     f"{machine_cell(r['environment'])}, torch {r['environment']['torch']}",
                     r["environment"].get("git", "-")] for k, r in data.items()])
    for k, r in data.items():
        if "phases_s" in r:
            lines += ["", f"Phases of `{k}` (a second, instrumented run: GPU synchronised around each phase):", ""]
            lines += [f"- {name.strip()}{' (inside the solve)' if name.startswith(' ') else ''}: {v} s"
                      for name, v in r["phases_s"].items()]
    return document(lines)


def gpu_check(data: dict) -> str:
    """The projection next to what a GPU run of the 7B shape measured (if one was)."""
    got = [r for r in data.values() if r["device"] == "cuda" and r["model"] == "llama7b-random (32 blocks)"]
    if not got:
        return "Not yet checked against a GPU measurement."
    p = projection(*LLAMA_SHAPES["7b"][1], 128 * 2048)
    meas = "; ".join(f"{r['metric']} {r['peak_gpu_gib']} GiB (projected {p['peak_' + r['metric'] + '_gib']})"
                     for r in got if f"peak_{r['metric']}_gib" in p)
    over = [r["metric"] for r in got if r["peak_gpu_gib"] > p.get(f"peak_{r['metric']}_gib", float("inf"))]
    return (f"Measured on {got[0].get('gpu', 'a GPU')} (LLaMA-7B shape, 128 x 2048, bf16): {meas}. The projection's "
            "activation term is the 40% batch budget, an upper bound"
            + (f"; measured above it: {', '.join(over)}." if over else ", and every measured peak is below it."))


def scale_markdown(data: dict) -> str:
    """scale.md: measured peaks (CPU RSS, GPU when lent) and the on-paper GPU peak for 7B and 70B LLaMA shapes at
    protocol P (128 x 2048 calibration tokens, bf16, 80 GiB GPU)."""
    lines = ["# Scale: memory peaks and the 7B / 70B projection", "",
             "## Measured", "",
             "Peak RSS is the process high-water mark (model, calibration hidden states and statistics included); "
             "peak GPU is `torch.cuda.max_memory_allocated`.", ""]
    lines += table(["model", "params", "metric", "device", "calibration", "prune s", "peak RSS GiB", "peak GPU GiB",
                    "machine"],
                   [[r["model"], f"{r['params'] / 1e6:.0f} M", f"{r['metric']} {r['sparsity']}", r["device"],
                     f"{r['nsamples']} x {r['seqlen']}", r["prune_s"], r["peak_rss_gib"], r.get("peak_gpu_gib", "-"),
                     f"{machine_cell(r['environment'])}, {r['environment']['date']}"] for r in data.values()])
    lines += ["", "## On paper: GPU peak of the block-by-block engine, protocol P (128 x 2048 tokens, bf16, 80 GiB GPU)",
              "", "Weights stay on the CPU; the GPU holds one block, the calibration batch's activations (at most 40% of "
              "the GPU: the automatic batch size), the embeddings / lm_head while block 0's inputs are captured, and "
              "one layer's fp32 statistics (SparseGPT: while solving the largest layer, four fp32 Hessian-sized "
              "matrices and two fp32 weight copies, as measured on CPU in sparsegpt_memory.md). Formula: "
              "`projection()` in bench/speed.py. " + gpu_check(data), ""]
    keys = ("block_gib", "activations_gib", "non_block_gib", "sparsegpt_hessian_gib", "sparsegpt_solve_gib",
            "peak_wanda_gib", "peak_sparsegpt_gib", "cpu_hidden_states_gib", "cpu_weights_gib")
    lines += table(["shape", "one block GiB", "activations GiB", "non-block GiB", "SparseGPT Hessian GiB",
                    "SparseGPT solve GiB", "peak Wanda GiB", "peak SparseGPT GiB", "CPU hidden states GiB",
                    "CPU weights GiB"],
                   [[name] + [projection(*shape, 128 * 2048)[k] for k in keys] for name, shape in LLAMA_SHAPES.values()])
    return document(lines)


if __name__ == "__main__":
    main()
