"""``auto`` allocation parameters: chosen by trial prunes before the real prune.

For each parameter given as ``auto`` (in the order given), every value of the allocator's registered grid is
tried: allocate with the other parameters fixed, prune exactly as the real prune will (every calibration window),
measure the mean NLL on 8 held-out windows (the calibration source drawn with seed + 1000; without a tokenizer,
the last calibration windows), restore the dense weights, keep the best value (coordinate search). The trials are
reported. Each value tried costs one prune. The trials prune with the whole calibration set because a smaller
trial prune ranked the values the other way round on Qwen2.5-Coder-0.5B (a 16-window trial preferred AlphaPruning
to uniform; after the 32-window prune it stands for, uniform is better on every held-out measure:
bench/results/auto_proxy.json). Every registered grid holds the value at which its allocator is uniform (eps, lam,
beta = 0), so ``auto`` can decide that reallocating does not pay on the model at hand.

A parameter whose published default helped one measured model and hurt another is ``auto`` unless the user gives
it (the allocator's ``default_auto``, filled by the config): AlphaPruning's eps 0.3 and OWL's lam 0.08 improved
Wanda 70% on SmolLM2 and made Qwen2.5-Coder-0.5B worse than uniform (README, NOTES, issue 23); FARMS shares
AlphaPruning's eps.
"""
from __future__ import annotations

import logging

from ..core.allocation import allocate, get_allocator
from ..core.data import calibration_windows
from ..core.nll import nll_of_windows
from ..core.offload import peak_rss_bytes, rss_bytes
from ..core.snapshot import WeightSnapshot
from .layer_pruner import LayerPruner, prune_all

log = logging.getLogger(__name__)

PROXY = "mean NLL on 8 held-out windows of the calibration source after the trial's prune (every calibration window)"


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
    snapshot = WeightSnapshot({n: m for d in block_layers for n, m in d.items()})
    resolved = {k: (getattr(defaults, k) if v == "auto" else v) for k, v in params.items()}
    trials = []
    for key in auto:
        log.info("allocation %s: %s=auto tries %s, one prune each (pass --allocation-param %s=VALUE to skip this)%s",
                 cfg.allocation, key, alloc.auto[key], key, _memory())
        best = None
        for value in alloc.auto[key]:
            trial = dict(resolved, **{key: value})
            ratios = allocate(cfg.allocation, summary, cfg.target(), granularity=cfg.granularity,
                              max_ratio=cfg.max_ratio, **trial)
            prune_all(LayerPruner.from_config(cfg, metric, ratios), metric, model, blocks, block_layers, calib_ids,
                      device, cfg, f"auto trial {key}={value}")
            loss = float(nll_of_windows(model, held, device, batch_size=4, desc="auto proxy").mean())
            trials.append({"params": trial, "heldout_nll": loss})
            log.info("allocation %s: %s=%s held-out NLL %.4f%s", cfg.allocation, key, value, loss, _memory())
            if best is None or loss < best[0]:
                best = (loss, value)
            snapshot.restore()
        resolved[key] = best[1]
        log.info("allocation %s: %s=auto chose %s (held-out NLL %.4f)", cfg.allocation, key, best[1], best[0])
    return resolved, {"proxy": PROXY, "trials": trials, "chosen": {k: resolved[k] for k in auto}}


def _memory() -> str:
    """`` (resident memory X GiB, peak Y GiB)`` for the trial log ('' where unreadable): where auto's memory goes."""
    rss, peak = rss_bytes(), peak_rss_bytes()
    return f" (resident memory {rss / 2**30:.2f} GiB, peak {peak / 2**30:.2f} GiB)" if rss and peak else ""
