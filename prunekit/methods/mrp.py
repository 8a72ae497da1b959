"""MRP (Maximum Redundancy Pruning), an iterative allocator.

It reads ``summary.prune_to``, a callable ``prune_to(ratios, M) -> per-block outlier ratios`` supplied by the
pruning plan that prunes the model
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
The bound keeps the schedule local: an unbounded one gives single blocks ratios near 0.99.
Pruned weights keep a zero score, so later passes only add to the earlier masks.
"""
from __future__ import annotations

import torch
from pydantic import Field

from ..core.allocation import Allocation, ModelSummary, register_allocator
from ..core.errors import PrunekitError
from ..core.registry import Int, Params


class MRPParams(Params):
    steps: Int = Field(4, ge=1, description="increments after the uniform start")
    frac: float = Field(0.5, gt=0, le=1, description="share of blocks that take an increment per step")
    lam: float = Field(0.08, ge=0, lt=1, description="every block stays in [S - lam, S + lam]")
    M: float = Field(5.0, description="outlier threshold of the redundancy score")


@register_allocator("mrp", needs=("engine",), params=MRPParams, description="Maximum Redundancy Pruning (iterative)")
def mrp(summary: ModelSummary, target: float, steps: int = 4, frac: float = 0.5, lam: float = 0.08,
        M: float = 5.0) -> Allocation:
    if not (0 < frac <= 1 and steps >= 1 and 0 <= lam < 1):
        raise PrunekitError("mrp needs 0 < frac <= 1, steps >= 1, 0 <= lam < 1")
    prune_to = summary.prune_to
    if prune_to is None:
        raise PrunekitError("mrp needs the pruning engine (summary.prune_to)")
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
    return Allocation({l.name: float(s[l.block]) for l in summary.layers}, {"mrp_history": history})
