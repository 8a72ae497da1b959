"""Wanda (Sun et al. 2024): |W_ij| * ||X_j||_2, compared per output row."""
from __future__ import annotations

import torch

from ..core.metric import register_metric
from ..core.stats import LayerStats


@register_metric("wanda", needs=("sq_sum",), group="row", description="|W_ij| * ||X_j||_2, compared per output row")
def wanda(W: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    return W.abs() * stats.col_norm().to(W.device)[None, :]
