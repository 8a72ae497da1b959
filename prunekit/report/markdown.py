from __future__ import annotations

import json
from pathlib import Path


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
    lines = [f"# prunekit report: {r['model']}", "",
             f"- method: metric **{m['metric']}**" + (f" ({mp})" if mp else "")
             + f", pattern {m['pattern']}, allocation {m['allocation']} "
             f"({m['granularity']}), sequential={m['sequential']}"
             + (f", rowwise {describe_rowwise(m)}" if m.get("rowwise") else "")
             + (f", weights reconstructed by {m['reconstruct']}" + (f" ({rp})" if rp else "") if m.get("reconstruct")
                else ""),
             f"- target sparsity {r['target_sparsity']:.4f}; achieved (in memory) {r['overall_sparsity']:.6f}"]
    if "saved" in r:
        lines.append(f"- achieved (counted from the saved safetensors) **{r['saved']['overall_sparsity']:.6f}**")
    lines.append(f"- calibration: {p['calib']} x {p['nsamples']} samples x {p['seqlen']} tokens, seed {p['seed']}, "
                 f"device {p['device']}, dtype {p['dtype']}")
    lines.append(f"- parameters: {r['params']['total']:,} total, {r['params']['prunable']:,} prunable")
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
