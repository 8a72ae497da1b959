"""Quality benchmark: perplexity after pruning (SmolLM2 by default), for many pipelines.

    python -m bench.quality                      # protocol S on CPU (P when a GPU is present)
    python -m bench.quality --suite core alloc   # pick suites; results are merged into one file
    python -m bench.quality --protocol S --device cpu --only wanda

Each run restores the dense weights, prunes with prunekit.prune, and evaluates token perplexity on the
protocol's windows (WikiText-2, or C4 for S-c4). Results are written after every run to
bench/results/quality_<protocol>.json and .md (and the index quality.md, trim_skip.md), so an interrupted
benchmark keeps what it finished; runs already present (same key, same protocol) are skipped unless --redo.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import prunekit
from prunekit.core.known_models import known_model
from prunekit.core.offload import resolve_device

from bench.lib.env import describe as machine_line
from bench.lib.env import environment
from bench.lib.models import ProtocolModel, display_name
from bench.lib.pipelines import (best_per_sparsity, describe, grid_confirm, key_of, params_words, pinned,
                                 rowwise_summary, skip_label)
from bench.lib.protocols import EVAL_SETS, PROTOCOLS, eval_set, select
from bench.lib.results import RESULTS, Runs, load_results, save_markdown, save_results
from bench.lib.tables import cell, document, table
from bench.lib.timing import PeakRSS


def suites() -> dict[str, list[dict]]:
    core = []
    for metric in ("magnitude", "wanda"):
        for s in (0.5, 0.6, 0.7):
            core.append({"metric": metric, "sparsity": s})
        for pat in ("2:4", "4:8"):
            core.append({"metric": metric, "sparsity": 0.5, "pattern": pat})
    core.append({"metric": "wanda", "sparsity": 0.5, "sequential": False})  # the Wanda paper's protocol
    allocators = ("uniform", "owl", "alphapruning", "farms", "er", "global", "mrp")
    alloc = {f"alloc{int(s * 100)}": [{"metric": "wanda", "sparsity": s, "allocation": a} for a in allocators]
             for s in (0.6, 0.7, 0.8)}
    # metrics (issue 4): every metric at 50% and 70% and 2:4, uniform; TRIM and SparseGPT reconstruction on top
    metrics = [{"metric": m, "sparsity": s} for s in (0.5, 0.7) for m in ("sparsegpt", "ria", "stade", "ace")]
    metrics += [{"metric": m, "sparsity": 0.5, "pattern": "2:4"} for m in ("sparsegpt", "ria", "stade", "ace")]
    metrics += [{"metric": "wanda", "sparsity": s, "rowwise": "trim"} for s in (0.5, 0.7)]
    metrics += [{"metric": "wanda", "sparsity": 0.7, "rowwise": "trim", "allocation": "owl"},
                {"metric": "sparsegpt", "sparsity": 0.7, "allocation": "owl"},
                {"metric": "wanda", "sparsity": 0.7, "reconstruct": "sparsegpt"}]
    extra = [{"metric": m, "sparsity": s} for m in ("sparsegpt", "ria", "stade", "ace") for s in (0.6, 0.8)]
    # grid (issue 4): the full metric x {uniform, OWL, AP} x TRIM x 5-sparsity grid is ~150 CPU runs; this is a
    # covering subset in priority order (first TRIM, then every metric at 2:4, then every metric x {uniform, AP}
    # at 70%, the level where pipelines differ most), so an interrupted run keeps the most informative rows.
    grid = [{"metric": "wanda", "sparsity": 0.7, "rowwise": "trim"},
            {"metric": "wanda", "sparsity": 0.7, "rowwise": "trim", "allocation": "alphapruning"},
            {"metric": "wanda", "sparsity": 0.5, "rowwise": "trim"},
            {"metric": "sparsegpt", "sparsity": 0.7, "allocation": "alphapruning"},
            {"metric": "wanda", "sparsity": 0.7, "rowwise": "trim", "allocation": "alphapruning",
             "reconstruct": "sparsegpt"}]
    grid += [{"metric": m, "sparsity": 0.5, "pattern": "2:4"} for m in ("sparsegpt", "ria", "stade", "ace")]
    grid += [{"metric": m, "sparsity": 0.7, "allocation": a} for a in ("uniform", "alphapruning")
             for m in ("ria", "stade", "ace")]
    grid += [{"metric": "wanda", "sparsity": 0.7, "rowwise": "trim", "allocation": "owl"},
             {"metric": "sparsegpt", "sparsity": 0.7, "allocation": "owl"}]
    # SparseGPT x allocator (issue 4's grid, the arms bench/grid.py's dense-statistics proxy cannot rank)
    sg_alloc = [{"metric": "sparsegpt", "sparsity": s, "allocation": a}
                for s, a in ((0.6, "alphapruning"), (0.8, "alphapruning"), (0.8, "uniform"), (0.6, "uniform"),
                             (0.5, "alphapruning"), (0.7, "owl"), (0.6, "owl"), (0.5, "owl"), (0.8, "owl"))]
    # SparseGPT's TRIM arm: Wanda scores, TRIM row-wise ratios, SparseGPT reconstructs the weights on that mask
    sg_trim = [{"metric": "wanda", "sparsity": s, "allocation": a, "rowwise": "trim", "reconstruct": "sparsegpt"}
               for a in ("alphapruning", "uniform", "owl") for s in (0.6, 0.8, 0.5, 0.7)]
    # ... and its twin without TRIM (Wanda's per-row mask, SparseGPT reconstruction): isolates TRIM's effect
    sg_trim += [{"metric": "wanda", "sparsity": 0.7, "allocation": a, "reconstruct": "sparsegpt"}
                for a in ("alphapruning", "uniform")]
    # TRIM kept off the MLP up/gate and attention o projections (bench/trim_diagnose.py's proxy ablation found
    # most of TRIM's end-to-end loss there), next to the full-TRIM twins
    skip = ["*.mlp.up_proj", "*.mlp.gate_proj", "*.self_attn.o_proj"]
    trim_skip = [{"metric": "wanda", "sparsity": s, "allocation": a, "rowwise": "trim", "rowwise_skip": skip}
                 for s, a in ((0.7, "uniform"), (0.7, "alphapruning"), (0.5, "uniform"))]
    trim_skip += [{"metric": "wanda", "sparsity": 0.7, "rowwise": "trim", "rowwise_skip": ["*.mlp.up_proj"]}]
    trim_skip += [{"metric": "wanda", "sparsity": 0.6, "allocation": a, "rowwise": "trim", **extra}
                  for a in ("uniform", "alphapruning") for extra in ({"rowwise_skip": skip}, {})]
    # ... the same exclusion under SparseGPT reconstruction (its TRIM arm's best cells) and at 80%
    trim_skip += [{"metric": "wanda", "sparsity": s, "allocation": a, "rowwise": "trim", "rowwise_skip": skip,
                   "reconstruct": "sparsegpt"} for s, a in ((0.5, "owl"), (0.7, "alphapruning"))]
    trim_skip += [{"metric": "wanda", "sparsity": 0.8, "allocation": "alphapruning", "rowwise": "trim",
                   "rowwise_skip": skip}]
    # ... with other score metrics, and their no-TRIM twins
    trim_skip += [{"metric": m, "sparsity": 0.7, "allocation": "uniform", "rowwise": "trim", "rowwise_skip": skip}
                  for m in ("ace", "ria")]
    trim_skip += [{"metric": m, "sparsity": 0.7, "allocation": "uniform"} for m in ("ace", "ria")]
    # held-out check of the exclusion on C4 (protocol S-c4): no TRIM / TRIM kept off up, gate, o / full TRIM
    trim_skip_c4 = [{"metric": "wanda", "sparsity": s, "allocation": a, **extra}
                    for s, a in ((0.7, "alphapruning"), (0.7, "uniform"), (0.5, "uniform"))
                    for extra in ({}, {"rowwise": "trim", "rowwise_skip": skip})]
    trim_skip_c4.insert(4, {"metric": "wanda", "sparsity": 0.7, "allocation": "alphapruning", "rowwise": "trim"})
    # TRIM scored on every calibration token (rowwise_params inputs=all, from X^T X) instead of the last token
    # of each sequence: does an objective that represents the tokens the layer serves remove TRIM's loss?
    all_tokens = {"rowwise": "trim", "rowwise_params": {"inputs": "all"}}
    # calibration-seed check of the 70% result (run with --seed 1, 2)
    trim_skip_seeds = [{"metric": "wanda", "sparsity": 0.7, "allocation": a, **extra}
                       for a in ("alphapruning", "uniform") for extra in ({}, {"rowwise": "trim", "rowwise_skip": skip})]
    # ... and of TRIM on all tokens (uniform 70%, 60% and AlphaPruning 70%, 50%; 60/50% with their no-TRIM twins)
    trim_skip_seeds += [{"metric": "wanda", "sparsity": s, "allocation": a, **extra}
                        for s, a, extra in ((0.7, "uniform", all_tokens), (0.6, "uniform", {}), (0.6, "uniform", all_tokens),
                                            (0.7, "alphapruning", all_tokens), (0.5, "uniform", {}),
                                            (0.5, "uniform", all_tokens))]
    trim_all = [{"metric": "wanda", "sparsity": s, "allocation": a, **all_tokens, **extra}
                for s, a, extra in ((0.7, "uniform", {}), (0.7, "alphapruning", {}), (0.5, "uniform", {}),
                                    (0.7, "uniform", {"rowwise_skip": skip}), (0.6, "uniform", {}),
                                    (0.7, "alphapruning", {"rowwise_skip": skip}))]
    # protocol P on a lent GPU (one short call): the brief's independent check (dense 21.98, uniform Wanda 50%
    # 53.9) and the best CPU pipelines per sparsity, in priority order
    gpu_p = [{"metric": "wanda", "sparsity": 0.5, "sequential": False}, {"metric": "wanda", "sparsity": 0.5},
             {"metric": "sparsegpt", "sparsity": 0.5}, {"metric": "wanda", "sparsity": 0.5, "pattern": "2:4"},
             {"metric": "sparsegpt", "sparsity": 0.5, "pattern": "2:4"},
             {"metric": "sparsegpt", "sparsity": 0.7, "allocation": "alphapruning"},
             {"metric": "wanda", "sparsity": 0.7, "allocation": "alphapruning"},
             {"metric": "wanda", "sparsity": 0.7}, {"metric": "sparsegpt", "sparsity": 0.7},
             {"metric": "sparsegpt", "sparsity": 0.6, "allocation": "alphapruning"},
             {"metric": "sparsegpt", "sparsity": 0.8, "allocation": "alphapruning"}]
    # protocol P on a second model (the 1.5B), in priority order: an interrupted run keeps the most telling rows
    gpu_p15 = [{"metric": "wanda", "sparsity": 0.5}, {"metric": "sparsegpt", "sparsity": 0.5},
               {"metric": "sparsegpt", "sparsity": 0.7},
               {"metric": "sparsegpt", "sparsity": 0.7, "allocation": "alphapruning"},
               {"metric": "wanda", "sparsity": 0.7}, {"metric": "wanda", "sparsity": 0.7, "allocation": "alphapruning"},
               {"metric": "sparsegpt", "sparsity": 0.5, "pattern": "2:4"},
               {"metric": "wanda", "sparsity": 0.5, "pattern": "2:4"},
               {"metric": "sparsegpt", "sparsity": 0.5, "allocation": "alphapruning"},
               {"metric": "wanda", "sparsity": 0.5, "allocation": "alphapruning"}]
    # per-row rounding: floor (the reference codes' rule) vs exact totals, where floor loses most (70%, uniform
    # and AlphaPruning), on the same commit
    rounding = [{"metric": "wanda", "sparsity": 0.7, "allocation": a, "row_rounding": r}
                for a in ("uniform", "alphapruning") for r in ("floor", "exact")]
    # across models (protocols qwen05 and smollm2-32): priority order, so an interrupted run keeps the most telling rows
    w, sg = "wanda", "sparsegpt"
    crossmodel = [{"metric": m, "sparsity": s} for s in (0.5, 0.7) for m in (w, sg)]
    crossmodel += [{"metric": m, "sparsity": 0.5, "pattern": "2:4"} for m in (w, sg)]
    crossmodel += [{"metric": w, "sparsity": 0.7, "allocation": "alphapruning"},
                   {"metric": w, "sparsity": 0.7, "allocation": "alphapruning", "allocation_params": {"eps": "auto"}},
                   {"metric": w, "sparsity": 0.7, "allocation": "owl"},
                   {"metric": sg, "sparsity": 0.7, "allocation": "alphapruning"},
                   {"metric": w, "sparsity": 0.7, "allocation": "farms"},
                   {"metric": w, "sparsity": 0.7, "allocation": "owl", "allocation_params": {"lam": "auto"}},
                   {"metric": sg, "sparsity": 0.7, "allocation": "alphapruning", "allocation_params": {"eps": "auto"}},
                   {"metric": sg, "sparsity": 0.7, "allocation": "owl"},
                   {"metric": sg, "sparsity": 0.7, "allocation": "farms"},
                   {"metric": w, "sparsity": 0.7, "allocation": "farms", "allocation_params": {"eps": "auto"}},
                   {"metric": w, "sparsity": 0.7, "rowwise": "trim"}]
    crossmodel += [{"metric": m, "sparsity": s, **pat} for m in ("ria", "ace")
                   for s, pat in ((0.5, {}), (0.7, {}), (0.5, {"pattern": "2:4"}))]
    crossmodel += [{"metric": w, "sparsity": 0.5, "rowwise": "trim"}]
    crossmodel += [{"metric": sg, "sparsity": 0.7, "allocation": a, "allocation_params": {p: "auto"}}
                   for a, p in (("farms", "eps"), ("owl", "lam"))]
    # TRIM scored on every calibration token (beats no TRIM at 70% on SmolLM2 at three seeds; the default is the
    # paper's last-token inputs)
    crossmodel += [{"metric": w, "sparsity": 0.7, "rowwise": "trim", "rowwise_params": {"inputs": "all"}}]
    # AlphaPruning's spread at 70% below its default 0.3 (on Qwen the default is worse than uniform)
    crossmodel_eps = [{"metric": w, "sparsity": 0.7, "allocation": "alphapruning", "allocation_params": {"eps": e}}
                      for e in (0.1, 0.2)]
    # the same allocations evaluated on C4 (protocol qwen05-c4): does the evaluation text decide for or against them?
    crossmodel_domain = [{"metric": w, "sparsity": 0.7}, {"metric": w, "sparsity": 0.7, "allocation": "alphapruning"},
                         {"metric": w, "sparsity": 0.7, "allocation": "alphapruning", "allocation_params": {"eps": 0.2}}]
    # ATP's beta chosen by auto on both models (0.01), fixed, for the other calibration seed (--seed 1)
    crossmodel_atp = [{"metric": w, "sparsity": 0.7, "allocation": "atp", "allocation_params": {"beta": 0.01}}]
    # SparseGPT with ten times the damping (on Qwen its default 0.01 loses to Wanda at 50 / 70%)
    crossmodel_damp = [{"metric": "sparsegpt", "sparsity": 0.5, "metric_params": {"percdamp": 0.1}}]
    # the 70% rows again at another calibration seed (--seed 1)
    crossmodel_seeds = [r for r in crossmodel if r["sparsity"] == 0.7]
    return {"crossmodel": crossmodel, "crossmodel-seeds": crossmodel_seeds, "crossmodel-eps": crossmodel_eps,
            "crossmodel-domain": crossmodel_domain, "crossmodel-atp": crossmodel_atp,
            "crossmodel-damp": crossmodel_damp, "core": core, "gpu-p": gpu_p, "gpu-p15": gpu_p15, "rounding": rounding, **alloc, "alloc": [r for v in alloc.values() for r in v],
            "metrics": metrics,
            "metrics-extra": extra, "grid": grid, "grid-confirm": grid_confirm(), "sparsegpt-alloc": sg_alloc,
            "sparsegpt-trim": sg_trim, "trim-skip": trim_skip,
            "trim-skip-c4": trim_skip_c4, "trim-skip-seeds": trim_skip_seeds, "trim-all": trim_all}


def new_method_suites() -> dict[str, list[dict]]:
    """Issue 22 ("beyond SparseGPT"): the ADMM weight update, ALPS, mask refinement (DSnoT, swaps) and ATP, alone
    and with the allocators, in priority order (the 70% headline and 2:4 first)."""
    sg, ap, w = "sparsegpt", "alphapruning", "wanda"
    # the reference every new pipeline is measured against, also at calibration seeds 1 and 2
    baselines = [{"metric": sg, "sparsity": 0.7, "allocation": ap}, {"metric": sg, "sparsity": 0.5, "pattern": "2:4"},
                 {"metric": sg, "sparsity": 0.5}]
    admm, swaps, dsnot = {"reconstruct": "admm"}, {"refine": "swaps"}, {"refine": "dsnot"}
    # 70%: each part with AlphaPruning (the best allocator at 60-80% so far), then alone (uniform)
    at70 = [{"metric": "alps", "allocation": ap}, {"metric": w, "allocation": ap, **admm},
            {"metric": "admm", "allocation": ap}, {"metric": w, "allocation": ap, **swaps, **admm},
            {"metric": "alps"}, {"metric": w, **admm}, {"metric": "admm"},
            {"metric": sg, "allocation": "atp"}, {"metric": "alps", "allocation": "atp"},
            {"metric": w, **swaps}, {"metric": w, **dsnot}, {"metric": w, "allocation": ap, **dsnot, **admm},
            {"metric": w, "allocation": "atp"}, {"metric": w, "allocation": "atp", "allocation_params": {"beta": "auto"}}]
    at70 = [{"sparsity": 0.7, **r} for r in at70]
    # 2:4: the solvers alone and the refiners before the ADMM update
    nm = [{"metric": "alps"}, {"metric": w, **admm}, {"metric": "admm"}, {"metric": w, **swaps, **admm},
          {"metric": w, **swaps}, {"metric": w, **dsnot}, {"metric": w, **dsnot, **admm}]
    nm = [{"sparsity": 0.5, "pattern": "2:4", **r} for r in nm]
    # the other levels: ALPS with and without AlphaPruning, the ADMM update on Wanda's mask
    levels = [{"sparsity": sp, **r} for sp in (0.5, 0.6, 0.8)
              for r in ({"metric": "alps"}, {"metric": "alps", "allocation": ap}, {"metric": w, **admm},
                        {"metric": w, "allocation": ap, **admm})]
    # the 70% headline at calibration seeds 1 and 2 (run with --seed 1, --seed 2), with its SparseGPT reference
    seeds = [{"metric": sg, "sparsity": 0.7, "allocation": ap}, {"metric": "alps", "sparsity": 0.7, "allocation": ap}]
    # ALPS's final B: the public code's (keep_b, a second (out, in) matrix) against one more B-step (the default)
    # DSnoT on which layers: the public code's default (attention only) against every layer, at 50% and 70%
    dsnot_layers = [{"metric": w, "sparsity": sp, **dsnot, **p} for sp in (0.7, 0.5)
                    for p in ({"refine_params": {"skip": []}}, {})]
    return {"beyond-baselines": baselines, "beyond-70": at70, "beyond-24": nm, "beyond-levels": levels,
            "beyond-seeds": seeds, "beyond-dsnot": dsnot_layers,
            "beyond-alps-final": [{"metric": "alps", "sparsity": 0.7, "metric_params": {"keep_b": True}}]}


def all_suites() -> dict[str, list[dict]]:
    return {**suites(), **new_method_suites()}


# why a protocol has the size it has (printed under its description)
WHY = {"qwen05": "Windows chosen for this 2-core CPU: half of protocol S's calibration and evaluation windows, so that one "
                 "pipeline on the 630 M-parameter model (4.7x SmolLM2) takes 2-12 minutes here. Compare pipelines within "
                 "this file, not with SmolLM2's protocol S.",
       "qwen05-c4": "qwen05's windows, evaluated on 32 C4 windows held out from calibration (as S-c4 for SmolLM2)."}


def markdown(data: dict) -> str:
    """quality_<protocol>.md: every run, then the best pipeline per sparsity."""
    p = data["protocol"]
    env = data["environment"]
    ev_name, evaluation = EVAL_SETS[eval_set(p)]
    model = data.get("model", "smollm2")  # files without the key were all made on SmolLM2
    why = WHY.get(data["protocol_name"].split("-seed")[0])  # a seed's file shares its protocol's reason
    lines = [f"# Quality benchmark: {display_name(model)}, protocol {data['protocol_name']}", "",
             f"Calibration: {p['calib']} (offline mirror: C4 validation documents after the first 1,100), "
             f"{p['nsamples']} x {p['seqlen']} tokens, seed {p['seed']}. Evaluation: {evaluation}, "
             f"{data['dense']['windows']} windows x {p['seqlen']} tokens "
             f"= {data['dense']['tokens']} tokens, token perplexity (paper convention).", "",
             *([why, ""] if why else []),
             f"Machine: {machine_line(env)}.", "",
             f"Dense perplexity: **{data['dense']['ppl']:.3f}**. Prune times are wall times "
             + ("on the GPU (one process, nothing else running)" if env.get("gpu") else
                "on a 2-core machine that other work shared during this benchmark")
             + "; isolated timings are in speed.md. Unless noted, the "
             "engine is sequential (each layer's statistics from inputs after the earlier layers of its block "
             "were pruned).", ""]
    rows = []
    for k, r in sorted(data["runs"].items(), key=lambda kv: (kv[1]["config"]["metric"], kv[1]["config"].get("pattern", "u"),
                                                               kv[1]["config"]["sparsity"], kv[0])):
        c = r["config"]
        notes = ", ".join(x for x in ("dense-block stats (Wanda paper)" if c.get("sequential") is False else "",
                                       f"rowwise {c['rowwise']}{skip_label(c, ' ')}" if c.get("rowwise") else "",
                                       f"refine {c['refine']}{params_words(c.get('refine_params'))}"
                                       if c.get("refine") else "",
                                       f"reconstruct {c['reconstruct']}{params_words(c.get('reconstruct_params'))}"
                                       if c.get("reconstruct") else "",
                                       f"row_rounding {c['row_rounding']} (achieved {r['overall_sparsity']:.5f})"
                                       if c.get("row_rounding") else "") if x)
        granularity = f" ({r['granularity']})" if r.get("granularity") else ""
        rows.append([c["metric"] + params_words(c.get("metric_params")), f"{c['sparsity']:.2f}",
                     c.get("pattern", "unstructured"),
                     c.get("allocation", "uniform") + params_words(c.get("allocation_params")) + granularity, notes,
                     f"{r['ppl']:.3f}", f"{r['prune_s']:.1f}", cell(r.get("peak_rss_gib"), ".2f")])
    lines += table(["metric", "sparsity", "pattern", "allocation", "notes", f"{ev_name} PPL", "prune time (s)",
                    "peak RSS (GiB)"], rows)
    lines += ["", "## Best pipeline per sparsity", "",
              f"Lowest {ev_name} perplexity among the runs above, per sparsity and pattern (only what was run: see "
              "the table for which combinations were).", ""]
    lines += table(["sparsity", "pattern", "best pipeline", "PPL", "runs compared"],
                   [[f"{sp:.2f}", pat, describe(r["config"]), f"{r['ppl']:.3f}", n]
                    for (sp, pat), (k, r, n) in sorted(best_per_sparsity(data).items())])
    return document(lines)


def trim_skip_report() -> str:
    """trim_skip.md: every run with a ``rowwise_skip`` next to its twins without TRIM and with full TRIM (same
    protocol file, so same calibration seed and evaluation set, and same TRIM inputs); then every TRIM run on
    all calibration tokens (``inputs=all``) next to its no-TRIM and paper-TRIM twins. A twin that was not run
    shows '-'."""
    fmt = lambda v: cell(v, ".2f")  # noqa: E731
    change = lambda v, ref: "-" if ref is None else f"{100 * (v / ref - 1):+.1f}%"  # noqa: E731
    tables = {"skip": [], "all": []}
    for f in sorted(RESULTS.glob("quality_*.json")):
        d = load_results(f)
        runs, p = d.get("runs", {}), d.get("protocol", {})
        for _, r in sorted(runs.items(), key=lambda kr: (kr[1]["config"]["sparsity"], kr[0])):
            c = r["config"]
            inputs = c.get("rowwise_params", {}).get("inputs", "last")
            if not c.get("rowwise_skip") and inputs != "all":
                continue
            base = {x: v for x, v in c.items() if x not in ("rowwise", "rowwise_skip", "rowwise_params")}
            ppl = lambda cfg: runs.get(key_of(cfg), {}).get("ppl")  # noqa: E731
            none = ppl(base)
            head = [d["protocol_name"], eval_set(p), p["seed"], c["metric"], f"{c['sparsity']:.2f}",
                    c.get("allocation", "uniform"), c.get("reconstruct") or "-"]
            if c.get("rowwise_skip"):
                full = ppl({x: v for x, v in c.items() if x != "rowwise_skip"})
                tables["skip"].append(head + [inputs, skip_label(c, "").removeprefix("skip="), fmt(none), fmt(full),
                                              fmt(r["ppl"]), change(r["ppl"], none)])
            else:
                paper = {**base, "rowwise": c["rowwise"]}
                skip = [v["ppl"] for v in runs.values() if v["config"].get("rowwise_skip")
                        and key_of({**paper, "rowwise_skip": v["config"]["rowwise_skip"]}) == key_of(v["config"])]
                tables["all"].append(head + [fmt(none), fmt(ppl(paper)), fmt(min(skip) if skip else None),
                                             fmt(r["ppl"]), change(r["ppl"], none)])
    head = ["protocol", "eval", "seed", "metric", "sparsity", "allocation", "reconstruct"]
    lines = ["# TRIM variants: kept off some layers (`rowwise_skip`), scored on all tokens (`inputs=all`)", "",
             "Each row: one protocol file (calibration seed, evaluation set). 'change' is vs no TRIM. "
             "Generated by `python -m bench.quality` from the quality_*.json files.", "",
             "## TRIM kept off some layers", ""]
    lines += table(head + ["TRIM inputs", "skipped", "no TRIM", "full TRIM", "TRIM skip", "change"], tables["skip"])
    lines += ["", "## TRIM scored on every calibration token (`--rowwise-param inputs=all`)", "",
              "'TRIM (paper)' = last token of each sequence; 'paper, skip' = its best run with TRIM kept off some "
              "layers (table above).", ""]
    lines += table(head + ["no TRIM", "TRIM (paper)", "paper, skip", "TRIM all tokens", "change"], tables["all"])
    return document(lines)


def write_index() -> None:
    """quality.json / quality.md: one index over the protocols' files, with the best pipeline per sparsity;
    and trim_skip.md, made from the same files."""
    index = {}
    for f in sorted(RESULTS.glob("quality_*.json")):
        d = load_results(f)
        if not d.get("runs"):
            continue
        index[d["protocol_name"]] = {
            "file": f.name, "protocol": d["protocol"], "dense_ppl": d.get("dense", {}).get("ppl"),
            "runs": len(d["runs"]),
            "best": [{"sparsity": sp, "pattern": pat, "pipeline": describe(r["config"]), "ppl": r["ppl"], "key": k}
                     for (sp, pat), (k, r, n) in sorted(best_per_sparsity(d).items())]}
    save_results(RESULTS / "quality.json", index, index_markdown)
    save_markdown(RESULTS / "trim_skip.md", trim_skip_report())


def index_markdown(index: dict) -> str:
    tables_ = [Path(v["file"]).with_suffix(".md").name for v in index.values()]
    lines = ["# Quality benchmark index", "", "Full tables: " + ", ".join(f"[{t}]({t})" for t in tables_), ""]
    for name, v in index.items():
        lines += [f"## Protocol {name}: " + ", ".join(f"{k} {x}" for k, x in v["protocol"].items()), "",
                  f"Dense PPL {v['dense_ppl']:.3f}; {v['runs']} runs.", ""]
        lines += table(["sparsity", "pattern", "best pipeline", "PPL"],
                       [[f"{b['sparsity']:.2f}", b["pattern"], b["pipeline"], f"{b['ppl']:.3f}"] for b in v["best"]])
        lines.append("")
    return document(lines)


def _is_gguf_of(path: str, name: str) -> bool:
    """Whether ``path`` is the known model ``name``'s GGUF file (a device machine gets the file, not the wheels)."""
    km = known_model(name)
    return km is not None and Path(path).name == km.gguf and Path(path).is_file()


def only_matches(only: str, key: str) -> bool:
    """--only: a substring of the run key, or the whole key when it ends with '$'."""
    return key == only[:-1] if only.endswith("$") else only in key


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--protocol", choices=list(PROTOCOLS), default=None)
    ap.add_argument("--suite", nargs="*", default=["core"], choices=list(all_suites()))
    ap.add_argument("--only", help="substring filter on run keys; a whole key when it ends with $")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--redo", action="store_true")
    ap.add_argument("--seed", type=int, help="calibration seed other than the protocol's (results in "
                    "quality_<protocol>-seed<N>.json)")
    ap.add_argument("--model", default=None, help="default: the protocol's model, else smollm2")
    a = ap.parse_args(argv)
    device = resolve_device(a.device).type
    pname, proto = select(a.protocol, device)
    if a.model and proto.get("model") and a.model != proto["model"] and not _is_gguf_of(a.model, proto["model"]):
        ap.error(f"protocol {pname} is for {proto['model']}; leave --model out (or give its GGUF file)")
    model = a.model or proto.get("model", "smollm2")
    if a.seed is not None and a.seed != proto["seed"]:  # another calibration draw: its own results file
        proto, pname = {**proto, "seed": a.seed}, f"{pname}-seed{a.seed}"
    file = Runs(RESULTS / f"quality_{pname}.json", {"protocol_name": pname, "protocol": proto}, a.redo, markdown)
    file.data.update(environment=environment(), model=model)

    pm = ProtocolModel(model, proto, device)
    if "dense" not in file.data:
        file.data["dense"] = pm.evaluate()
        file.save()
    print(f"dense: {file.data['dense']['ppl']:.3f}", flush=True)
    runs = list({key_of(r): r for s in a.suite for r in all_suites()[s]}.values())  # a run in two suites runs once
    for run in runs:
        key = key_of(run)
        if (a.only and not only_matches(a.only, key)) or not file.todo(key):
            continue
        try:
            with PeakRSS() as mem:
                report, prune_s = pm.prune(run)
        except prunekit.PrunekitError as e:
            print(f"{key}: skipped ({e})", flush=True)
            continue
        ev = pm.evaluate()
        rec = {"config": pinned(run), "ppl": ev["ppl"], "prune_s": round(prune_s, 2),
               "peak_rss_gib": round(mem.peak, 2),
               "overall_sparsity": report["overall_sparsity"], "granularity": report["method"]["granularity"],
               "block_sparsity": [round(b["sparsity"], 4) for b in report["blocks"]],
               # per run: the file's "environment" is the last invocation's
               "git": file.data["environment"].get("git"), "date": file.data["environment"].get("date")}
        auto = (report.get("allocation") or {}).get("auto")
        if auto:  # the values `auto` chose and the proxy's trials
            rec["auto"] = {"chosen": auto["chosen"], "trials": auto["trials"]}
        rw = rowwise_summary(report["layers"])
        if rw:
            rec["rowwise"] = rw
        print(f"{key}: ppl {ev['ppl']:.3f}  prune {prune_s:.1f}s", flush=True)
        file.add(key, rec)
        write_index()
    file.save()
    write_index()


if __name__ == "__main__":
    main()
