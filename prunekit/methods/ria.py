"""RIA (Relative Importance and Activations).

    S_ij = ( |W_ij| / sum_i |W_ij|  +  |W_ij| / sum_j |W_ij| ) * ||X_j||_2 ^ 0.5

The first term is |W_ij| relative to the other weights reading the same input j (its column), the second
relative to the other weights of the same output i (its row); ||X_j||_2 is the feature norm over all
calibration tokens (as in Wanda), raised to the power 0.5.

Comparison group: scores are compared *per output row* (``group='row'``): every row drops its
``floor(d_in * s)`` lowest scores, like Wanda, and N:M groups are taken within rows. Within one row the
second term's denominator is a constant, so the column-relative term is what makes RIA differ from Wanda.
A column or row whose weights are all zero gives score 0 there (no division by zero).
"""
from __future__ import annotations

import torch
from pydantic import Field

from ..core.metric import register_metric
from ..core.registry import Params
from ..core.stats import LayerStats

RIA_ALPHA = 0.5


class RIAParams(Params):
    alpha: float = Field(RIA_ALPHA, ge=0, description="exponent of the feature norm ||X_j||_2")


@register_metric("ria", needs=("sq_sum",), group="row", params=RIAParams,
                 description="(|W|/col-sum|W| + |W|/row-sum|W|) * ||X_j||^0.5, compared per output row")
def ria(W: torch.Tensor, stats: LayerStats, alpha: float = RIA_ALPHA) -> torch.Tensor:
    A = W.abs().float()
    tiny = torch.finfo(torch.float32).tiny
    col = A.sum(0, keepdim=True).clamp_min(tiny)  # sum over outputs i, for each input j
    row = A.sum(1, keepdim=True).clamp_min(tiny)  # sum over inputs j, for each output i
    return (A / col + A / row) * stats.col_norm().to(A.device).pow(alpha)[None, :]
