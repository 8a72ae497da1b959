"""Allocators that need more than weights: a global score threshold, and MRP (iterative).

``global`` reads ``summary.scores``: per layer, a sorted random subsample (at most 65,536 entries)
of the chosen metric's scores on the *dense* model (the orchestrator gathers them in one calibration
pass). One threshold t is chosen so that the parameter-weighted share of scores <= t equals the
target; a layer's ratio is its share below t. (``finalize`` then makes the mean exact.)

``mrp`` (Maximum Redundancy Pruning) reads ``summary.extra["engine"]``, a callable
``prune_to(ratios) -> per-block outlier ratios`` supplied by the orchestrator that prunes the model
*in place* to the given per-layer ratios (on a calibration subset) and measures, per block, the
share of weights whose Wanda score exceeds M x the block mean, pruned zeros included (pruning a block
lowers its mean, so it shows more outliers and less redundancy next time: the schedule self-corrects). prunekit's schedule (the
paper leaves the step size open; this is our documented choice):
  1. prune every block uniformly to ``S - lam`` (``lam`` bounds every block to [S - lam, S + lam], as
     OWL's lambda does; default 0.08);
  2. repeat ``steps`` times: rank blocks by redundancy (1 - outlier ratio, recomputed on the current
     pruned model), give the ``frac`` most redundant blocks equal increments so that the weighted mean
     grows by ``lam / steps`` (a block at ``S + lam`` passes its share to the next most redundant
     one), and prune those increments in place. After ``steps`` steps the mean is exactly S.
An earlier schedule (start at S/2, no bound) gave a few blocks 0.99 and was worse than uniform on
SmolLM2 at 60-80% (bench/results/quality_S.md history); the bound keeps the search local.
Pruned weights keep a zero score, so later passes only add to the earlier masks.
"""
from __future__ import annotations

import torch

from ..errors import PrunekitError
from . import ModelSummary, register_allocator


@register_allocator("global", granularity="layer", needs=("scores",), description="one score threshold across all layers")
def global_threshold(summary: ModelSummary, target: float, **unused) -> dict[str, float]:
    if unused:
        raise PrunekitError(f"global: unknown parameter(s) {sorted(unused)}")
    if not summary.scores:
        raise PrunekitError("global allocation needs score samples (summary.scores)")
    names = [l.name for l in summary.layers]
    samples = [summary.scores[n].double().flatten() for n in names]
    numels = torch.tensor([l.numel for l in summary.layers], dtype=torch.float64)
    values = torch.cat(samples)
    weights = torch.cat([torch.full((len(s),), float(n) / len(s), dtype=torch.float64) for s, n in zip(samples, numels)])
    order = values.argsort()
    cum = weights[order].cumsum(0) / numels.sum()
    idx = int(torch.searchsorted(cum, torch.tensor(target, dtype=torch.float64)).clamp(max=len(cum) - 1))
    t = values[order][idx]
    ratios = {n: float((s <= t).double().mean()) for n, s in zip(names, samples)}
    summary.extra["global_threshold"] = float(t)
    return ratios


@register_allocator("mrp", needs=("engine",), description="Maximum Redundancy Pruning (iterative)")
def mrp(summary: ModelSummary, target: float, steps: int = 4, frac: float = 0.5, lam: float = 0.08,
        M: float = 5.0, **unused) -> dict[str, float]:
    if unused:
        raise PrunekitError(f"mrp: unknown parameter(s) {sorted(unused)}")
    if not (0 < frac <= 1 and steps >= 1 and 0 <= lam < 1):
        raise PrunekitError("mrp needs 0 < frac <= 1, steps >= 1, 0 <= lam < 1")
    prune_to = summary.extra.get("engine")
    if prune_to is None:
        raise PrunekitError("mrp needs the pruning engine (summary.extra['engine'])")
    blocks = torch.tensor([l.block for l in summary.layers])
    numels = torch.tensor([l.numel for l in summary.layers], dtype=torch.float64)
    nb = int(blocks.max()) + 1
    block_numel = torch.zeros(nb, dtype=torch.float64).index_add_(0, blocks, numels)
    lo, hi = max(0.0, target - lam), min(0.99, target + lam)
    s = torch.full((nb,), lo, dtype=torch.float64)
    history = []
    outliers = prune_to({l.name: float(s[l.block]) for l in summary.layers}, M)
    inc_total = (target - lo) * float(block_numel.sum()) / steps  # weighted increment per step
    k = max(1, round(frac * nb))
    for step in range(steps):
        redundancy = 1.0 - torch.tensor(outliers, dtype=torch.float64)
        left = inc_total
        chosen = []
        # the k most redundant blocks get an equal increment; a block at the cap passes its share on
        # to the next most redundant one (water-filling), so every step adds exactly inc_total
        for b in redundancy.argsort(descending=True).tolist():
            if left <= 1e-12:
                break
            room = (hi - float(s[b])) * float(block_numel[b])
            if room <= 1e-12:
                continue
            share = inc_total / k if len(chosen) < k else left
            add = min(share, room, left)
            s[b] += add / float(block_numel[b])
            left -= add
            chosen.append(b)
        history.append({"step": step + 1, "chosen": sorted(chosen), "outliers": outliers})
        outliers = prune_to({l.name: float(s[l.block]) for l in summary.layers}, M)
    summary.extra["mrp_history"] = history
    return {l.name: float(s[l.block]) for l in summary.layers}
