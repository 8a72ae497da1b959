"""Magnitude: |W|, compared over the whole matrix (one threshold per layer); needs no calibration data."""
from __future__ import annotations

import torch

from ..core.metric import register_metric
from ..core.stats import LayerStats


@register_metric("magnitude", needs=(), group="layer", description="|W|, threshold per weight matrix")
def magnitude(W: torch.Tensor, stats: LayerStats | None = None) -> torch.Tensor:
    return W.abs()
