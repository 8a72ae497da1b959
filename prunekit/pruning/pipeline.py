"""End-to-end runs used by the CLI: load, evaluate dense, prune, evaluate pruned, save atomically."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from ..core import distributed
from ..core.data import NAMED_SETS
from ..core.errors import PrunekitError
from ..core.families import resolve_seqlen
from ..core.loading import load_model, model_input_path
from ..core.offload import resolve_device
from ..core.outputs import atomic_dir, check_output
from ..evaluate import perplexity
from .compressed import compress_folder, load_pretrained
from .config import PruneConfig
from .report import Report, write_report
from .run import prune
from .save import probe_ids, probe_matches, probe_nll, reload_saved, save_masks, sparsity_from_files

log = logging.getLogger(__name__)


def evaluate_ppl(model, tokenizer, sets, seqlen, max_windows, device) -> dict:
    return {s: perplexity(model, tokenizer, s, seqlen, max_windows, device) for s in sets}


def save_pruned(model, tokenizer, report: Report, cfg: PruneConfig, out, overwrite: bool = False,
                inputs=()) -> dict:
    """Write model (safetensors, exact zeros; or the compressed format, ``cfg.save_format``), tokenizer, packed
    masks, recipe and report atomically.

    Before the folder is put in place it is reloaded as a user would load it (plain ``from_pretrained``, then,
    for the compressed format, :func:`~prunekit.pruning.compressed.load_pretrained`) and its probe NLL compared
    with the in-memory model's (``report["probe"]``): a folder that would not reload as the model that was
    evaluated is never written. The sparsity stated in the report is re-counted from the written files.
    ``inputs``: paths the output may not overlap (the model's own folder is added when it is local)."""
    inputs = [*inputs, model_input_path(cfg.model)]
    check_output(out, overwrite, inputs, exists="later")  # before the probe's forward pass
    ids, source = report.probe_ids if report.probe_ids is not None else probe_ids(model)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    device = next(model.parameters()).device
    report["probe"] = {"source": source, "tokens": int(ids.numel()), "dtype": dtype,
                       "nll": probe_nll(model, ids), "ids": ids.tolist()}
    with atomic_dir(out, overwrite, inputs) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        shapes = {l["name"]: l["shape"] for l in report["layers"]}
        save_masks(tmp / "masks.safetensors", report.masks, shapes)
        (tmp / "recipe.yaml").write_text(cfg.to_yaml())
        reloaded = reload_saved(tmp)
        _check_reload(reloaded, ids, device, report["probe"], "a plain from_pretrained")
        report["saved"] = sparsity_from_files(tmp, list(shapes), reloaded)
        del reloaded
        report["saved"]["layers"] = {k: round(v, 6) for k, v in report["saved"]["layers"].items()}
        report["saved"]["format"] = cfg.save_format
        if cfg.save_format == "compressed":
            report["saved"].update(compress_folder(tmp))
            _check_reload(load_pretrained(tmp), ids, device, report["probe"], "prunekit.load_pretrained")
        write_report(tmp, report)
        plot_allocation(tmp, report)
    return report["saved"]


def _check_reload(reloaded, ids, device, probe: dict, how: str) -> None:
    nll = probe_nll(reloaded, ids, device)
    if not probe_matches(probe["nll"], nll, probe["dtype"]):
        raise PrunekitError(f"the saved folder does not reload as the pruned model (probe NLL {nll:.6f} after {how}, "
                            f"{probe['nll']:.6f} in memory); nothing was written")
    probe["reloaded_nll"] = nll


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
    inputs = run_inputs(cfg)
    if cfg.out is not None:
        check_output(cfg.out, cfg.overwrite, inputs)  # before any work
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
        save_pruned(model, tok, report, cfg, cfg.out, cfg.overwrite, inputs)
    return report


def run_inputs(cfg: PruneConfig) -> list:
    """The local paths a run reads (model, calibration and evaluation files): no output may overlap them."""
    files = [s for s in (cfg.calib, *cfg.eval) if s not in NAMED_SETS]
    return [model_input_path(cfg.model), *files]
