"""Issue 4's pipeline grid on SmolLM2: every metric x {uniform, OWL, AlphaPruning} x {with, without TRIM}
at 50/60/70/80% unstructured, and every metric at 2:4 (SparseGPT's arms: see ``grid_runs``).

    python bench/grid.py                  # protocol G: cached dense statistics, 16 evaluation windows
    python bench/grid.py --eval-windows 32 --only 0.70

Protocol S (bench/quality.py) prunes each pipeline with prunekit.prune: a full sequential calibration pass
per run (~1-4 min on this CPU) plus a 64-window evaluation (~80 s), so 150 runs do not fit a CPU session.
Protocol G is a screening proxy that makes the whole grid affordable:
  - the calibration statistics of every prunable layer (input norms/means, Hessian, TRIM's last-token
    inputs) are gathered ONCE from the *dense* model (the same 64 x 512 C4 windows as protocol S);
    each pipeline then prunes every layer from these statistics (no forward pass), so layers see dense
    inputs instead of the outputs of already-pruned layers (the "cached" proxy of the search cost model);
  - OWL's outlier ratios are computed from the same dense statistics;
  - perplexity on the first ``--eval-windows`` WikiText-2 windows of protocol S (default 16 = 8,192 tokens).
Absolute numbers are therefore not protocol S numbers; pipelines are compared on identical statistics
and identical windows. The best pipelines per sparsity are then re-run under protocol S with
``bench/quality.py`` (suite 'grid-confirm') to check that the ranking holds.

Pairings that have no meaning are not run, and said so in the report: TRIM re-allocates sparsity across
the rows of a layer, which an N:M pattern fixes (every group of M keeps N), so 2:4 runs have no TRIM arm;
an allocator changes per-layer ratios, which 2:4 also fixes. SparseGPT chooses its own mask; its TRIM arm is
TRIM's row allocation on Wanda scores with SparseGPT's OBS weight reconstruction on that mask
(``reconstruct='sparsegpt'``).

Per-row counts follow the engine's ``row_rounding`` (a run's ``row_rounding`` key; default exact, see
:func:`prunekit.core.masks.row_counts`). The committed grid_G.json predates exact rounding: its runs floored
every row (their totals fall up to one weight per row short of the target).

Results: bench/results/grid_G.json (+ .md), written after every pipeline; an interrupted run resumes.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PROTOCOLS, RESULTS, environment, load_results, save_json  # noqa: E402
from quality import by_level, describe, grid_confirm, key_of, rowwise_summary  # noqa: E402

import prunekit  # noqa: E402
from prunekit.core.allocation import allocate, get_allocator  # noqa: E402
from prunekit.core.blocks import iterate_blocks  # noqa: E402
from prunekit.core.masks import parse_pattern  # noqa: E402
from prunekit.core.data import calibration_windows, eval_token_ids  # noqa: E402
from prunekit.evaluate.perplexity import perplexity  # noqa: E402
from prunekit.core.metric import get_metric  # noqa: E402
from prunekit.methods.wanda import wanda  # noqa: E402
from prunekit.core.families import block_linears, get_blocks, weight_view  # noqa: E402
from prunekit.pruning.allocator_inputs import _outlier_ratios  # noqa: E402
from prunekit.pruning.allocator_inputs import model_summary  # noqa: E402
from prunekit.pruning.layer_pruner import LayerPruner  # noqa: E402

MASK_METRICS = ("magnitude", "wanda", "ria", "stade", "ace")
TOKENS_PER_SAMPLE = 8  # TRIM rows gathered per calibration sequence; each run uses the subset it asks for
ALLOCATORS = ("uniform", "owl", "alphapruning")
SPARSITIES = (0.5, 0.6, 0.7, 0.8)


def grid_runs(reconstruct_levels=(0.7,)) -> list[dict]:
    """The pipelines, 70% first (where pipelines differ most), then 50, 60, 80, then 2:4.

    SparseGPT's arms (its own solve, and TRIM mask + SparseGPT reconstruction) run here only at
    ``reconstruct_levels``: the proxy's dense statistics mislead weight reconstruction (measured: SparseGPT
    70% uniform 1432 here vs 314 with sequential calibration, protocol S, while Wanda is 1088 vs 1044), so
    SparseGPT x allocator is measured under protocol S instead (bench/quality.py, suite 'sparsegpt-alloc')."""
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


class DenseStats:
    """Dense-model statistics of every prunable layer, gathered once, and the dense weights to restore."""

    def __init__(self, model, calib_ids, device, batch_size=8, tokens_per_sample=TOKENS_PER_SAMPLE):
        self.model = model
        self.blocks = get_blocks(model)
        self.block_layers = block_linears(model)
        self.layers = {n: m for d in self.block_layers for n, m in d.items()}
        self.snapshot = {n: weight_view(m).detach().clone() for n, m in self.layers.items()}
        self.biases = {n: (None if m.bias is None else m.bias.detach().clone()) for n, m in self.layers.items()}
        needs = frozenset({"sq_sum", "sum", "hessian", "last_tokens"})
        self.stats = {}
        t = time.time()
        iterate_blocks(model, self.blocks, self.block_layers, calib_ids, needs,
                       lambda name, module, st: self.stats.__setitem__(name, st), device,
                       batch_size=batch_size, sequential=False, desc="grid: dense statistics",
                       tokens_per_sample=tokens_per_sample)
        self.seconds = time.time() - t
        self.seqlen = calib_ids.shape[1]
        self.summaries: dict = {}

    @torch.no_grad()
    def restore(self) -> None:
        for n, m in self.layers.items():
            weight_view(m).copy_(self.snapshot[n])
            m.bias = None if self.biases[n] is None else torch.nn.Parameter(self.biases[n].clone())

    def outliers(self, ms=(3.0, 5.0, 7.0, 10.0)) -> dict:
        """OWL's per-block outlier ratios from the cached dense statistics (as profiles.outlier_profile)."""
        out = {float(m): [] for m in ms}
        for d in self.block_layers:
            scores = [wanda(self.snapshot[n].float(), self.stats[n]).flatten() for n in d]
            for m, v in _outlier_ratios(scores, ms).items():
                out[m].append(v)
        return out

    def ratios(self, allocation: str, target: float) -> dict[str, float]:
        alloc = get_allocator(allocation)
        if allocation not in self.summaries:  # one summary per allocator: ESD fits are cached in it
            summary = model_summary(self.block_layers)
            if "weights" in alloc.needs:
                summary.weights = {n: weight_view(m) for n, m in self.layers.items()}
            if "outliers" in alloc.needs:
                summary.outliers = self.outliers()
            self.summaries[allocation] = summary
        return allocate(allocation, self.summaries[allocation], target)

    def prune(self, run: dict, ratios: dict[str, float]) -> dict:
        """Restore the dense weights, prune every layer from the cached statistics; per-layer records."""
        self.restore()
        metric = get_metric(run["metric"])
        pruner = LayerPruner(metric, ratios, parse_pattern(run.get("pattern", "unstructured")), run.get("rowwise"),
                             run.get("rowwise_params", {}), run.get("reconstruct"),
                             row_rounding=run.get("row_rounding", "exact"))
        k = int(run.get("rowwise_params", {}).get("tokens_per_sample", 1))
        for n, m in self.layers.items():
            pruner(n, m, self.with_tokens(self.stats[n], k))
        return pruner.records

    def with_tokens(self, st, k: int):
        """A copy of ``st`` whose TRIM rows are those ``LayerStats(tokens_per_sample=k)`` would have kept
        (k's positions are a subset of the K gathered ones when k divides K)."""
        if st.tokens_per_sample == k or not st.last_tokens:
            return st
        seq = self.seqlen
        big = st.token_positions(seq)
        want = dataclasses.replace(st, tokens_per_sample=k, last_tokens=[]).token_positions(seq)
        idx = [big.index(p) for p in want]  # ValueError if not a subset
        X = st.last_token_inputs().view(-1, len(big), st.d_in)[:, idx].reshape(-1, st.d_in)
        return dataclasses.replace(st, tokens_per_sample=k, last_tokens=[X])


def report_tables(data: dict) -> str:
    runs = {k: r for k, r in data["runs"].items() if not r["config"].get("rowwise_params")}  # the 150-run grid
    p = data["protocol"]
    env = data["environment"]
    lines = [f"# Pipeline grid (issue 4): {data['model']}, protocol G (screening proxy)", "",
             f"Calibration statistics gathered once from the dense model: {p['calib']} {p['nsamples']} x {p['seqlen']} "
             f"tokens, seed {p['seed']} (the windows of protocol S), {data['stats_s']:.0f} s. Every pipeline prunes each "
             "layer from these dense statistics (no sequential propagation). Evaluation: WikiText-2 token perplexity "
             f"on the first {p['eval_windows']} windows x {p['seqlen']} tokens. Dense: **{data['dense']['ppl']:.3f}**.",
             "", f"Machine: {env['processor']}, {env['cpu_count']} CPUs, torch {env['torch']}, transformers "
             f"{env['transformers']}, prunekit {env['prunekit']} ({env.get('git', '?')}), {env['date']}.", "",
             "Not run, by construction: TRIM and allocators at 2:4 (the pattern fixes every row's and layer's "
             "ratio). SparseGPT's TRIM arm = TRIM rows on Wanda scores + SparseGPT reconstruction; SparseGPT's arms "
             "run here only at 70% (dense statistics mislead weight reconstruction: see the protocol S table at the "
             "end). STADE's bias compensation also uses dense input means here.", ""]
    fmt = lambda v: "-" if v is None else (f"{v:.1f}" if v < 1e4 else f"{v:.3g}")  # noqa: E731
    # unstructured runs by (sparsity, allocation, metric family, with TRIM)
    cell_of = {(r["config"]["sparsity"], r["config"].get("allocation", "uniform"), *arm(r["config"])): r
               for r in runs.values() if "pattern" not in r["config"]}
    for s in SPARSITIES:
        lines += [f"## {int(s * 100)}% unstructured", "",
                  "| metric | " + " | ".join(f"{a} | {a} + TRIM" for a in ALLOCATORS) + " |",
                  "|---|" + "---|" * (2 * len(ALLOCATORS))]
        for m in (*MASK_METRICS, "sparsegpt"):
            cells = [fmt(cell_of.get((s, a, m, t), {}).get("ppl")) for a in ALLOCATORS for t in (False, True)]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## 2:4", "", "| metric | PPL |", "|---|---|"]
    for m in (*MASK_METRICS, "sparsegpt"):
        r = runs.get(key_of({"metric": m, "sparsity": 0.5, "pattern": "2:4"}))
        lines.append(f"| {m} | {fmt(r and r['ppl'])} |")
    lines += ["", "## Best pipeline per sparsity (this proxy)", "",
              "Mask-only pipelines (no weight reconstruction) are ranked on equal terms here; SparseGPT's arms "
              "(70% and 2:4 only) are shown apart because the proxy misleads reconstruction (protocol S table below).", "",
              "| sparsity | pattern | best mask-only pipeline | PPL | runs compared | best SparseGPT arm | PPL |",
              "|---|---|---|---|---|---|---|"]
    for (sp, pat), krs in sorted(by_level(runs).items()):
        rs = [r for _, r in krs]
        masks = [r for r in rs if mask_only(r["config"])]
        sg = [r for r in rs if not mask_only(r["config"])]
        b = min(masks, key=lambda r: r["ppl"]) if masks else None
        s_ = min(sg, key=lambda r: r["ppl"]) if sg else None
        lines.append(f"| {sp:.2f} | {pat} | {describe(b['config']) if b else '-'} | {fmt(b and b['ppl'])} | {len(masks)} | "
                     f"{describe(s_['config']) if s_ else '-'} | {fmt(s_ and s_['ppl'])} |")
    # does TRIM help? paired comparison, same metric / allocator / sparsity
    lines += ["", "## TRIM: paired effect", "",
              "log(PPL with TRIM / PPL without), same metric, allocator and sparsity (negative = TRIM better).", "",
              "| sparsity | pairs | TRIM better | median log ratio | mean layer cosine gain (TRIM objective) |",
              "|---|---|---|---|---|"]
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
            lines.append(f"| {s:.2f} | {len(pairs)} | {sum(x < 0 for x in pairs)} | {statistics.median(pairs):+.3f} | {g} |")
    # SparseGPT x allocator: measured under protocol S (the proxy misleads reconstruction)
    S = load_results(RESULTS / "quality_S.json").get("runs", {})
    if S:
        lines += ["", "## SparseGPT x allocator, protocol S (sequential calibration, 64 evaluation windows)", "",
                  "Dense statistics mislead weight reconstruction (SparseGPT 70% uniform: "
                  f"{fmt(runs.get(key_of({'metric': 'sparsegpt', 'sparsity': 0.7, 'allocation': 'uniform'}), {}).get('ppl'))} "
                  f"here vs {fmt(S.get(key_of({'metric': 'sparsegpt', 'sparsity': 0.7}), {}).get('ppl'))} under "
                  "protocol S), so SparseGPT's allocator arms are measured with `bench/quality.py --suite "
                  "sparsegpt-alloc` (protocol S: not comparable with the tables above; Wanda for reference).", "",
                  "SparseGPT + TRIM = TRIM's rows on Wanda scores, SparseGPT reconstruction on that mask "
                  "(`--suite sparsegpt-trim`).", "",
                  "| sparsity | " + " | ".join(f"{m} {a}" for m in ("sparsegpt", "sparsegpt + TRIM", "wanda")
                                                for a in ALLOCATORS) + " |",
                  "|---|" + "---|" * 9]
        sg_trim = {"metric": "wanda", "rowwise": "trim", "reconstruct": "sparsegpt"}
        for s in SPARSITIES:
            cells = [fmt(S.get(key_of({**c, "sparsity": s, "allocation": a}), {}).get("ppl"))
                     for c in ({"metric": "sparsegpt"}, sg_trim, {"metric": "wanda"}) for a in ALLOCATORS]
            lines.append(f"| {s:.2f} | " + " | ".join(cells) + " |")
        twins = [(s, a, S[key_of(c)]["ppl"], S.get(key_of({**c, "rowwise": "trim"}), {}).get("ppl"))
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
                      "best of them at the same level, mask-only and overall.", "",
                      "| sparsity | pattern | pipeline | PPL here (G) | PPL protocol S | best mask-only S run | PPL "
                      "| best S run | PPL |", "|---|---|---|---|---|---|---|---|---|"]
            s_levels = by_level(S)
            for c in confirm:
                level = (c["sparsity"], c.get("pattern", "unstructured"))
                rs = [r for _, r in s_levels[level]]
                best = min(rs, key=lambda r: r["ppl"])
                mask = min((r for r in rs if mask_only(r["config"])), key=lambda r: r["ppl"])
                lines.append(f"| {c['sparsity']:.2f} | {level[1]} | {describe(c)} | {fmt(runs[key_of(c)]['ppl'])} | "
                             f"{fmt(S[key_of(c)]['ppl'])} | {describe(mask['config'])} | {fmt(mask['ppl'])} | "
                             f"{describe(best['config'])} | {fmt(best['ppl'])} |")
    # TRIM with more inputs (outside the grid)
    extra = [r for r in data["runs"].values() if r["config"].get("rowwise_params")]
    if extra:
        lines += ["", "## TRIM inputs: rows of X per calibration sequence", "",
                  f"Wanda scores. k = 1 is the paper's X (last token of each of the {p['nsamples']} sequences); "
                  f"k = 4 / 8 take k evenly spaced positions ending at the last ({4 * p['nsamples']} / "
                  f"{8 * p['nsamples']} rows). Cells: PPL (layers where TRIM beat uniform on its objective / layers).",
                  "",
                  "| sparsity | allocation | no TRIM | k = 1 | k = 4 | k = 8 |", "|---|---|---|---|---|---|"]
        for s, a in sorted({(r["config"]["sparsity"], r["config"]["allocation"]) for r in extra}):
            def cell(k):
                r = data["runs"].get(key_of({"metric": "wanda", "sparsity": s, "allocation": a, "rowwise": "trim",
                                             **({"rowwise_params": {"tokens_per_sample": k}} if k > 1 else {})}))
                if r is None:
                    return "-"
                rw = r.get("rowwise")
                return fmt(r["ppl"]) + (f" ({rw['improved']}/{rw['layers']})" if rw else "")
            base = data["runs"].get(key_of({"metric": "wanda", "sparsity": s, "allocation": a}))
            lines.append(f"| {s:.2f} | {a} | {fmt(base and base['ppl'])} | {cell(1)} | {cell(4)} | {cell(8)} |")
    lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--only", help="substring filter on run keys")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--nsamples", type=int, default=None, help="calibration windows (default: protocol S's)")
    ap.add_argument("--seqlen", type=int, default=None, help="window length (default: protocol S's)")
    ap.add_argument("--out", default=None, help="result name (default grid_G)")
    ap.add_argument("--redo", action="store_true")
    a = ap.parse_args(argv)
    base = PROTOCOLS["S"]
    proto = {**base, "eval_windows": a.eval_windows, "stats": "dense, cached",
             "nsamples": a.nsamples or base["nsamples"], "seqlen": a.seqlen or base["seqlen"]}
    out = RESULTS / f"{a.out or 'grid_G'}.json"
    data = load_results(out)
    if data.get("protocol") != proto or data.get("model") != a.model:
        data = {"protocol": proto, "model": a.model, "runs": {}}
    data["environment"] = environment()

    model, tok = prunekit.load_model(a.model)
    model.to(a.device).eval()
    seqlen = proto["seqlen"]
    eval_ids = eval_token_ids(tok, "wikitext2", seqlen)
    calib = calibration_windows(tok, proto["calib"], proto["nsamples"], seqlen, proto["seed"])

    def evaluate():
        return perplexity(model, tok, "wikitext2", seqlen, proto["eval_windows"], a.device, batch_size=4, ids=eval_ids)

    if "dense" not in data:
        data["dense"] = evaluate()
    cache = DenseStats(model, calib, a.device)
    data["stats_s"] = round(cache.seconds, 1)
    save_json(out, data)
    print(f"dense: {data['dense']['ppl']:.3f}; statistics {cache.seconds:.0f}s", flush=True)
    ratio_cache: dict = {}
    for run in grid_runs() + trim_input_runs():
        key = key_of(run)
        if (a.only and a.only not in key) or (key in data["runs"] and not a.redo):
            continue
        pat = run.get("pattern")
        rk = (run.get("allocation", "uniform"), run["sparsity"])
        if rk not in ratio_cache:
            ratio_cache[rk] = cache.ratios(*rk)
        t = time.time()
        records = cache.prune(run, ratio_cache[rk])
        prune_s = time.time() - t
        ev = evaluate()
        pruned = sum(r["pruned"] for r in records.values())
        numel = sum(r["numel"] for r in records.values())
        data["runs"][key] = {"config": run, "ppl": ev["ppl"], "prune_s": round(prune_s, 2),
                             "overall_sparsity": pruned / numel, "pattern": pat or "unstructured"}
        rw = rowwise_summary(list(records.values()))
        if rw:
            data["runs"][key]["rowwise"] = rw
        print(f"{key}: ppl {ev['ppl']:.3f}  prune {prune_s:.1f}s  sparsity {pruned / numel:.4f}", flush=True)
        save_json(out, data)
        out.with_suffix(".md").write_text(report_tables(data))
    cache.restore()
    out.with_suffix(".md").write_text(report_tables(data))


if __name__ == "__main__":
    main()
