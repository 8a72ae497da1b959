"""Element metrics: pure functions (weight, input statistics) -> scores, plus solvers.

Register a metric with ``@register_metric(name, needs=..., group=...)`` on a score function
``score(W, stats) -> Tensor`` (W is float32, shape (out, in); higher score = more important), or
pass ``solver=`` for methods that reconstruct weights (SparseGPT). ``needs`` lists the statistics
the metric reads (see :mod:`prunekit.metrics.stats`); the engine gathers only those.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import PrunekitError
from .stats import LayerStats


@dataclass(frozen=True)
class Metric:
    name: str
    needs: frozenset[str] = frozenset()
    group: str = "row"  # where unstructured scores are compared: per output row or per layer
    score: Callable[[torch.Tensor, LayerStats], torch.Tensor] | None = None
    # solver(W, stats, sparsity, pattern, mask) -> (new W, mask). ``mask`` fixed by another metric or None.
    solver: Callable | None = None
    # bias_update(W_dense, mask, stats) -> additive bias correction or None (applied before zeroing).
    bias_update: Callable | None = None
    description: str = ""
    extra: dict = field(default_factory=dict)


METRICS: dict[str, Metric] = {}


def register_metric(name: str, needs=(), group: str = "row", description: str = "", **kw):
    """Decorator for a score function; ``register_metric(name, solver=fn)(None)`` for solvers."""

    def deco(fn):
        METRICS[name] = Metric(name, frozenset(needs), group, score=fn, description=description, **kw)
        return fn

    return deco


def get_metric(name: str) -> Metric:
    try:
        return METRICS[name]
    except KeyError:
        raise PrunekitError(f"unknown metric {name!r}; valid: {', '.join(sorted(METRICS))}") from None


@register_metric("magnitude", needs=(), group="layer", description="|W|, threshold per weight matrix")
def magnitude(W: torch.Tensor, stats: LayerStats | None = None) -> torch.Tensor:
    return W.abs()


@register_metric("wanda", needs=("sq_sum",), group="row", description="|W_ij| * ||X_j||_2, compared per output row")
def wanda(W: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    return W.abs() * stats.col_norm().to(W.device)[None, :]


# Further metrics register themselves on import (keep this list at the end of the file).
from . import extra as _extra  # noqa: E402,F401
