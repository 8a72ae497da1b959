"""Issue 4's pipeline grid on SmolLM2: every metric x {uniform, OWL, AlphaPruning} x {with, without TRIM}
at 50/60/70/80% unstructured, and every metric at 2:4 (SparseGPT's arms: see ``grid_runs``).

    python -m bench.grid                  # protocol G: cached dense statistics, 16 evaluation windows
    python -m bench.grid --eval-windows 32 --only 0.70
    python -m bench.grid --model stories260K --nsamples 8 --seqlen 128 --eval-windows 2 \
        --only 0.70/unstructured/uniform --out /tmp/grid_check      # a quick check of the script

Protocol S (bench.quality) prunes each pipeline with prunekit.prune: a full sequential calibration pass
per run (~1-4 min on this CPU) plus a 64-window evaluation (~80 s), so 150 runs do not fit a CPU session.
Protocol G is a screening proxy that makes the whole grid affordable:
  - the calibration statistics of every prunable layer (input norms/means, Hessian, TRIM's last-token
    inputs) are gathered ONCE from the *dense* model (the same 64 x 512 C4 windows as protocol S);
    each pipeline then prunes every layer from these statistics (no forward pass), so layers see dense
    inputs instead of the outputs of already-pruned layers (the "cached" proxy of the search cost model;
    :class:`bench.lib.dense_stats.DenseStats`);
  - OWL's outlier ratios are computed from the same dense statistics;
  - perplexity on the first ``--eval-windows`` WikiText-2 windows of protocol S (default 16 = 8,192 tokens).
Absolute numbers are therefore not protocol S numbers; pipelines are compared on identical statistics
and identical windows. The best pipelines per sparsity are then re-run under protocol S with
``python -m bench.quality --suite grid-confirm`` to check that the ranking holds.

Pairings that have no meaning are not run, and said so in the report: TRIM re-allocates sparsity across
the rows of a layer, which an N:M pattern fixes (every group of M keeps N), so 2:4 runs have no TRIM arm;
an allocator changes per-layer ratios, which 2:4 also fixes. SparseGPT chooses its own mask; its TRIM arm is
TRIM's row allocation on Wanda scores with SparseGPT's OBS weight reconstruction on that mask
(``reconstruct='sparsegpt'``).

Per-row counts follow the engine's ``row_rounding`` (a run's ``row_rounding`` key; default exact, see
:func:`prunekit.core.masks.row_counts`); runs stored without the key may have floored every row (the rule of
the version that made them).

Results: bench/results/grid_G.json (+ .md), written after every pipeline; an interrupted run resumes.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

from prunekit.core.offload import resolve_device

from bench.lib.dense_stats import DenseStats
from bench.lib.env import describe as machine_line
from bench.lib.env import environment
from bench.lib.models import Evaluation, calibration, load
from bench.lib.pipelines import by_level, describe, grid_confirm, key_of, pinned, rowwise_summary
from bench.lib.protocols import PROTOCOLS
from bench.lib.results import RESULTS, Runs, load_results
from bench.lib.tables import cell, document, table


MASK_METRICS = ("magnitude", "wanda", "ria", "stade", "ace")
ALLOCATORS = ("uniform", "owl", "alphapruning")
SPARSITIES = (0.5, 0.6, 0.7, 0.8)


def grid_runs(reconstruct_levels=(0.7,)) -> list[dict]:
    """The pipelines, 70% first (where pipelines differ most), then 50, 60, 80, then 2:4.

    SparseGPT's arms (its own solve, and TRIM mask + SparseGPT reconstruction) run here only at
    ``reconstruct_levels``: the proxy's dense statistics mislead weight reconstruction far more than they
    mislead a mask (grid_G.md compares SparseGPT and Wanda here and under protocol S), so SparseGPT x
    allocator is measured under protocol S instead (``python -m bench.quality --suite sparsegpt-alloc``)."""
    runs = []
    for s in (0.7, 0.5, 0.6, 0.8):
        for a in ALLOCATORS:
            for m in MASK_METRICS:
                runs.append({"metric": m, "sparsity": s, "allocation": a})
                runs.append({"metric": m, "sparsity": s, "allocation": a, "rowwise": "trim"})
            if s in reconstruct_levels:
                runs.append({"metric": "sparsegpt", "sparsity": s, "allocation": a})
                runs.append({"metric": "wanda", "sparsity": s, "allocation": a, "rowwise": "trim",
                             "reconstruct": "sparsegpt"})  # SparseGPT's TRIM arm
    runs += [{"metric": m, "sparsity": 0.5, "pattern": "2:4"} for m in (*MASK_METRICS, "sparsegpt")]
    return runs


def trim_input_runs() -> list[dict]:
    """Does TRIM lose because 64 last-token inputs are too few (the paper uses 256 samples)? The same
    pipelines with X from k positions per calibration sequence (k x 64 rows), outside the 150-run grid."""
    return [{"metric": "wanda", "sparsity": s, "allocation": a, "rowwise": "trim", "rowwise_params": {"tokens_per_sample": k}}
            for k in (4, 8) for s, a in ((0.7, "uniform"), (0.7, "alphapruning"), (0.5, "uniform"))]


def arm(run: dict) -> tuple[str, bool]:
    """(metric family, with TRIM): the TRIM-mask + SparseGPT-reconstruction run is SparseGPT's TRIM arm."""
    if run.get("reconstruct") == "sparsegpt":
        return "sparsegpt", bool(run.get("rowwise"))
    return run["metric"], bool(run.get("rowwise"))


def mask_only(run: dict) -> bool:
    """No weight reconstruction (neither SparseGPT's own solve nor a SparseGPT arm on another mask)."""
    return arm(run)[0] != "sparsegpt"


def fmt(v) -> str:
    return cell(v, ".1f" if v is not None and v < 1e4 else ".3g")


def report_tables(data: dict) -> str:
    runs = {k: r for k, r in data["runs"].items() if not r["config"].get("rowwise_params")}  # the 150-run grid
    p = data["protocol"]
    lines = [f"# Pipeline grid (issue 4): {data['model']}, protocol G (screening proxy)", "",
             f"Calibration statistics gathered once from the dense model: {p['calib']} {p['nsamples']} x {p['seqlen']} "
             f"tokens, seed {p['seed']} (the windows of protocol S), {data['stats_s']:.0f} s. Every pipeline prunes each "
             "layer from these dense statistics (no sequential propagation). Evaluation: WikiText-2 token perplexity "
             f"on the first {p['eval_windows']} windows x {p['seqlen']} tokens. Dense: **{data['dense']['ppl']:.3f}**.",
             "", f"Machine: {machine_line(data['environment'])}.", "",
             "Not run, by construction: TRIM and allocators at 2:4 (the pattern fixes every row's and layer's "
             "ratio). SparseGPT's TRIM arm = TRIM rows on Wanda scores + SparseGPT reconstruction; SparseGPT's arms "
             "run here only at 70% (dense statistics mislead weight reconstruction: see the protocol S table at the "
             "end). STADE's bias compensation also uses dense input means here.", ""]
    # unstructured runs by (sparsity, allocation, metric family, with TRIM)
    cell_of = {(r["config"]["sparsity"], r["config"].get("allocation", "uniform"), *arm(r["config"])): r
               for r in runs.values() if "pattern" not in r["config"]}
    for s in SPARSITIES:
        lines += [f"## {int(s * 100)}% unstructured", ""]
        lines += table(["metric"] + [f"{a}{t}" for a in ALLOCATORS for t in ("", " + TRIM")],
                       [[m] + [fmt(cell_of.get((s, a, m, t), {}).get("ppl")) for a in ALLOCATORS for t in (False, True)]
                        for m in (*MASK_METRICS, "sparsegpt")])
        lines.append("")
    lines += ["## 2:4", ""]
    lines += table(["metric", "PPL"], [[m, fmt(runs.get(key_of({"metric": m, "sparsity": 0.5, "pattern": "2:4"}), {})
                                               .get("ppl"))] for m in (*MASK_METRICS, "sparsegpt")])
    lines += ["", "## Best pipeline per sparsity (this proxy)", "",
              "Mask-only pipelines (no weight reconstruction) are ranked on equal terms here; SparseGPT's arms "
              "(70% and 2:4 only) are shown apart because the proxy misleads reconstruction (protocol S table below).",
              ""]
    rows = []
    for (sp, pat), krs in sorted(by_level(runs).items()):
        rs = [r for _, r in krs]
        masks = [r for r in rs if mask_only(r["config"])]
        sg = [r for r in rs if not mask_only(r["config"])]
        b = min(masks, key=lambda r: r["ppl"]) if masks else None
        s_ = min(sg, key=lambda r: r["ppl"]) if sg else None
        rows.append([f"{sp:.2f}", pat, describe(b["config"]) if b else "-", fmt(b and b["ppl"]), len(masks),
                     describe(s_["config"]) if s_ else "-", fmt(s_ and s_["ppl"])])
    lines += table(["sparsity", "pattern", "best mask-only pipeline", "PPL", "runs compared", "best SparseGPT arm",
                    "PPL"], rows)
    # does TRIM help? paired comparison, same metric / allocator / sparsity
    lines += ["", "## TRIM: paired effect", "",
              "log(PPL with TRIM / PPL without), same metric, allocator and sparsity (negative = TRIM better).", ""]
    rows = []
    for s in SPARSITIES:
        pairs, gains = [], []
        for (s_, a, m, t), r in cell_of.items():
            if s_ != s or not t:
                continue
            base = cell_of.get((s, a, m, False))
            if base and math.isfinite(r["ppl"]) and math.isfinite(base["ppl"]):
                pairs.append(math.log(r["ppl"] / base["ppl"]))
            if r.get("rowwise"):
                gains.append(r["rowwise"]["mean_cos_gain"])
        if pairs:
            g = f"{sum(gains) / len(gains):.2e}" if gains else "-"
            rows.append([f"{s:.2f}", len(pairs), sum(x < 0 for x in pairs), f"{statistics.median(pairs):+.3f}", g])
    lines += table(["sparsity", "pairs", "TRIM better", "median log ratio",
                    "mean layer cosine gain (TRIM objective)"], rows)
    lines += protocol_s_tables(runs)
    lines += trim_inputs_table(data)
    return document(lines)


def protocol_s_tables(runs: dict) -> list[str]:
    """SparseGPT x allocator measured under protocol S (the proxy misleads reconstruction), and the proxy's
    top pipelines per level re-run under protocol S."""
    S = load_results(RESULTS / "quality_S.json").get("runs", {})
    if not S:
        return []
    ppl_S = lambda c: S.get(key_of(c), {}).get("ppl")  # noqa: E731
    lines = ["", "## SparseGPT x allocator, protocol S (sequential calibration, 64 evaluation windows)", "",
             "Dense statistics mislead weight reconstruction (SparseGPT 70% uniform: "
             f"{fmt(runs.get(key_of({'metric': 'sparsegpt', 'sparsity': 0.7, 'allocation': 'uniform'}), {}).get('ppl'))} "
             f"here vs {fmt(ppl_S({'metric': 'sparsegpt', 'sparsity': 0.7}))} under "
             "protocol S), so SparseGPT's allocator arms are measured with `python -m bench.quality --suite "
             "sparsegpt-alloc` (protocol S: not comparable with the tables above; Wanda for reference).", "",
             "SparseGPT + TRIM = TRIM's rows on Wanda scores, SparseGPT reconstruction on that mask "
             "(`--suite sparsegpt-trim`).", ""]
    sg_trim = {"metric": "wanda", "rowwise": "trim", "reconstruct": "sparsegpt"}
    arms = ({"metric": "sparsegpt"}, sg_trim, {"metric": "wanda"})
    lines += table(["sparsity"] + [f"{m} {a}" for m in ("sparsegpt", "sparsegpt + TRIM", "wanda") for a in ALLOCATORS],
                   [[f"{s:.2f}"] + [fmt(ppl_S({**c, "sparsity": s, "allocation": a})) for c in arms for a in ALLOCATORS]
                    for s in SPARSITIES])
    twins = [(s, a, S[key_of(c)]["ppl"], ppl_S({**c, "rowwise": "trim"}))
             for s in SPARSITIES for a in ALLOCATORS
             if key_of(c := {"metric": "wanda", "sparsity": s, "allocation": a, "reconstruct": "sparsegpt"}) in S]
    if twins:
        lines += ["", "TRIM's effect under reconstruction (Wanda mask + SparseGPT weights, without / with TRIM): "
                  + "; ".join(f"{s:.0%} {a} {fmt(p0)} / {fmt(p1)}" for s, a, p0, p1 in twins) + "."]
    # does the proxy's ranking hold? its top pipelines per level, re-run under protocol S
    confirm = sorted((c for c in grid_confirm(runs=runs) if key_of(c) in S),
                     key=lambda c: (c.get("pattern", "unstructured"), c["sparsity"]))
    if confirm:
        lines += ["", "## Proxy vs protocol S: the proxy's top-2 per level re-run (`--suite grid-confirm`)", "",
                  f"Protocol S has {len(S)} runs in all (bench/results/quality_S.md); the last columns name the "
                  "best of them at the same level, mask-only and overall.", ""]
        s_levels = by_level(S)
        rows = []
        for c in confirm:
            level = (c["sparsity"], c.get("pattern", "unstructured"))
            rs = [r for _, r in s_levels[level]]
            best = min(rs, key=lambda r: r["ppl"])
            mask = min((r for r in rs if mask_only(r["config"])), key=lambda r: r["ppl"])
            rows.append([f"{c['sparsity']:.2f}", level[1], describe(c), fmt(runs[key_of(c)]["ppl"]),
                         fmt(S[key_of(c)]["ppl"]), describe(mask["config"]), fmt(mask["ppl"]),
                         describe(best["config"]), fmt(best["ppl"])])
        lines += table(["sparsity", "pattern", "pipeline", "PPL here (G)", "PPL protocol S", "best mask-only S run",
                        "PPL", "best S run", "PPL"], rows)
    return lines


def trim_inputs_table(data: dict) -> list[str]:
    """TRIM with more inputs (outside the grid): rows of X from k positions per calibration sequence."""
    extra = [r for r in data["runs"].values() if r["config"].get("rowwise_params")]
    if not extra:
        return []
    p = data["protocol"]
    lines = ["", "## TRIM inputs: rows of X per calibration sequence", "",
             f"Wanda scores. k = 1 is the paper's X (last token of each of the {p['nsamples']} sequences); "
             f"k = 4 / 8 take k evenly spaced positions ending at the last ({4 * p['nsamples']} / "
             f"{8 * p['nsamples']} rows). Cells: PPL (layers where TRIM beat uniform on its objective / layers).",
             ""]

    def cell_k(s, a, k):
        r = data["runs"].get(key_of({"metric": "wanda", "sparsity": s, "allocation": a, "rowwise": "trim",
                                     **({"rowwise_params": {"tokens_per_sample": k}} if k > 1 else {})}))
        if r is None:
            return "-"
        rw = r.get("rowwise")
        return fmt(r["ppl"]) + (f" ({rw['improved']}/{rw['layers']})" if rw else "")

    rows = []
    for s, a in sorted({(r["config"]["sparsity"], r["config"]["allocation"]) for r in extra}):
        base = data["runs"].get(key_of({"metric": "wanda", "sparsity": s, "allocation": a}))
        rows.append([f"{s:.2f}", a, fmt(base and base["ppl"]), cell_k(s, a, 1), cell_k(s, a, 4), cell_k(s, a, 8)])
    return lines + table(["sparsity", "allocation", "no TRIM", "k = 1", "k = 4", "k = 8"], rows)


def protocol(eval_windows: int = 16, nsamples: int | None = None, seqlen: int | None = None) -> dict:
    """Protocol G: protocol S's calibration windows (``nsamples`` x ``seqlen`` when given), statistics of the dense
    model, the first ``eval_windows`` evaluation windows."""
    base = PROTOCOLS["S"]
    return {**base, "eval_windows": eval_windows, "stats": "dense, cached", "nsamples": nsamples or base["nsamples"],
            "seqlen": seqlen or base["seqlen"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--only", help="substring filter on run keys")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--nsamples", type=int, default=None, help="calibration windows (default: protocol S's)")
    ap.add_argument("--seqlen", type=int, default=None, help="window length (default: protocol S's)")
    ap.add_argument("--out", default=None, help="result name, or a path without suffix (default grid_G)")
    ap.add_argument("--redo", action="store_true")
    a = ap.parse_args(argv)
    device = resolve_device(a.device).type
    proto = protocol(a.eval_windows, a.nsamples, a.seqlen)
    file = Runs((RESULTS / (a.out or "grid_G")).with_suffix(".json"), {"protocol": proto, "model": a.model}, a.redo,
                report_tables)
    file.data["environment"] = environment()

    model, tok = load(a.model, device=device)
    evaluate = Evaluation(tok, proto, device)
    if "dense" not in file.data:
        file.data["dense"] = evaluate(model)
    cache = DenseStats(model, calibration(tok, proto), device)
    file.data["stats_s"] = round(cache.seconds, 1)
    file.save()
    print(f"dense: {file.data['dense']['ppl']:.3f}; statistics {cache.seconds:.0f}s", flush=True)
    ratio_cache: dict = {}
    for run in grid_runs() + trim_input_runs():
        key = key_of(run)
        if (a.only and a.only not in key) or not file.todo(key):
            continue
        rk = (run.get("allocation", "uniform"), run["sparsity"])
        if rk not in ratio_cache:
            ratio_cache[rk] = cache.ratios(*rk)
        t = time.time()
        records = cache.prune(run, ratio_cache[rk])
        prune_s = time.time() - t
        ev = evaluate(model)
        pruned = sum(r["pruned"] for r in records.values())
        numel = sum(r["numel"] for r in records.values())
        rec = {"config": pinned(run), "ppl": ev["ppl"], "prune_s": round(prune_s, 2),
               "overall_sparsity": pruned / numel,
               "pattern": run.get("pattern") or "unstructured"}
        rw = rowwise_summary(list(records.values()))
        if rw:
            rec["rowwise"] = rw
        print(f"{key}: ppl {ev['ppl']:.3f}  prune {prune_s:.1f}s  sparsity {pruned / numel:.4f}", flush=True)
        file.add(key, rec)
    cache.restore()
    file.save()


if __name__ == "__main__":
    main()
