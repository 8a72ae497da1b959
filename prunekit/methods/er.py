"""ER and ER-plus: densities from the layer shapes alone (Erdos-Renyi), no data."""
from __future__ import annotations

from typing import Literal

import torch

from ..core.allocation import ModelSummary, check_target, register_allocator
from ..core.errors import PrunekitError
from ..core.registry import Params


def _er_density(summary: ModelSummary, target: float, dense: torch.Tensor | None = None) -> torch.Tensor:
    """ER densities ``c * (n_in + n_out) / (n_in * n_out)`` with the weighted density = 1 - target.

    ``dense`` (bool per layer) marks layers kept at density 1; the others share the remaining budget.
    """
    n = summary.numels()
    e = torch.tensor([(l.shape[0] + l.shape[1]) / (l.shape[0] * l.shape[1]) for l in summary.layers],
                     dtype=torch.float64)
    budget = (1.0 - float(target)) * float(n.sum())
    d = torch.ones_like(e)
    free = torch.ones_like(e, dtype=torch.bool) if dense is None else ~dense
    budget -= float(n[~free].sum())
    if not bool(free.any()) or budget <= 0:
        raise PrunekitError(f"target {target} cannot be reached with the dense layers of ER-plus")
    d[free] = e[free] * budget / float((n[free] * e[free]).sum())
    return d


@register_allocator("er", granularity="layer", description="Erdos-Renyi: density ~ (n_in + n_out) / (n_in * n_out)")
def er(summary: ModelSummary, target: float) -> dict[str, float]:
    """ER (Mocanu et al.; Evci et al.): density proportional to ``(n_in + n_out) / (n_in n_out)``,
    scaled so the parameter-weighted density is ``1 - target``; ratio = 1 - density (layers whose
    density would exceed 1 are clipped to ratio 0 and the rest renormalised by ``finalize``)."""
    check_target(target)
    d = _er_density(summary, target)
    return {l.name: float(1.0 - x) for l, x in zip(summary.layers, d)}


class ERPlusParams(Params):
    dense_last: Literal["layer", "block"] = "layer"


@register_allocator("er-plus", granularity="layer", params=ERPlusParams,
                    description="ER with the last pruned layer kept dense (LLM adaptation)")
def er_plus(summary: ModelSummary, target: float, dense_last: str = "layer") -> dict[str, float]:
    """ER-plus, adapted to LLMs (documented choice; the paper's adaptation is unverified).

    Liu et al. (ICLR'22, "The unreasonable effectiveness of random pruning") define ER-plus / ERK-plus
    as ER(K) that forces the *last layer* (the classifier) dense while keeping the overall parameter
    budget. An LLM's classifier (``lm_head``) is never pruned here, so the analogue used is the last
    prunable layer before it: ``dense_last="layer"`` (default) keeps the last layer of the last
    block (e.g. ``mlp.down_proj``) dense; ``dense_last="block"`` keeps the whole last block dense.
    All other layers get ER densities rescaled so the global target is still met exactly.
    With ``granularity='block'`` the dense layer is averaged into its block's ratio (use
    ``granularity='layer'`` for the layer-level variant).
    """
    check_target(target)
    last_block = max(l.block for l in summary.layers)
    if dense_last == "layer":
        last = max(i for i, l in enumerate(summary.layers) if l.block == last_block)
        dense = torch.tensor([i == last for i in range(len(summary.layers))])
    elif dense_last == "block":
        dense = torch.tensor([l.block == last_block for l in summary.layers])
    else:
        raise PrunekitError(f"dense_last must be 'layer' or 'block', got {dense_last!r}")
    d = _er_density(summary, target, dense)
    return {l.name: float(1.0 - x) for l, x in zip(summary.layers, d)}
