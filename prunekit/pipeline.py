"""End-to-end runs used by the CLI: load, evaluate dense, prune, evaluate pruned, save atomically."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from . import distributed
from .config import PruneConfig
from .evaluate import perplexity
from .models.loading import load_model
from .prune import Report, prune, resolve_device, resolve_seqlen
from .report import write_report
from .save import atomic_dir, check_out_dir, save_masks, sparsity_from_files

log = logging.getLogger(__name__)


def evaluate_ppl(model, tokenizer, sets, seqlen, max_windows, device) -> dict:
    return {s: perplexity(model, tokenizer, s, seqlen, max_windows, device) for s in sets}


def save_pruned(model, tokenizer, report: Report, cfg: PruneConfig, out, overwrite: bool = False) -> dict:
    """Write model (safetensors, exact zeros), tokenizer, packed masks, recipe and report atomically.

    The sparsity stated in the report is re-counted from the written safetensors files."""
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        shapes = {l["name"]: l["shape"] for l in report["layers"]}
        save_masks(tmp / "masks.safetensors", report.masks, shapes)
        (tmp / "recipe.yaml").write_text(cfg.to_yaml())
        report["saved"] = sparsity_from_files(tmp, list(shapes))
        report["saved"]["layers"] = {k: round(v, 6) for k, v in report["saved"]["layers"].items()}
        write_report(tmp, report)
        plot_allocation(tmp, report)
    return report["saved"]


def plot_allocation(folder: Path, report: dict) -> None:
    """Sparsity per block as a PNG, when matplotlib is installed (optional extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    blocks = report["blocks"]
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=110)
    ax.bar([b["block"] for b in blocks], [b["sparsity"] for b in blocks], color="#4a7ab5")
    ax.axhline(report["target_sparsity"], color="k", lw=1, ls="--", label=f"target {report['target_sparsity']:.2f}")
    m = report["method"]
    ax.set(xlabel="block", ylabel="sparsity", ylim=(0, 1),
           title=f"{m['metric']} / {m['allocation']} / {m['pattern']}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(folder / "allocation.png")
    plt.close(fig)


def run(cfg: PruneConfig) -> Report:
    """Load the model named in the config, prune it, evaluate and save as configured."""
    if cfg.out:
        check_out_dir(cfg.out, cfg.overwrite)  # fail before any work
    t0 = time.time()
    model, tok = load_model(cfg.model, cfg.dtype)
    load_s = time.time() - t0
    device = resolve_device(cfg.device)
    eval_seqlen = resolve_seqlen(model, cfg.eval_seqlen or cfg.seqlen)
    lead = distributed.rank() == 0  # under torchrun only rank 0 evaluates and writes
    dense = evaluate_ppl(model, tok, cfg.eval, eval_seqlen, cfg.eval_max_windows, device) if cfg.eval and lead else {}
    report = prune(model, tok, cfg)
    report["timing"]["load_s"] = round(load_s, 2)
    report["protocol"]["world_size"] = distributed.world()
    if cfg.eval and lead:
        pruned = evaluate_ppl(model, tok, cfg.eval, eval_seqlen, cfg.eval_max_windows, device)
        report["eval"] = {s: {"dense": dense[s], "pruned": pruned[s]} for s in cfg.eval}
    if cfg.out and lead:
        save_pruned(model, tok, report, cfg, cfg.out, cfg.overwrite)
    return report
