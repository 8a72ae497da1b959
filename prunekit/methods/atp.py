"""ATP (Huang et al., ICML 2025, "Determining Layer-wise Sparsity for Large Language Models Through a Theoretical
Perspective"): block sparsity rising as an arithmetic progression over depth.

The paper's argument: the reconstruction error a pruned block leaves is carried into, and amplified by, every
block after it, so early blocks should be pruned less and late blocks more; its analysis gives a monotonically
increasing arithmetic progression with one free parameter, the common difference ``beta``:

    s_b = s_0 + b x beta,   b = 0 .. B - 1 over the pruned blocks in depth order,

with s_0 the one value that makes the parameter-weighted mean exactly the target
(s_0 = S - beta x sum_b n_b b / sum_b n_b, n_b the block's pruned parameters; with equal blocks the progression is
centred on S: s_b = S + beta (b - (B - 1) / 2)). Every layer of a block gets the block's ratio. ``beta = 0`` is
uniform. A beta so large that the ends leave [0, max_ratio] is clipped and renormalised by the shared
``finalize`` (the weighted mean stays exact and the order stays monotone); the report lists the ratios.

The paper finds beta by a few trials of the whole prune; here ``beta=auto`` tries the values in the registered grid
on prunekit's held-out proxy (:mod:`prunekit.pruning.auto`). The grid and the default are prunekit's choice
(unverified against the paper's searched values, which depend on the model's depth): 0.005, a spread of
+-0.0725 around the target for SmolLM2's 30 blocks.
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

import torch
from pydantic import Field

from ..core.allocation import Allocation, ModelSummary, block_index, check_target, register_allocator
from ..core.errors import PrunekitError
from ..core.registry import Params

DEFAULT_BETA = 0.005
BETA_GRID = [0.0, 0.0025, 0.005, 0.0075, 0.01, 0.0125, 0.015]


class ATPParams(Params):
    beta: Union[Annotated[float, Field(ge=0)], Literal["auto"]] = Field(
        DEFAULT_BETA, description="common difference of the block sparsities (later blocks prune more)")


def progression(numels: torch.Tensor, target: float, beta: float) -> torch.Tensor:
    """s_b = s_0 + b beta with the ``numels``-weighted mean exactly ``target`` (float64, before clipping)."""
    n = numels.double()
    b = torch.arange(n.numel(), dtype=torch.float64)
    return float(target) - beta * float((n * b).sum() / n.sum()) + beta * b


@register_allocator("atp", params=ATPParams, auto={"beta": BETA_GRID},
                    description="ATP: block sparsity an arithmetic progression over depth, one common difference beta")
def atp(summary: ModelSummary, target: float, beta: float = DEFAULT_BETA) -> Allocation:
    check_target(target)
    if beta < 0:
        raise PrunekitError(f"beta must be >= 0 (later blocks prune more), got {beta}")
    blocks, where, numels = block_index(summary)
    s = progression(numels, target, beta)
    return Allocation({l.name: float(s[where[i]]) for i, l in enumerate(summary.layers)},
                      {"block_ratios": [round(float(x), 6) for x in s]})
