"""The report of a prune: a JSON-able dict (the source of truth, ``report.json``) and its markdown rendering."""
from __future__ import annotations

import json
from pathlib import Path

from ..core.allocation import get_allocator
from ..core.env import machine, versions
from ..core.families import is_expert
from ..core.metric import configured_metric
from ..core.refine import REFINERS
from .save import probe_ids


class Report(dict):
    """The JSON-able report; ``.masks`` holds the bit-packed prune masks (name -> uint8 tensor),
    ``.probe_ids`` the (token ids, source) of the reload probe (see :mod:`prunekit.pruning.save`) or None."""

    def __init__(self, data: dict, masks: dict | None = None, probe_ids=None):
        super().__init__(data)
        self.masks = masks or {}
        self.probe_ids = probe_ids


def experts_summary(block_layers, records: dict) -> dict | None:
    """What the report says about expert matrices (None for a model without them): how many, how many no
    calibration token reached (pruned by magnitude), and which."""
    experts = [(n, m) for d in block_layers for n, m in d.items() if is_expert(m)]
    if not experts:
        return None
    unseen = [n for n, _ in experts if records[n].get("fallback")]
    return {"matrices": len(experts), "experts_per_layer": max(m.group.num_experts for _, m in experts),
            "without_tokens": len(unseen), "without_tokens_names": unseen[:20],
            "fallback": "magnitude (per matrix)"}


def build_report(cfg, model, family, block_layers, pruner, seqlen, calib_ids, alloc_extra, cover, timing,
                 device) -> dict:
    """``cover``: :func:`prunekit.core.families.coverage` of the model (with the run's ``warning``, if any)."""
    layers = []
    for b, d in enumerate(block_layers):
        for name, module in d.items():
            rec = pruner.records[name]
            layers.append({"name": name, "block": b, "shape": rec["shape"], "target": rec["target"],
                           "sparsity": rec["pruned"] / rec["numel"], "numel": rec["numel"]})
            if "rowwise" in rec:  # e.g. TRIM: chosen lr, layer output cosine with and without it
                layers[-1]["rowwise"] = rec["rowwise"]
            if is_expert(module):
                layers[-1].update({"expert": module.expert, "tokens": rec.get("tokens"),
                                   "routing_weight": rec.get("routing_weight")})
            if rec.get("fallback"):
                layers[-1]["fallback"] = rec["fallback"]
            if "refine" in rec:  # swaps made, the refiner's objective before and after
                layers[-1]["refine"] = rec["refine"]
    blocks = []
    block_params = cover["block_params"] / max(len(cover["blocks"]), 1)
    for b in range(len(block_layers)):
        ls = [l for l in layers if l["block"] == b]
        num = sum(l["numel"] for l in ls)
        blocks.append({"block": b, "sparsity": sum(l["sparsity"] * l["numel"] for l in ls) / num if num else 0.0,
                       "numel": num, "prunable_share": cover["blocks"][b] if b < len(cover["blocks"]) else None})
    prunable = sum(l["numel"] for l in layers)
    total_params = sum(p.numel() for p in model.parameters())
    coverage = {"prunable_share_min": cover["min"], "dense_left": dict(list(cover["dense"].items())[:8]),
                "mean_block_params": round(block_params)}
    if cover.get("warning"):
        coverage["warning"] = cover["warning"]
    experts = experts_summary(block_layers, pruner.records)
    return Report({
        "model": cfg.model,
        "architecture": model.config.model_type,
        "family": family,
        "method": {"metric": cfg.metric, "pattern": cfg.pattern, "allocation": cfg.allocation,
                   "allocation_params": cfg.allocation_params,
                   "granularity": cfg.granularity or get_allocator(cfg.allocation).granularity,
                   "sequential": cfg.sequential, "rowwise": cfg.rowwise, "row_rounding": cfg.row_rounding,
                   "rowwise_params": cfg.rowwise_params, "rowwise_skip": cfg.rowwise_skip,
                   "refine": cfg.refine,
                   "refine_params": (REFINERS.get(cfg.refine).check_params(cfg.refine_params).kwargs()
                                     if cfg.refine else {}),
                   "reconstruct": cfg.reconstruct,
                   # the values used: the registered defaults with the user's settings over them
                   "metric_params": configured_metric(cfg.metric, cfg.metric_params).values,
                   "reconstruct_params": (configured_metric(cfg.reconstruct, cfg.reconstruct_params).values
                                          if cfg.reconstruct else {})},
        "target_sparsity": cfg.target(),
        "protocol": {"calib": cfg.calib if calib_ids is not None else None,
                     "nsamples": int(calib_ids.shape[0]) if calib_ids is not None else 0,
                     "seqlen": seqlen, "seed": cfg.seed, "device": str(device),
                     "dtype": str(next(model.parameters()).dtype).replace("torch.", "")},
        "params": {"total": total_params, "prunable": prunable, "block_params": cover["block_params"],
                   # the share of the blocks' parameters this run prunes over (after ignore)
                   "prunable_share": prunable / cover["block_params"] if cover["block_params"] else 0.0},
        "coverage": coverage,
        **({"experts": experts} if experts else {}),
        "overall_sparsity": sum(l["sparsity"] * l["numel"] for l in layers) / prunable if prunable else 0.0,
        "blocks": blocks,
        "layers": layers,
        "allocation": alloc_extra,
        "refine": refine_summary(layers) if cfg.refine else None,
        "timing": timing,
        "versions": versions(),
        "machine": machine(),
        "config": cfg.model_dump(),
    }, masks=pruner.masks, probe_ids=None if calib_ids is None else probe_ids(model, calib_ids))


def refine_summary(layers: list[dict]) -> dict:
    """The refiner over all layers: swaps made, rows changed, and its objective summed before and after."""
    recs = [l["refine"] for l in layers if l.get("refine")]
    return {k: sum(r.get(k, 0) for r in recs) for k in ("swaps", "rows_changed", "error_before", "error_after")}


def _fmt(x, nd=4):
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def _params(d: dict | None) -> str:
    """'k=v, k=v' for a method's parameters (in the dict's order); '' for none."""
    return ", ".join(f"{k}={v}" for k, v in (d or {}).items())


def describe_rowwise(m: dict) -> str:
    """'trim (inputs=all) except up_proj' for a report's method section ('' without a row-wise method);
    reports written before rowwise_params was recorded give just the name."""
    if not m.get("rowwise"):
        return ""
    params = _params(dict(sorted((m.get("rowwise_params") or {}).items())))
    return (m["rowwise"] + (f" ({params})" if params else "")
            + (f" except {', '.join(m['rowwise_skip'])}" if m.get("rowwise_skip") else ""))


def report_markdown(r: dict) -> str:
    m = r["method"]
    p = r["protocol"]
    mp, rp = _params(m.get("metric_params")), _params(m.get("reconstruct_params"))
    fp = _params(m.get("refine_params"))
    lines = [f"# prunekit report: {r['model']}", "",
             f"- method: metric **{m['metric']}**" + (f" ({mp})" if mp else "")
             + f", pattern {m['pattern']}, allocation {m['allocation']} "
             f"({m['granularity']}), sequential={m['sequential']}"
             + (f", rowwise {describe_rowwise(m)}" if m.get("rowwise") else "")
             + (f", mask refined by {m['refine']}" + (f" ({fp})" if fp else "") if m.get("refine") else "")
             + (f", weights reconstructed by {m['reconstruct']}" + (f" ({rp})" if rp else "") if m.get("reconstruct")
                else ""),
             f"- target sparsity {r['target_sparsity']:.4f}; achieved (in memory) {r['overall_sparsity']:.6f}"]
    if r.get("refine"):
        f = r["refine"]
        lines.append(f"- refinement: {f['swaps']:,} swaps in {f['rows_changed']:,} rows; its objective "
                     f"{f['error_before']:.6g} -> {f['error_after']:.6g} (summed over layers)")
    if "saved" in r:
        lines.append(f"- achieved (counted from the saved safetensors) **{r['saved']['overall_sparsity']:.6f}**")
    lines.append(f"- calibration: {p['calib']} x {p['nsamples']} samples x {p['seqlen']} tokens, seed {p['seed']}, "
                 f"device {p['device']}, dtype {p['dtype']}")
    par = r["params"]
    lines.append(f"- parameters: {par['total']:,} total, {par['prunable']:,} prunable"
                 + (f" ({par['prunable_share']:.1%} of the blocks' parameters)" if "prunable_share" in par else ""))
    if r.get("coverage", {}).get("warning"):
        lines.append(f"- **warning**: {r['coverage']['warning']}")
    if r.get("experts"):
        x = r["experts"]
        lines.append(f"- experts: {x['matrices']} expert matrices ({x['experts_per_layer']} experts per MoE layer), "
                     f"each pruned from the tokens routed to it; {x['without_tokens']} received no calibration token "
                     f"and were pruned by {x['fallback']}")
    alloc = r.get("allocation", {})
    if alloc.get("params"):
        lines.append(f"- allocation parameters: {_params(alloc['params'])}")
    if alloc.get("auto"):  # why these values: the trial prunes' held-out NLL per value tried
        a = alloc["auto"]
        lines.append(f"- `auto` chose {_params(a['chosen'])}; {a['proxy']}: "
                     + "; ".join(f"{_params(t['params'])}: {t['heldout_nll']:.4f}" for t in a["trials"]))
    if alloc.get("expert_removal"):
        er = alloc["expert_removal"]
        lines.append(f"- expert removal: {er['removed_per_block']} per MoE layer by {er['score']}, "
                     f"{er['experts_left']} left")
    if alloc.get("experts"):
        lines.append(f"- sparsity across experts by {alloc['experts']['score']} (eps {alloc['experts']['eps']})")
    t = r["timing"]
    lines.append("- time: " + ", ".join(f"{k} {v} s" for k, v in t.items()))
    if r.get("eval"):
        lines += ["", "## Perplexity", "", "| dataset | seqlen | windows | dense | pruned |", "|---|---|---|---|---|"]
        for name, e in r["eval"].items():
            d, pr = e["dense"], e["pruned"]
            lines.append(f"| {name} | {pr['seqlen']} | {pr['windows']} of {pr['windows_available']} | "
                         f"{d['ppl']:.3f} | {pr['ppl']:.3f} |")
        lines.append("")
        lines.append("Token perplexity, non-overlapping windows (paper convention), not lm-eval word perplexity.")
    lines += ["", "## Sparsity per block", "", "| block | sparsity | params |", "|---|---|---|"]
    lines += [f"| {b['block']} | {b['sparsity']:.4f} | {b['numel']:,} |" for b in r["blocks"]]
    lines += ["", "## Sparsity per layer", "", "| layer | shape | target | achieved |", "|---|---|---|---|"]
    lines += [f"| {l['name']} | {l['shape'][0]}x{l['shape'][1]} | {l['target']:.4f} | {l['sparsity']:.4f} |"
              for l in r["layers"]]
    v = r["versions"]
    lines += ["", "## Environment", "", ", ".join(f"{k} {val}" for k, val in v.items()),
              ", ".join(f"{k}: {val}" for k, val in r["machine"].items()), ""]
    return "\n".join(lines)


def write_report(folder: str | Path, r: dict) -> None:
    folder = Path(folder)
    (folder / "report.json").write_text(json.dumps(r, indent=2, default=str))
    (folder / "report.md").write_text(report_markdown(r))
