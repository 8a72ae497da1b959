"""Search benchmark: searched layer-wise allocations vs uniform, OWL and AlphaPruning (Wanda, 70%).

    python -m bench.search                         # SmolLM2, protocol S on CPU (P with CUDA), budget 20
    python -m bench.search --budget 48 --methods dsa random
    python -m bench.search --model stories260K --seqlen 64 --nsamples 8 --n-heldout 4 --eval-windows 4 \
        --budget 2 --population 2 --methods dsa --results-dir /tmp/search_check        # tiny test

Every search (``prunekit.search.run_search``: dsa, random, tpe, optishear) gets the same budget of
fitness evaluations, the same calibration windows (the protocol's) and the same fitness windows:
``--n-heldout`` x ``--heldout-seqlen`` tokens drawn from the calibration source with another seed
(calibration seed + 7919): another draw than the calibration windows. Fitness = held-out perplexity of the
model pruned to the candidate's ratios, by default in the search's *cached* mode (dense-input
statistics: a proxy of the final sequential prune; ``--mode full``: each candidate pruned
sequentially, exactly as the final prune); OptiShear's own fitness is the KL divergence from the dense
model on calibration windows (its documented objective), its chosen point is scored on the held-out
windows afterwards.

Afterwards every allocation is pruned for real with ``prunekit.prune`` (sequential Wanda, the
protocol's calibration) and evaluated on the held-out windows and on WikiText-2 (the protocol's
windows, never seen by any search): dense, uniform, OWL, AlphaPruning, and each search's best
recipe. TPE also searches KV-cache bit-widths: its allocation is evaluated sparsity-only (comparable
to the others) and again with its KV cache fake-quantised to the found bit-widths. OptiShear's recipe
keeps Wanda scores with the found ratios (comparable); the found meta metric is evaluated too.

Outputs (written after every step, so a killed benchmark keeps what it finished and continues
when restarted with the same arguments; the searches themselves resume from their checkpoints in
``--out-dir``, by default under /tmp so nothing large lands in the repository):
``<results-dir>/search.json``, ``search.md`` (table + verdict), ``search_curve.png``.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import re
import time
from pathlib import Path

import torch

import prunekit
from prunekit.core.data import calibration_windows
from prunekit.core.families import resolve_seqlen
from prunekit.core.metric import METRICS
from prunekit.core.nll import nll_of_windows
from prunekit.core.offload import resolve_device
from prunekit.pruning.config import PruneConfig
from prunekit.search import METHODS, run_search
from prunekit.search.run import HELDOUT_SEED_OFFSET
from prunekit.search.fitness import Fitness
from prunekit.search.kvquant import kv_quant_hooks
from prunekit.search.optishear import meta_metric

from bench.lib.env import describe as machine_line
from bench.lib.env import environment
from bench.lib.models import NAMES, ProtocolModel
from bench.lib.protocols import PROTOCOLS, select
from bench.lib.results import RESULTS, load_results, same_settings, save_results
from bench.lib.tables import cell, document, table

ALLOCATORS = ("uniform", "owl", "alphapruning")
LABELS = {"dense": "dense", "uniform": "uniform", "owl": "OWL", "alphapruning": "AlphaPruning",
          "dsa": "DSA (evolved programs)", "random": "random programs", "tpe": "TPE (Optuna)",
          "optishear": "OptiShear (NSGA-II)"}
COLORS = {"dsa": "tab:red", "random": "tab:gray", "tpe": "tab:blue", "optishear": "tab:purple",
          "uniform": "black", "owl": "tab:green", "alphapruning": "tab:orange"}
SCHEMA = 1


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def short_hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:8]


def slug(s: str) -> str:
    p = Path(s)
    name = (f"{p.parent.name}-{p.name}" if p.name in ("hf", "model") else p.name) if p.exists() else s
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")[:40] or "model"


def method_params(method: str, a) -> dict:
    if method == "dsa":  # prunekit's elite is 2: keep it below a tiny population
        return {"population": a.population, **({"elite": a.population - 1} if a.population <= 2 else {})}
    if method == "random":
        return {"population": a.population}
    if method == "tpe":
        return {"kv": not a.tpe_no_kv, "kv_budget": a.tpe_kv_budget}
    if method == "optishear":
        return {} if a.optishear_population is None else {"population": a.optishear_population}
    return {}


# ----------------------------------------------------------------------------------------- plot
def curve(method: str, history: list[dict]) -> tuple[list[int], list[float]]:
    """Best-so-far fitness against the number of (feasible) evaluations."""
    xs, ys, n, best = [], [], 0, math.inf
    for h in history:
        v = h.get("kl") if method == "optishear" else h.get("fitness")
        if v is None:  # TPE: infeasible trial (KV memory over budget), not evaluated
            continue
        n += 1
        best = min(best, float(v))
        xs.append(n)
        ys.append(best)
    return xs, ys


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    searches = {m: r for m, r in data.get("searches", {}).items() if r.get("history")}
    ppl_methods = [m for m in searches if m != "optishear"]
    show_os = "optishear" in searches
    ncols = 2 if show_os else 1
    fig, axes = plt.subplots(1, ncols, figsize=(8.5 * ncols, 7.0), squeeze=False)
    ax = axes[0][0]
    s = data["settings"]
    values = []
    budget = data["budget"]
    xmax = max([budget] + [r.get("evaluations", 0) for r in searches.values()]) + 0.5
    for m in ppl_methods:
        r = searches[m]
        xs, ys = curve(m, r["history"])
        if not xs:
            continue
        label = LABELS[m]
        if m == "tpe" and r.get("params", {}).get("kv"):
            label += " - with KV-cache bits"
        # random search is drawn dashed over DSA: both stay visible where they coincide (same first generation)
        ax.step(xs + [xmax], ys + [ys[-1]], where="post", color=COLORS[m], lw=1.8 if m == "random" else 3.2,
                ls=(0, (4, 3)) if m == "random" else "-", zorder=3 if m == "random" else 2,
                label=f"{label}: best {ys[-1]:.4g} after {xs[-1]}")
        ax.plot(xs, ys, "o", ms=3.5, color=COLORS[m], zorder=3)
        values += ys
    proxy = data.get("proxy", {})
    base = dict(proxy)
    if "uniform" not in base:
        for r in searches.values():
            if "uniform" in r.get("baselines", {}):
                base["uniform"] = r["baselines"]["uniform"]
                break
    for k in ALLOCATORS:
        if k in base and math.isfinite(base[k]):
            ax.axhline(base[k], color=COLORS[k], lw=1.3, ls=":", label=f"{LABELS[k]}: {base[k]:.4g}")
            values.append(base[k])
    tpe = searches.get("tpe", {})
    ukv = tpe.get("baselines", {}).get("uniform_kv")
    if ukv and math.isfinite(ukv["fitness"]):
        ax.axhline(ukv["fitness"], color=COLORS["tpe"], lw=1.0, ls=":",
                   label=f"uniform + {ukv['kv_bits']}-bit KV (TPE's reference): {ukv['fitness']:.4g}")
        values.append(ukv["fitness"])
    if show_os:
        ch = searches["optishear"].get("best") or {}
        if ch.get("heldout_ppl") is not None and math.isfinite(ch["heldout_ppl"]):
            x = min(searches["optishear"]["evaluations"], budget)
            ax.plot(x, ch["heldout_ppl"], "*", ms=14, color=COLORS["optishear"],
                    label=f"OptiShear's chosen point (picked by KL): {ch['heldout_ppl']:.4g}")
            values.append(ch["heldout_ppl"])
    finite = [v for v in values if math.isfinite(v)]
    if finite:
        lo = min(finite)
        ref = [base[k] for k in ALLOCATORS if k in base and math.isfinite(base[k])] or finite
        hi = max(max(ref), min(max(finite), 3 * max(ref)))
        if hi / lo > 3:
            ax.set_yscale("log")
        ax.set_ylim(lo * 0.97, hi * 1.06)
    ax.set_xlim(0.5, xmax)
    ax.set_xlabel("fitness evaluations")
    ax.set_ylabel("best held-out perplexity so far (lower is better)")
    dense = base.get("dense")
    ax.set_title(f"{data['model_name']}, {s['metric']} {s['sparsity']:.0%}, budget {budget}: search fitness\n"
                 f"({s['n_heldout']} x {s['heldout_seqlen']} held-out {s['calib_name']} tokens, {s['mode']} mode"
                 + (f"; dense {dense:.4g})" if dense else ")"), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8.5, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    if show_os:
        ax2 = axes[0][1]
        r = searches["optishear"]
        xs, ys = curve("optishear", r["history"])
        ax2.step(xs + [xmax], ys + [ys[-1]], where="post", color=COLORS["optishear"], lw=2.6,
                 label=f"{LABELS['optishear']}: best {ys[-1]:.4g} after {xs[-1]}")
        ax2.plot(xs, ys, "o", ms=3.5, color=COLORS["optishear"])
        ax2.set_xlim(0.5, xmax)
        ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
        ukl = r.get("baselines", {}).get("uniform_kl")
        if ukl is not None and math.isfinite(ukl):
            ax2.axhline(ukl, color="black", ls=":", lw=1.3, label=f"uniform: {ukl:.4g}")
        ax2.set_xlabel("fitness evaluations")
        ax2.set_ylabel("best KL(dense || pruned) so far (lower is better)")
        ax2.set_title("OptiShear's own fitness: KL divergence from the dense model\n"
                      f"({r['params']['n_fitness_windows']} x {r['params']['fitness_seqlen']} calibration tokens; "
                      "sparsity level >= target)", fontsize=10)
        ax2.grid(True, alpha=0.3)
        ax2.legend(fontsize=8.5, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=1, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------- markdown
def rel(a: float, b: float) -> str:
    """a vs b in words, a and b perplexities."""
    d = (a - b) / b * 100
    if abs(d) < 0.05:
        return "equal"
    return f"{abs(d):.1f}% {'lower' if d < 0 else 'higher'}"


def final_rows(data: dict) -> list[tuple[str, str, dict, dict | None]]:
    """(key, row label, final evaluation, search result or None) in table order."""
    rows = []
    fin = data.get("final", {})
    for k in ("dense",) + ALLOCATORS:
        if k in fin:
            rows.append((k, LABELS[k], fin[k], None))
    for m, r in data.get("searches", {}).items():
        for variant, ev in (r.get("final") or {}).items():
            label = LABELS[m]
            if m == "tpe":
                label += ", sparsity only" if variant == "recipe" else f" + KV bits {ev.get('kv_bits_short', '')}"
            elif m == "optishear":
                label += ": its ratios, Wanda" if variant == "recipe" else ": its ratios + its meta metric"
            rows.append((f"{m}/{variant}", label, ev, r))
    return rows


def verdict(data: dict) -> list[str]:
    fin, srch = data.get("final", {}), data.get("searches", {})
    dsa = (srch.get("dsa", {}).get("final") or {}).get("recipe")
    out = []
    if dsa is None:
        return ["No DSA result yet."]
    for key, name in (("heldout_ppl", "the held-out fitness windows (what the search optimised)"),
                      ("wikitext_ppl", f"{data['settings']['eval_name']} (never seen by any search)")):
        parts, outcome = [], []
        for b in ("owl", "alphapruning"):
            if b in fin:
                r = rel(dsa[key], fin[b][key])
                outcome.append(f"{'ties with' if r == 'equal' else 'beats' if dsa[key] < fin[b][key] else 'loses to'} "
                               f"{LABELS[b]}")
                parts.append(f"{LABELS[b]} {cell(fin[b][key])}: DSA " + ("equal" if r == "equal" else r))
        if parts:
            out.append(f"- On {name}, DSA ({cell(dsa[key])}) **{' and '.join(outcome)}** ({'; '.join(parts)}).")
        if "uniform" in fin:
            out.append(f"  Against uniform ({cell(fin['uniform'][key])}): {rel(dsa[key], fin['uniform'][key])}.")
    rnd = srch.get("random")
    if rnd and rnd.get("final"):
        rr = rnd["final"]["recipe"]
        d, r = srch["dsa"], rnd
        fd, fr = d["best"]["fitness"], r["best"]["fitness"]
        word = "DSA better" if fd < fr else ("DSA not better" if fd > fr else "equal")
        out.append(f"- Same budget ({d['evaluations']} vs {r['evaluations']} evaluations): DSA's best search fitness "
                   f"{cell(fd)} vs random programs {cell(fr)} ({word}); "
                   f"after the final prune: held-out {cell(dsa['heldout_ppl'])} vs {cell(rr['heldout_ppl'])}, "
                   f"{data['settings']['eval_name']} {cell(dsa['wikitext_ppl'])} vs {cell(rr['wikitext_ppl'])} "
                   f"(DSA {rel(dsa['wikitext_ppl'], rr['wikitext_ppl'])}).")
        pop = d.get("params", {}).get("population")
        if pop and data["budget"] <= pop:
            out.append(f"  Note: with a budget ({data['budget']}) no larger than the population ({pop}), DSA never "
                       "breeds: its first generation is the random search's first batch, so the two are identical "
                       "by construction. Use a budget of several generations to compare them.")
        elif pop:
            out.append(f"  DSA's first generation ({pop} programs) is identical to random search's first batch "
                       f"(same seed programs, same RNG); they differ in the remaining {max(0, data['budget'] - pop)} "
                       "evaluations.")
            later = {}
            for name, rec in (("DSA", d), ("random", r)):
                fits = sorted(h["fitness"] for h in rec.get("history", []) if h.get("generation", 0) > 0
                              and math.isfinite(h.get("fitness", math.inf)))
                if fits:
                    later[name] = (fits[len(fits) // 2], fits[0], len(fits))
            if len(later) == 2:
                out.append("  After the first generation: " + "; ".join(
                    f"{k} median fitness {cell(v[0])}, best {cell(v[1])} ({v[2]} evaluations)" for k, v in later.items())
                    + (": DSA's offspring are clearly better than random programs on the median."
                       if later["DSA"][0] < 0.9 * later["random"][0] else
                       ": medians within 10%, no clear sign at this budget that evolution beats random sampling."))
    out.append("- One search seed and one calibration draw: differences of a few percent are within what another "
               "seed could change.")
    if data["settings"]["mode"] == "cached":
        out.append("- The search fitness is a cached-mode proxy (every layer pruned from dense-input statistics) of "
                   "the final sequential prune, so its ranking can differ from the final held-out column.")
    return out


def markdown(data: dict) -> str:
    s, env = data["settings"], data["environment"]
    lines = [f"# Search benchmark: {data['model_name']}, {s['metric']} at {s['sparsity']:.0%}, "
             f"protocol {s['protocol']}, budget {data['budget']}", "",
             f"Calibration: {s['calib_name']}, {s['nsamples']} x {s['seqlen']} tokens, seed {s['calib_seed']} "
             "(the same "
             f"windows for every search and every final prune). Search fitness windows (\"held-out\"): "
             f"{s['n_heldout']} x {s['heldout_seqlen']} tokens from {s['calib_name']}, seed "
             f"{s['calib_seed'] + HELDOUT_SEED_OFFSET} (another draw than calibration). Final evaluation: "
             f"{s['eval_name']}, {cell(data.get('final', {}).get('dense', {}).get('wikitext_windows'))} windows x "
             f"{s['seqlen']} tokens, token perplexity. Search seed {s['seed']}, fitness mode {s['mode']}.", "",
             f"Machine: {machine_line(env, threads=True)}.", "",
             "Search budgets: every method gets the same number of fitness evaluations "
             f"({data['budget']}); dense and uniform baselines are evaluated outside the budget; OptiShear rounds "
             "the budget up to whole generations and its evaluations are KL divergences on calibration windows "
             "(its chosen point is then scored on the held-out windows). TPE's fitness includes its KV-cache "
             "quantisation when it searches KV bits. "
             "Parameters: " + "; ".join(
                 f"{m} {json.dumps(r.get('params', {}))}" for m, r in data.get("searches", {}).items()
                 if r.get("params"))
             + ".", ""]
    rows = []
    for key, label, ev, r in final_rows(data):
        fit = "-"
        evals = "-"
        secs = "-"
        if r is not None:
            evals = str(r.get("evaluations", "-"))
            secs = cell(r.get("bench_seconds"))
            m = key.split("/")[0]
            b = r.get("best") or {}
            if m == "optishear":
                fit = f"{cell(b.get('heldout_ppl'))} (chosen by KL {cell(b.get('kl'))})" if key.endswith("meta") else "-"
            elif m == "tpe":
                if not b.get("kv_bits"):
                    fit = cell(b.get("fitness"))
                elif key.endswith("kv"):
                    fit = cell(b.get("fitness")) + " (with KV bits)"
            else:
                fit = cell(b.get("fitness"))
        elif key in data.get("proxy", {}):
            fit = cell(data["proxy"][key])
        rows.append([label, evals, fit, cell(ev.get("heldout_ppl")), cell(ev.get("wikitext_ppl")), secs,
                     cell(ev.get("prune_s"))])
    lines += table(["allocation", "search evals", "search fitness (held-out PPL)", "held-out PPL (final prune)",
                    f"{s['eval_name']} PPL", "search time (s)", "prune time (s)"], rows)
    lines += ["", "Search fitness of uniform/OWL/AlphaPruning: their ratios scored exactly as a search candidate "
              "(same proxy), for comparison with the searches' fitness column.", ""]
    for m, r in data.get("searches", {}).items():
        if r.get("error"):
            lines.append(f"- {m}: failed: {r['error']}")
            continue
        b = r.get("best") or {}
        desc = {"dsa": f"program `{b.get('program')}` ({b.get('readable')})",
                "random": f"program `{b.get('program')}` ({b.get('readable')})",
                "tpe": f"group sparsities {[round(x, 4) for x in b.get('group_sparsity') or []]}, "
                       f"KV bits {b.get('kv_bits')} "
                       f"(KV memory {cell(b.get('kv_fraction'))} of fp16)",
                "optishear": f"meta metric {b.get('meta_metric')}"}.get(m, "")
        br = b.get("block_ratios")
        lines.append(f"- {LABELS[m]}: {desc}; block ratios "
                     f"{[round(x, 3) for x in br] if br else '-'}; {r.get('evaluations')} evaluations in "
                     f"{cell(r.get('seconds'))} s of search ({cell(r.get('bench_seconds'))} s with setup).")
    lines += ["", "## Verdict", ""] + verdict(data) + ["", "![fitness vs evaluations](search_curve.png)"]
    return document(lines)


# ----------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--protocol", choices=list(PROTOCOLS), default=None, help="default: S on CPU, P with CUDA")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--metric", default="wanda")
    ap.add_argument("--budget", type=int, default=20, help="fitness evaluations per search")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seed", type=int, default=0, help="search seed (the data draws follow the protocol's seed)")
    ap.add_argument("--population", type=int, default=8, help="DSA / random-search generation size")
    ap.add_argument("--optishear-population", type=int, default=None, help="default: prunekit's (12)")
    ap.add_argument("--tpe-no-kv", action="store_true", help="TPE searches sparsity only (no KV-cache bits)")
    ap.add_argument("--tpe-kv-budget", type=float, default=0.3, help="TPE's KV memory budget (fraction of fp16)")
    ap.add_argument("--calib", "--calib-file", dest="calib", default=None,
                    help="calibration source: c4 (protocol default), wikitext2 or a text file")
    ap.add_argument("--eval", "--eval-file", dest="eval", default="wikitext2", help="final evaluation set")
    ap.add_argument("--seqlen", type=int, help="override the protocol's seqlen")
    ap.add_argument("--nsamples", type=int, help="override the protocol's calibration windows")
    ap.add_argument("--eval-windows", type=int, help="override the protocol's evaluation windows (0: all)")
    ap.add_argument("--n-heldout", type=int, default=16)
    ap.add_argument("--heldout-seqlen", type=int, default=256)
    ap.add_argument("--mode", choices=("cached", "full"), default="cached",
                    help="search fitness: cached (dense-input statistics, fast proxy) or full (sequential prune)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=4, help="evaluation batch size")
    ap.add_argument("--no-meta", action="store_true", help="skip the final prune with OptiShear's meta metric")
    ap.add_argument("--out-dir", default="/tmp/prunekit_search", help="search checkpoints")
    ap.add_argument("--results-dir", default=str(RESULTS))
    ap.add_argument("--fresh", action="store_true", help="ignore stored results and search checkpoints")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)

    device = resolve_device(a.device).type
    pname, proto = select(a.protocol, device)
    proto.update(seqlen=a.seqlen or proto["seqlen"], nsamples=a.nsamples or proto["nsamples"],
                 calib=a.calib or proto["calib"], eval=a.eval,
                 eval_windows=proto["eval_windows"] if a.eval_windows is None else (a.eval_windows or None))
    seqlen, nsamples, calib_src, cseed, eval_windows = (proto[k] for k in ("seqlen", "nsamples", "calib", "seed",
                                                                            "eval_windows"))
    results = Path(a.results_dir)
    out_json, out_png = results / "search.json", results / "search_curve.png"

    log(f"loading {a.model}; data: calibration {nsamples} x {seqlen} from {calib_src}, eval {a.eval}")
    pm = ProtocolModel(a.model, proto, device, a.batch_size)
    model, tok, calib = pm.model, pm.tok, pm.calib
    hl = resolve_seqlen(model, None, default=a.heldout_seqlen)  # held-out windows no longer than the context
    settings = {"schema": SCHEMA, "model": a.model, "protocol": pname, "seqlen": seqlen, "nsamples": nsamples,
                "calib": calib_src, "calib_name": Path(calib_src).name, "calib_seed": cseed, "eval": a.eval,
                "eval_name": "WikiText-2" if a.eval == "wikitext2" else Path(a.eval).name,
                "eval_windows": eval_windows, "sparsity": a.sparsity, "metric": a.metric, "seed": a.seed,
                "n_heldout": a.n_heldout, "heldout_seqlen": hl, "mode": a.mode, "device": device}
    data = same_settings({} if a.fresh else load_results(out_json), {"settings": settings},
                         {"final": {}, "proxy": {}, "searches": {}})
    data.update(budget=a.budget, methods=a.methods, environment=environment(),
                model_name=NAMES.get(a.model) or slug(a.model))
    ckpt_root = Path(a.out_dir) / f"{slug(a.model)}-{pname}-{short_hash(settings)}"

    def save():
        save_results(out_json, data, markdown)
        try:
            plot(data, out_png)
        except Exception as e:  # a plotting problem must not lose the benchmark
            log(f"plot failed: {type(e).__name__}: {e}")

    heldout = calibration_windows(tok, calib_src, a.n_heldout, hl, cseed + HELDOUT_SEED_OFFSET)

    @torch.no_grad()
    def heldout_ppl() -> float:
        nll = float(nll_of_windows(model, heldout, device, batch_size=8, desc="held-out").mean())
        return math.exp(nll) if math.isfinite(nll) and nll < 700 else math.inf

    def evaluate(cfg: dict | None, kv_bits=None) -> dict:
        """Prune the dense model with ``cfg`` (None: dense), evaluate held-out and final PPL."""
        pm.dense.restore()
        rec = {}
        if cfg is not None:
            report, seconds = pm.prune({"metric": a.metric, **cfg})
            rec.update(prune_s=round(seconds, 2), overall_sparsity=report["overall_sparsity"],
                       block_sparsity=[round(b["sparsity"], 4) for b in report["blocks"]],
                       layer_ratios={l["name"]: l["target"] for l in report["layers"]})
        hooks = kv_quant_hooks(model, kv_bits) if kv_bits else []
        try:
            rec["heldout_ppl"] = heldout_ppl()
            ev = pm.evaluate()
        finally:
            for h in hooks:
                h.remove()
        rec.update(wikitext_ppl=ev["ppl"], wikitext_windows=ev["windows"], wikitext_tokens=ev["tokens"],
                   eval_s=ev["seconds"])
        if kv_bits:
            rec["kv_bits"] = list(kv_bits)
        pm.dense.restore()
        return rec

    # 1. dense and the allocator baselines, pruned for real --------------------------------------
    for k in ("dense",) + ALLOCATORS:
        if k in data["final"]:
            continue
        log(f"final: {k}")
        cfg = None if k == "dense" else {"sparsity": a.sparsity, "allocation": k}
        data["final"][k] = evaluate(cfg)
        log(f"final: {k}: held-out {data['final'][k]['heldout_ppl']:.4g}, {settings['eval_name']} "
            f"{data['final'][k]['wikitext_ppl']:.4g}")
        save()

    # 2. the allocators' ratios scored exactly like a search candidate (for the curve) -------------
    if any(k not in data["proxy"] for k in ("dense",) + ALLOCATORS):
        log(f"search fitness of uniform / OWL / AlphaPruning ({a.mode} mode, as the searches score candidates)")
        fit = Fitness(model, calib, heldout, a.metric, device, None, mode=a.mode)
        try:
            data["proxy"]["dense"] = float(fit.evaluate(None))
            for k in ALLOCATORS:
                ratios = data["final"][k]["layer_ratios"]
                data["proxy"][k] = float(fit.evaluate({n: float(ratios[n]) for n in fit.layers}))
        finally:
            fit.close()
        pm.dense.restore()
        log("proxy: " + ", ".join(f"{k} {v:.4g}" for k, v in data["proxy"].items()))
        save()

    # 3. the searches, then their best recipes pruned for real ------------------------------------
    for m in a.methods:
        params = method_params(m, a)
        r = data["searches"].get(m)
        if r is not None and (r.get("budget") != a.budget or r.get("bench_params") != params or r.get("error")):
            r = None
        if r is None:
            log(f"search: {m}, budget {a.budget}, params {params}")
            t = time.time()
            try:
                r = run_search(model, tok, m, a.budget, a.sparsity, a.metric, calib_ids=calib, heldout_ids=heldout,
                               out_dir=ckpt_root / f"{m}-{short_hash(params)}", seed=a.seed, resume=not a.fresh,
                               mode=a.mode, device=device, progress=not a.no_progress, **params)
            except (prunekit.PrunekitError, ImportError) as e:
                log(f"search {m} failed: {e}")
                data["searches"][m] = {"error": str(e), "budget": a.budget, "bench_params": params}
                pm.dense.restore()
                save()
                continue
            pm.dense.restore()
            r["bench_seconds"] = round(time.time() - t, 2)
            r["bench_params"] = params
            r["budget"] = a.budget
            r["final"] = {}
            data["searches"][m] = r
            b = r.get("best") or {}
            log(f"search: {m}: {r['evaluations']} evaluations, best fitness "
                f"{cell(b.get('fitness', b.get('heldout_ppl')))} in {r['bench_seconds']:.0f} s")
            save()
        if not r.get("best") or (m in ("dsa", "random") and not r["best"].get("program")):
            continue
        recipe = {k: v for k, v in r["recipe"].items() if k in PruneConfig.model_fields}
        recipe["metric"] = a.metric  # calib_ids are passed: the recipe's seed only seeds what the search seeded
        todo = [("recipe", recipe, None)]
        if m == "tpe" and r["recipe"].get("kv_cache_bits"):
            todo.append(("kv", recipe, r["recipe"]["kv_cache_bits"]))
        if m == "optishear" and not a.no_meta:
            name = "optishear-found"
            METRICS[name] = dataclasses.replace(meta_metric(r["best"]["meta_metric"]), name=name)
            todo.append(("meta", {**recipe, "metric": name}, None))
        for variant, cfg, kv in todo:
            if variant in r["final"]:
                continue
            log(f"final: {m} ({variant})")
            try:
                ev = evaluate(cfg, kv)
            except prunekit.PrunekitError as e:
                log(f"final {m} ({variant}) failed: {e}")
                pm.dense.restore()
                continue
            ev["config"] = cfg
            if kv:
                ev["kv_bits_short"] = f"{min(kv)}-{max(kv)} (mean {sum(kv) / len(kv):.2f})"
            r["final"][variant] = ev
            log(f"final: {m} ({variant}): held-out {ev['heldout_ppl']:.4g}, {settings['eval_name']} "
                f"{ev['wikitext_ppl']:.4g}")
            save()
    save()
    log(f"wrote {out_json}, its .md and {out_png}")
    print(out_json.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
