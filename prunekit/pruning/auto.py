"""``auto`` allocation parameters: chosen on a cheap proxy before the real prune.

For each parameter given as ``auto`` (in the order given), every value of the allocator's registered grid is
tried: allocate with the other parameters fixed, prune with 16 calibration windows, measure the mean NLL on 8
held-out windows (the calibration source drawn with seed + 1000; without a tokenizer, the last calibration
windows), restore the dense weights, keep the best value (coordinate search). The trials are reported. Every
registered grid holds the value at which its allocator is uniform (eps, lam, beta = 0), so ``auto`` can decide that
reallocating does not pay on the model at hand (on Qwen2.5-Coder-0.5B AlphaPruning's default eps made Wanda 70%
worse than uniform; NOTES, issue 23).
"""
from __future__ import annotations

from ..core.allocation import allocate, get_allocator
from ..core.data import calibration_windows
from ..core.nll import nll_of_windows
from ..core.snapshot import WeightSnapshot
from .layer_pruner import LayerPruner, prune_all

PROXY = "mean NLL on 8 held-out windows of the calibration source after pruning with 16 calibration windows"


def auto_params(cfg, model, tokenizer, summary, blocks, block_layers, calib_ids, device, metric,
                params: dict) -> tuple[dict, dict | None]:
    """(parameters with every ``auto`` resolved, the trials' record or None when nothing was ``auto``)."""
    auto = [k for k, v in params.items() if v == "auto"]
    if not auto:
        return params, None
    alloc = get_allocator(cfg.allocation)
    defaults = alloc.params()
    if tokenizer is not None:
        held = calibration_windows(tokenizer, cfg.calib, 8, calib_ids.shape[1], cfg.seed + 1000)
    else:
        held = calib_ids[-min(4, len(calib_ids)):]
    sub = calib_ids[: min(len(calib_ids), 16)]
    snapshot = WeightSnapshot({n: m for d in block_layers for n, m in d.items()})
    resolved = {k: (getattr(defaults, k) if v == "auto" else v) for k, v in params.items()}
    trials = []
    for key in auto:
        best = None
        for value in alloc.auto[key]:
            trial = dict(resolved, **{key: value})
            ratios = allocate(cfg.allocation, summary, cfg.target(), granularity=cfg.granularity,
                              max_ratio=cfg.max_ratio, **trial)
            prune_all(LayerPruner.from_config(cfg, metric, ratios), metric, model, blocks, block_layers, sub, device,
                      cfg, "auto trial")
            loss = float(nll_of_windows(model, held, device, batch_size=4, desc="auto proxy").mean())
            trials.append({"params": trial, "heldout_nll": loss})
            if best is None or loss < best[0]:
                best = (loss, value)
            snapshot.restore()
        resolved[key] = best[1]
    return resolved, {"proxy": PROXY, "trials": trials, "chosen": {k: resolved[k] for k in auto}}
