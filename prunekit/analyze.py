"""`prunekit analyze`: heavy-tail (ESD) analysis of every prunable matrix, OWL outlier ratios, and the
sparsity each allocator would give, as CSV/JSON/markdown and PNG plots."""
from __future__ import annotations

import csv
import fnmatch
import json
import logging
import time
from pathlib import Path

import torch

from .core.allocation import ALLOCATORS, allocate
from .core.data import calibration_windows
from .core.esd import eigenvalues, fit_power_law, layer_alphas, spectral_stats_many
from .core.families import block_linears, get_blocks, weight_view
from .core.metric import get_metric
from .core.offload import resolve_device
from .core.outputs import atomic_dir
from .pruning.allocator_inputs import model_summary, outlier_profile, score_profile

log = logging.getLogger(__name__)

STATIC_ALLOCATORS = ("uniform", "er", "er-plus", "alphapruning", "farms")
CALIB_ALLOCATORS = ("owl", "global")


def analyze(model, tokenizer, out, target: float = 0.7, calib: str | None = "c4", nsamples: int = 16,
            seqlen: int = 256, seed: int = 0, device: str = "auto", esd_layers: list[str] | None = None,
            xmin_mode: str = "all", compat: bool = False, overwrite: bool = False, model_name: str = "",
            inputs=()) -> dict:
    t0 = time.time()
    dev = resolve_device(device)
    blocks = get_blocks(model)
    bl = block_linears(model)
    summary = model_summary(bl)
    summary.weights = {name: weight_view(m) for d in bl for name, m in d.items()}
    stats = spectral_stats_many(summary.weights, device=dev, xmin_mode=xmin_mode, compat=compat)
    farms, _ = layer_alphas(summary.layer_weights(), "farms", dev, xmin_mode, compat)
    rows = []
    for l in summary.layers:
        s = stats[l.name]
        rows.append({"name": l.name, "block": l.block, "out": l.shape[0], "in": l.shape[1],
                     "alpha": s["alpha"], "alpha_hat": s["alpha_hat"], "stable_rank": s["stable_rank"],
                     "spectral_norm": s["spectral_norm"], "xmin": s["xmin"], "ks": s["ks"],
                     "farms_alpha": farms[l.name]})
    calib_ids = None
    if calib:
        calib_ids = calibration_windows(tokenizer, calib, nsamples, seqlen, seed)
        summary.outliers = outlier_profile(model, blocks, bl, calib_ids, dev, None)
        summary.scores = score_profile(model, blocks, bl, calib_ids, get_metric("wanda"), dev, None, seed)
        for r in rows:
            r["owl_outlier_ratio_M5"] = summary.outliers[5.0][r["block"]]
    allocs = {}
    for name in STATIC_ALLOCATORS + (CALIB_ALLOCATORS if calib else ()):
        if name in ALLOCATORS:
            ratios = allocate(name, summary, target)  # each method at its own level, shown per block
            num, den = {}, {}
            for l in summary.layers:
                num[l.block] = num.get(l.block, 0.0) + ratios[l.name] * l.numel
                den[l.block] = den.get(l.block, 0) + l.numel
            allocs[name] = [num[b] / den[b] for b in sorted(num)]
    result = {"model": model_name, "target": target, "layers": rows, "allocations": allocs,
              "protocol": {"calib": calib, "nsamples": nsamples if calib else 0, "seqlen": seqlen, "seed": seed,
                           "xmin_mode": xmin_mode, "compat": compat, "owl_M": 5.0},
              "seconds": None}
    with atomic_dir(out, overwrite, inputs) as tmp:
        _write_tables(tmp, result)
        _plots(tmp, result, summary, esd_layers, xmin_mode, compat)
        result["seconds"] = round(time.time() - t0, 2)
        (tmp / "analysis.json").write_text(json.dumps(result, indent=2))
        (tmp / "analysis.md").write_text(_markdown(result))
    return result


def _write_tables(folder: Path, result: dict) -> None:
    rows = result["layers"]
    with open(folder / "layers.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _markdown(result: dict) -> str:
    rows = result["layers"]
    has_owl = "owl_outlier_ratio_M5" in rows[0]
    lines = [f"# ESD analysis: {result['model']}", "",
             f"alpha: power-law tail exponent of the eigenvalues of W^T W (MLE, xmin by KS, mode "
             f"{result['protocol']['xmin_mode']}, compat={result['protocol']['compat']}); alpha_hat = alpha x "
             f"log10(largest eigenvalue); FARMS alpha from pooled fixed-aspect-ratio windows. Larger alpha = less "
             f"heavy-tailed = pruned more by AlphaPruning/FARMS."
             + (f" OWL outlier ratio: share of dense Wanda scores above 5 x the block mean "
                f"({result['protocol']['calib']}, {result['protocol']['nsamples']} x {result['protocol']['seqlen']} tokens)."
                if has_owl else ""), "",
             "## Sparsity per block by allocator at target " + f"{result['target']:.2f}", "",
             "| block | " + " | ".join(result["allocations"]) + " |", "|---" * (len(result["allocations"]) + 1) + "|"]
    nb = len(next(iter(result["allocations"].values())))
    for b in range(nb):
        lines.append(f"| {b} | " + " | ".join(f"{v[b]:.3f}" for v in result["allocations"].values()) + " |")
    lines += ["", "## Per layer", "", "| layer | shape | alpha | alpha_hat | stable rank | FARMS alpha |"
              + (" OWL outliers |" if has_owl else ""), "|---|---|---|---|---|---|" + ("---|" if has_owl else "")]
    for r in rows:
        lines.append(f"| {r['name']} | {r['out']}x{r['in']} | {r['alpha']:.3f} | {r['alpha_hat']:.3f} | "
                     f"{r['stable_rank']:.2f} | {r['farms_alpha']:.3f} |"
                     + (f" {r['owl_outlier_ratio_M5']:.4f} |" if has_owl else ""))
    return "\n".join(lines) + "\n"


def _plots(folder: Path, result: dict, summary, esd_layers, xmin_mode, compat) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib not installed: no plots (pip install 'prunekit[plots]')")
        return
    rows = result["layers"]
    nb = max(r["block"] for r in rows) + 1
    kinds = sorted({r["name"].rsplit(".", 1)[-1] for r in rows})
    # alpha per block
    fig, ax = plt.subplots(figsize=(9, 4), dpi=120)
    cmap = plt.get_cmap("tab10")
    for i, k in enumerate(kinds):
        pts = [(r["block"], r["alpha"]) for r in rows if r["name"].endswith("." + k)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, lw=0.8, color=cmap(i % 10), label=k, alpha=0.8)
    mean = [sum(r["alpha"] for r in rows if r["block"] == b) / max(1, sum(1 for r in rows if r["block"] == b))
            for b in range(nb)]
    ax.plot(range(nb), mean, "k-", lw=2.2, label="block mean")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set(xlabel="block", ylabel="alpha (ESD tail exponent)", title=f"Heavy-tail alpha per block: {result['model']}")
    ax.legend(ncol=4, fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "alpha_per_block.png")
    plt.close(fig)
    # allocations
    fig, ax = plt.subplots(figsize=(9, 4), dpi=120)
    for i, (name, v) in enumerate(result["allocations"].items()):
        ax.plot(range(nb), v, "o-", ms=3, lw=1.2, color=cmap(i % 10), label=name)
    ax.axhline(result["target"], color="k", ls="--", lw=0.8)
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set(xlabel="block", ylabel="sparsity", title=f"Sparsity per block at target {result['target']:.2f}")
    ax.legend(ncol=4, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "allocations.png")
    plt.close(fig)
    # ESD histograms with the fitted tail
    names = [l.name for l in summary.layers]
    if esd_layers:
        chosen = [n for n in names if any(fnmatch.fnmatch(n, p) for p in esd_layers)][:9]
    else:
        picks = [0, nb // 2, nb - 1]
        chosen = [n for n in names if any(f".{b}." in n for b in picks) and n.endswith(("q_proj", "down_proj"))][:6]
        chosen = chosen or names[:3]
    if not chosen:
        return
    cols = min(3, len(chosen))
    nrows = (len(chosen) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), dpi=110, squeeze=False)
    for ax, n in zip(axes.flat, chosen):
        ev = eigenvalues(summary.weights[n]).double().cpu()
        ev = ev[ev > ev.max() * 1e-10]
        fit = fit_power_law(ev, xmin_mode=xmin_mode, compat=compat)
        bins = torch.logspace(float(ev.min().log10()), float(ev.max().log10()), 60).numpy()
        ax.hist(ev.numpy(), bins=bins, density=True, color="#8fb3d9", label="ESD")
        tail = ev[ev >= fit.xmin]
        x = torch.logspace(float(torch.tensor(fit.xmin).log10()), float(ev.max().log10()), 50)
        frac = len(tail) / len(ev)
        pdf = frac * (fit.alpha - 1) / fit.xmin * (x / fit.xmin) ** (-fit.alpha)
        ax.plot(x.numpy(), pdf.numpy(), "r-", lw=1.6, label=f"PL fit alpha={fit.alpha:.2f}")
        ax.axvline(fit.xmin, color="r", ls=":", lw=0.8)
        ax.set(xscale="log", yscale="log", title=n.split(".", 2)[-1] if n.count(".") > 2 else n, xlabel="eigenvalue")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(chosen):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(folder / "esd_fits.png")
    plt.close(fig)
