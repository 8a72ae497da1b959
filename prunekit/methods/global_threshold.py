"""Global threshold: one score threshold across all layers.

``global`` reads ``summary.scores``: per layer, a sorted random subsample (at most 65,536 entries)
of the chosen metric's scores on the *dense* model (the orchestrator gathers them in one calibration
pass). One threshold t is chosen so that the parameter-weighted share of scores <= t equals the
target; a layer's ratio is its share below t. (``finalize`` then makes the mean exact.)
"""
from __future__ import annotations

import torch

from ..core.allocation import Allocation, ModelSummary, register_allocator
from ..core.errors import PrunekitError


@register_allocator("global", granularity="layer", needs=("scores",), description="one score threshold across all layers")
def global_threshold(summary: ModelSummary, target: float) -> Allocation:
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
    return Allocation(ratios, {"global_threshold": float(t)})
