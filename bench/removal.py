"""Block removal and calibration-selection benchmark: SmolLM2 perplexity (WikiText-2).

    python -m bench.removal                          # both parts, protocol S on CPU (P when a GPU is present)
    python -m bench.removal --parts removal --blocks 2 4 6
    python -m bench.removal --parts selection --sizes 16 64 --seeds 0 1 2
    python -m bench.removal --model stories260K --blocks 1 --sizes 4 --seeds 0 --seqlen 128 --nsamples 8 \
        --eval-windows 2 --results-dir /tmp/removal_check                    # a quick check of the script

Part "removal": remove k decoder blocks chosen by ShortGPT block influence (BI) on the protocol's
calibration windows, either in one shot (``remove_one_shot``, ShortGPT) or iteratively with magnitude
compensation (``prune_and_comp``, Prune&Comp), and compare with unstructured Wanda (uniform) at the same
number of removed parameters: sparsity = k * (linear weights of one block) / (linear weights of all
blocks). Embeddings and norms are not counted (see the parameter paragraph of the .md).

Part "selection": Wanda 70% with AlphaPruning allocation, calibrated on n windows (--sizes) chosen from
a pool of candidate windows (--pool, default 4 x n) drawn with each seed: "random" takes the first n
windows of the pool (the pool is drawn window by window with the seeded RNG, so these are exactly
``calibration_windows(tok, calib, n, seqlen, seed)``, prunekit's default calibration for that seed),
"prototype-<mode>" chooses n by prototype distance (``select_windows``; the pool is embedded once per
pool with the dense model, last hidden layer, and reused for every mode). Reported as mean ± standard
deviation over seeds, with the min-max range.

Every run starts from a deep copy of the dense model (removal deletes blocks and may untie embeddings).
Results are written after every run to <results-dir>/removal.json and .md, one section per protocol
(a protocol with --seqlen/--eval-windows/--nsamples/--calib/--eval overrides is stored as "<name>-custom");
runs already present in the section with the same protocol are skipped unless --redo.
"""
from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time
from pathlib import Path

import torch

import prunekit
from prunekit.core.families import block_linears, get_blocks, weight_view
from prunekit.core.offload import resolve_device
from prunekit.methods.prototype import MODES, embed_windows, select_windows
from prunekit.methods.removal import prune_and_comp, remove_one_shot

from bench.lib.env import describe as machine_line
from bench.lib.env import environment
from bench.lib.models import Evaluation, calibration, load
from bench.lib.protocols import PROTOCOLS, select
from bench.lib.results import RESULTS, Runs
from bench.lib.tables import document, table

SEL_METRIC = {"metric": "wanda", "sparsity": 0.7, "allocation": "alphapruning", "allocation_params": {"eps": 0.3}}
REMOVAL_METHODS = {"bi-one-shot": "BI one-shot", "iterative": "BI iterative, no compensation",
                   "prune-comp": "Prune&Comp", "wanda-uniform": "Wanda uniform, equal params"}


# ----------------------------------------------------------------------------------------------- accounting

def param_accounting(model) -> dict:
    """Parameter counts of the dense model: per-block linear weights (what Wanda prunes), the rest."""
    lin = [sum(weight_view(m).numel() for m in d.values()) for d in block_linears(model)]
    blk = [sum(p.numel() for p in b.parameters()) for b in get_blocks(model)]
    total = sum(p.numel() for p in model.parameters())  # shared (tied) tensors counted once
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = out is not None and inp is not None and out.weight.data_ptr() == inp.weight.data_ptr()
    return {"blocks": len(lin), "block_linear": lin, "block_all": blk, "prunable": sum(lin), "total": total,
            "block_other": [b - l for b, l in zip(blk, lin)], "outside_blocks": total - sum(blk),
            "input_embedding": inp.weight.numel() if inp is not None else 0, "tied_embeddings": bool(tied)}


def equal_sparsity(acc: dict, k: int) -> float:
    """Unstructured sparsity removing as many block-linear weights as k (average) blocks hold."""
    per_block = acc["prunable"] / acc["blocks"]
    return k * per_block / acc["prunable"]


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def is_tied(model) -> bool:
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    return out is not None and inp is not None and out.weight.data_ptr() == inp.weight.data_ptr()


# ----------------------------------------------------------------------------------------------- statistics

def spread(vals: list[float]) -> dict:
    return {"n": len(vals), "mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None,
            "min": min(vals), "max": max(vals)}


def fmt_pm(s: dict) -> str:
    return f"{s['mean']:.3f} ± {s['std']:.3f}" if s["std"] is not None else f"{s['mean']:.3f}"


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


# ----------------------------------------------------------------------------------------------- markdown

def removal_section(sec: dict) -> list[str]:
    acc = sec.get("params")
    runs = {k: r for k, r in sec["runs"].items() if r["part"] == "removal"}
    if not runs or acc is None:
        return []
    p = sec["protocol"]
    B = acc["blocks"]
    per_lin = acc["prunable"] / B
    per_other = sum(acc["block_other"]) / B
    homog = len(set(acc["block_linear"])) == 1
    lines = ["### Block removal: BI one-shot vs Prune&Comp vs unstructured Wanda at equal parameters", "",
             f"Block scores: ShortGPT block influence (BI = mean over tokens of 1 - cos(h_in, h_out)) on the "
             f"protocol's {p['nsamples']} x {p['seqlen']} calibration windows (seed {p['seed']}). BI one-shot scores "
             "once and removes the k lowest blocks; Prune&Comp removes the lowest block, folds the magnitude "
             "compensation mean|h_out| / mean|h_in| into the embeddings and earlier blocks' residual writers, and "
             "rescores, k times. Wanda uniform is calibrated on the same windows.", "",
             f"Parameter count: the model has {B} blocks of {per_lin:,.0f} linear weights each"
             f"{'' if homog else ' (on average; blocks differ)'} ({acc['prunable']:,} prunable linear weights in all); "
             f"removing k blocks removes k x {per_lin:,.0f} of them, so the unstructured comparison prunes Wanda "
             f"uniform at sparsity k / {B} of the block linears. Not counted: each block's norms "
             f"({per_other:,.0f} parameters per block, {_pct(per_other / acc['block_all'][0])} of a block, which block "
             f"removal deletes as well and unstructured pruning keeps) and everything outside the blocks "
             f"({acc['outside_blocks']:,} parameters: embeddings{' (tied with the output layer)' if acc['tied_embeddings'] else ''}"
             f" and the final norm, {_pct(acc['outside_blocks'] / acc['total'])} of the {acc['total']:,} parameters). "
             f"One block is {_pct(acc['block_all'][0] / acc['total'])} of all parameters."]
    if acc["tied_embeddings"]:
        lines += ["", f"Note: the embeddings are tied, and Prune&Comp unties them (scaling the input embedding must not "
                  f"scale the logits), which adds an output-embedding copy of {acc['input_embedding']:,} parameters "
                  f"({acc['input_embedding'] / per_lin:.1f} blocks' worth): the 'params' column counts the model "
                  "as stored (unique tensors; pruned zeros still counted as stored, their number in 'nonzero')."]
    ks = sorted({r["k"] for r in runs.values()})
    methods = [m for m in REMOVAL_METHODS if any(r["method"] == m for r in runs.values())]
    by = {(r["k"], r["method"]): r for r in runs.values()}
    rows = []
    for k in ks:
        os_, pc = by.get((k, "bi-one-shot")), by.get((k, "prune-comp"))
        rows.append([f"{k} of {B}", _pct(equal_sparsity(acc, k))]
                    + [f"{by[(k, m)]['ppl']:.3f}" if (k, m) in by else "-" for m in methods]
                    + [os_["removed"] if os_ else "-", pc["removed"] if pc else "-",
                       ", ".join(f"{s:.3f}" for s in pc["scales"]) if pc else "-"])
    lines += [""] + table(["blocks removed", "block-linear sparsity"] + [f"{REMOVAL_METHODS[m]} PPL" for m in methods]
                          + ["removed blocks (one-shot)", "removed blocks (Prune&Comp, in order)", "Prune&Comp scales"],
                          rows)
    lines += ["", "Wanda prunes floor(sparsity x inputs) weights in each output row, so its achieved sparsity is slightly "
              "below the target (column 'sparsity achieved').", ""]
    rows = [[k, REMOVAL_METHODS[m], f"{r['params']:,}", f"{r['nonzero']:,}",
             _pct(r["overall_sparsity"]) if r.get("overall_sparsity") is not None else "-", f"{r['time_s']:.1f}",
             f"{r['eval_s']:.1f}"] for k in ks for m in methods if (r := by.get((k, m)))]
    lines += table(["blocks removed", "method", "params (stored)", "nonzero params", "sparsity achieved",
                    "removal / prune time (s)", "eval time (s)"], rows)
    lines += ["", "**Verdict (block removal).**", ""] + removal_verdict(ks, by, sec["dense"]["ppl"]) + [""]
    return lines


def _cmp(a: float, b: float) -> str:
    """'lower' / 'higher' / 'about equal' (within 1%) for PPL a vs b."""
    if abs(a - b) <= 0.01 * min(a, b):
        return "about equal"
    return "lower" if a < b else "higher"


def removal_verdict(ks, by, dense) -> list[str]:
    out = []
    both = [k for k in ks if (k, "bi-one-shot") in by and (k, "prune-comp") in by]
    if both:
        res = {k: _cmp(by[(k, "prune-comp")]["ppl"], by[(k, "bi-one-shot")]["ppl"]) for k in both}
        detail = "; ".join(f"k={k}: {by[(k, 'prune-comp')]['ppl']:.2f} vs {by[(k, 'bi-one-shot')]['ppl']:.2f}"
                           for k in both)
        wins = [k for k in both if res[k] == "lower"]
        losses = [k for k in both if res[k] == "higher"]
        if len(wins) == len(both):
            head = "Yes: Prune&Comp gives a lower perplexity than BI one-shot at every number of removed blocks"
        elif len(losses) == len(both):
            head = "No: Prune&Comp gives a higher perplexity than BI one-shot at every number of removed blocks"
        elif not wins and not losses:
            head = "No difference: Prune&Comp and BI one-shot are within 1% of each other"
        else:
            head = (f"Mixed: Prune&Comp is better at {', '.join(map(str, wins)) or 'no'} and worse at "
                    f"{', '.join(map(str, losses)) or 'no'} removed blocks"
                    + (" (within 1% elsewhere)" if len(wins) + len(losses) < len(both) else ""))
        same = [k for k in both if sorted(by[(k, 'prune-comp')]["removed"]) == by[(k, "bi-one-shot")]["removed"]]
        out.append(f"- Does Prune&Comp beat BI one-shot? {head} (Prune&Comp vs one-shot PPL, dense {dense:.2f}: "
                   f"{detail})." + (f" Both removed the same blocks at k = {', '.join(map(str, same))}, so there "
                                    "the difference is the compensation alone." if same else ""))
        it = [k for k in both if (k, "iterative") in by]
        if it:
            out.append("- Iterative BI without compensation (separates rescoring from compensation): "
                       + "; ".join(f"k={k}: {by[(k, 'iterative')]['ppl']:.2f}" for k in it) + ".")
    eq = [k for k in ks if (k, "wanda-uniform") in by and any((k, m) in by for m in ("bi-one-shot", "prune-comp", "iterative"))]
    if eq:
        parts, verdicts = [], []
        for k in eq:
            best_m = min((m for m in ("bi-one-shot", "iterative", "prune-comp") if (k, m) in by), key=lambda m: by[(k, m)]["ppl"])
            rb, ru = by[(k, best_m)]["ppl"], by[(k, "wanda-uniform")]["ppl"]
            verdicts.append(_cmp(rb, ru))
            parts.append(f"k={k}: best removal ({REMOVAL_METHODS[best_m]}) {rb:.2f} vs Wanda {ru:.2f}")
        if all(v == "lower" for v in verdicts):
            head = "Yes: the best block removal gives a lower perplexity than unstructured Wanda at every k"
        elif all(v == "higher" for v in verdicts):
            head = "No: unstructured Wanda at the same parameter count gives a lower perplexity at every k"
        else:
            head = "Mixed: " + ", ".join(f"removal {v} at k={k}" for k, v in zip(eq, verdicts))
        out.append(f"- Does removal beat unstructured pruning at equal parameters? {head} ({'; '.join(parts)}). "
                   "Keep in mind that removal shrinks compute and memory directly, while unstructured zeros need "
                   "sparse kernels to pay off.")
    return out or ["- Not enough runs yet."]


def selection_section(sec: dict) -> list[str]:
    runs = [r for r in sec["runs"].values() if r["part"] == "selection"]
    if not runs:
        return []
    p = sec["protocol"]
    groups: dict[tuple, list] = {}
    for r in runs:
        groups.setdefault((r["n"], r["pool"], r["method"]), []).append(r)
    lines = ["### Calibration selection: Wanda 70% + AlphaPruning, random vs prototype windows", "",
             f"Each seed draws a pool of candidate windows ({p['calib']}, {p['seqlen']} tokens) with that seed. "
             "random = the pool's first n windows (= prunekit's default calibration for that seed); prototype-hard / "
             "-easy / -mixed = select_windows on the pool embedded by the dense model (mean-pooled last hidden "
             "state, centred, k-means with k = round(sqrt(pool)) seeded by the same seed): the n farthest from / nearest "
             "to their prototype / half each. PPL: mean ± sample standard deviation over seeds, and min - max.", ""]
    order = {"random": 0, **{f"prototype-{m}": i + 1 for i, m in enumerate(MODES)}}
    rows = []
    for (n, pool, m), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], order.get(kv[0][2], 9))):
        rs = sorted(rs, key=lambda r: r["seed"])
        s = spread([r["ppl"] for r in rs])
        rows.append([n, pool, m, ", ".join(str(r["seed"]) for r in rs), fmt_pm(s), f"{s['min']:.3f} - {s['max']:.3f}",
                     ", ".join("%.2f" % r["ppl"] for r in rs), f"{statistics.fmean(r['prune_s'] for r in rs):.1f}"])
    lines += table(["calibration windows", "pool", "selection", "seeds", "PPL mean ± std", "min - max", "per seed",
                    "prune time (s)"], rows)
    lines += ["", "**Verdict (calibration selection).**", ""]
    verdict = []
    for (n, pool, m), rs in sorted(groups.items()):
        if m == "random" or (n, pool, "random") not in groups:
            continue
        rnd = groups[(n, pool, "random")]
        common = sorted({r["seed"] for r in rs} & {r["seed"] for r in rnd})
        if not common:
            continue
        a = spread([r["ppl"] for r in rs if r["seed"] in common])
        b = spread([r["ppl"] for r in rnd if r["seed"] in common])
        diff = a["mean"] - b["mean"]
        wins = sum(1 for s in common if next(r for r in rs if r["seed"] == s)["ppl"]
                   < next(r for r in rnd if r["seed"] == s)["ppl"])
        if len(common) < 2:
            judge = "one seed only, no spread to judge against"
        else:
            noise = max(a["std"], b["std"])
            if abs(diff) <= noise:
                judge = f"within the seed-to-seed spread (std up to {noise:.2f}): no clear difference"
            else:
                judge = ("better than random" if diff < 0 else "worse than random") + \
                    f", by more than the seed-to-seed spread (std up to {noise:.2f})"
        verdict.append(f"- {n} windows (pool {pool}): {m} {a['mean']:.2f} vs random {b['mean']:.2f} "
                       f"({diff:+.2f}, lower in {wins} of {len(common)} seeds): {judge}.")
    lines += (verdict or ["- Not enough runs yet."]) + [""]
    return lines


def markdown(data: dict) -> str:
    lines = ["# Block removal and calibration selection benchmark", ""]
    for label, sec in data.get("protocols", {}).items():
        p, env = sec["protocol"], sec["environment"]
        lines += [f"## Model {p['model']}, protocol {label}", "",
                  f"Calibration: {p['calib']}, {p['nsamples']} x {p['seqlen']} tokens, seed {p['seed']} (block removal "
                  f"and the equal-parameter Wanda runs; the selection part draws its own pools). Evaluation: {p['eval']}, "
                  f"{sec['dense']['windows']} windows x {p['seqlen']} tokens = {sec['dense']['tokens']} tokens, token "
                  "perplexity (paper convention).", "",
                  f"Machine: {machine_line(env, threads=True)}.", "",
                  f"Dense perplexity: **{sec['dense']['ppl']:.3f}**", ""]
        lines += removal_section(sec) + selection_section(sec)
    return document(lines)


# ----------------------------------------------------------------------------------------------- main

def protocol(name: str | None, device: str, model: str, **overrides) -> tuple[str, dict]:
    """(section label, protocol): the named protocol (default: the device's) evaluated on WikiText-2, for
    ``model``, with the ``overrides`` that are not None; a protocol with overrides is stored as NAME-custom."""
    name, proto = select(name, device)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return name + ("-custom" if overrides else ""), {**proto, "eval": "wikitext2", "model": model, **overrides}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--protocol", choices=list(PROTOCOLS), default=None)
    ap.add_argument("--parts", nargs="+", choices=["removal", "selection"], default=["removal", "selection"])
    ap.add_argument("--blocks", nargs="+", type=int, default=[2, 4, 6], help="numbers of blocks to remove")
    ap.add_argument("--iterative", action="store_true",
                    help="also iterative BI removal without compensation (separates rescoring from compensation)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="selection part: seeds")
    ap.add_argument("--sizes", nargs="+", type=int, default=[16, 64], help="selection part: calibration windows")
    ap.add_argument("--pool", type=int, default=None, help="selection part: candidate windows (default 4 x size)")
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=["hard"], help="prototype selection modes")
    ap.add_argument("--calib", default=None, help="calibration source override (a text file, c4, wikitext2)")
    ap.add_argument("--eval", default=None, help="evaluation source override (a text file, wikitext2, c4)")
    ap.add_argument("--seqlen", type=int, default=None)
    ap.add_argument("--eval-windows", type=int, default=None)
    ap.add_argument("--nsamples", type=int, default=None, help="calibration windows of the removal part")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    ap.add_argument("--redo", action="store_true")
    a = ap.parse_args(argv)

    device = resolve_device(a.device).type
    label, proto = protocol(a.protocol, device, a.model, seqlen=a.seqlen, eval_windows=a.eval_windows,
                            nsamples=a.nsamples, calib=a.calib, eval=a.eval)
    file = Runs(a.results_dir / "removal.json", {"protocol": proto}, a.redo, markdown, section=("protocols", label))
    sec = file.section
    sec["environment"] = environment()
    seqlen, calib_src = proto["seqlen"], proto["calib"]

    dense, tok = load(a.model, device=device)
    acc = param_accounting(dense)
    sec["params"] = acc
    B = acc["blocks"]
    if "removal" in a.parts:
        bad = [k for k in a.blocks if not 1 <= k < B]
        if bad:
            ap.error(f"--blocks {bad}: the model has {B} blocks")
    if "selection" in a.parts:
        for n in a.sizes:
            if (a.pool or 4 * n) < n:
                ap.error(f"--pool {a.pool} is smaller than size {n}")

    evaluate = Evaluation(tok, proto, device)
    if "dense" not in sec:
        sec["dense"] = evaluate(dense)
        file.save()
    print(f"dense: {sec['dense']['ppl']:.3f}  ({sec['dense']['windows']} windows)", flush=True)

    # ------------------------------------------------------------------ part 1: block removal
    if "removal" in a.parts:
        methods = ["bi-one-shot"] + (["iterative"] if a.iterative else []) + ["prune-comp", "wanda-uniform"]
        calib = None
        for k in a.blocks:
            for method in methods:
                key = f"removal/k{k}/{method}"
                if not file.todo(key):
                    continue
                if calib is None:
                    calib = calibration(tok, proto)
                model = copy.deepcopy(dense)
                rec = {"part": "removal", "k": k, "method": method}
                t = time.time()
                try:
                    if method == "bi-one-shot":
                        info = remove_one_shot(model, calib, k, score="bi", device=device)
                        rec.update(removed=info["removed"], scores=info["scores"])
                    elif method in ("prune-comp", "iterative"):
                        info = prune_and_comp(model, calib, k, score="bi", compensate=method == "prune-comp",
                                              device=device)
                        rec.update(removed=info["removed"], scales=info["scales"], scores=info["scores"],
                                   check_errors=[s.get("check_error") for s in info["steps"]])
                    else:
                        s = equal_sparsity(acc, k)
                        cfg = prunekit.make_config(model=a.model, metric="wanda", sparsity=s, allocation="uniform",
                                                   seqlen=seqlen, nsamples=int(calib.shape[0]), calib=calib_src,
                                                   seed=proto["seed"], device=device)
                        report = prunekit.prune(model, tok, cfg, calib_ids=calib)
                        rec.update(sparsity=s, overall_sparsity=report["overall_sparsity"])
                        del report
                except prunekit.PrunekitError as e:
                    print(f"{key}: skipped ({e})", flush=True)
                    del model
                    gc.collect()
                    continue
                rec["time_s"] = round(time.time() - t, 2)
                rec["blocks_after"] = len(get_blocks(model))
                rec["params"] = n_params(model)
                rec["tied_after"] = is_tied(model)
                zeros = sum(int((weight_view(m) == 0).sum()) for d in block_linears(model) for m in d.values())
                rec["nonzero"] = rec["params"] - zeros
                ev = evaluate(model)
                rec.update(ppl=ev["ppl"], eval_s=ev["seconds"], windows=ev["windows"])
                del model
                gc.collect()
                print(f"{key}: ppl {rec['ppl']:.3f}  {rec['time_s']:.1f}s"
                      + (f"  removed {rec['removed']}" if "removed" in rec else f"  sparsity {rec['sparsity']:.4f}"),
                      flush=True)
                file.add(key, rec)

    # ------------------------------------------------------------------ part 2: calibration selection
    if "selection" in a.parts:
        for n in a.sizes:
            P = a.pool or 4 * n
            for seed in a.seeds:
                methods = ["random"] + [f"prototype-{m}" for m in a.modes]
                keys = {m: f"selection/n{n}/pool{P}/seed{seed}/{m}" for m in methods}
                if not any(file.todo(k) for k in keys.values()):
                    continue
                pool = calibration(tok, {**proto, "nsamples": P, "seed": seed})
                X, embed_s = None, None
                for m in methods:
                    key = keys[m]
                    if not file.todo(key):
                        continue
                    rec = {"part": "selection", "n": n, "pool": P, "seed": seed, "method": m, **SEL_METRIC}
                    if m == "random":
                        idx = torch.arange(n)
                    else:
                        if X is None:
                            t = time.time()
                            X = embed_windows(dense, pool, device=device)
                            embed_s = round(time.time() - t, 2)
                        idx, info = select_windows(pool, n, m.split("-", 1)[1], seed=seed, embed=X)
                        rec.update(embed_s=embed_s, k=info["k"], cluster_sizes=info["cluster_sizes"],
                                   chosen_per_cluster=info["chosen_per_cluster"], pool_scores=info["pool_scores"])
                    rec["indices"] = idx.tolist()
                    model = copy.deepcopy(dense)
                    cfg = prunekit.make_config(model=a.model, seqlen=seqlen, nsamples=n, calib=calib_src, seed=seed,
                                               device=device, **SEL_METRIC)
                    t = time.time()
                    report = prunekit.prune(model, tok, cfg, calib_ids=pool[idx])
                    rec["prune_s"] = round(time.time() - t, 2)
                    rec["overall_sparsity"] = report["overall_sparsity"]
                    rec["block_sparsity"] = [round(b["sparsity"], 4) for b in report["blocks"]]
                    del report
                    ev = evaluate(model)
                    rec.update(ppl=ev["ppl"], eval_s=ev["seconds"], windows=ev["windows"])
                    del model
                    gc.collect()
                    print(f"{key}: ppl {rec['ppl']:.3f}  prune {rec['prune_s']:.1f}s", flush=True)
                    file.add(key, rec)
    file.save()
    print(f"wrote {file.path} and its .md", flush=True)


if __name__ == "__main__":
    main()
