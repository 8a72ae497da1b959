"""Element metrics: pure functions (weight, input statistics) -> scores, plus solvers.

Register a metric with ``@register_metric(name, needs=..., group=...)`` on a score function
``score(W, stats) -> Tensor`` (W is float32, shape (out, in); higher score = more important), or
pass ``solver=`` for methods that reconstruct weights (SparseGPT). ``needs`` lists the statistics
the metric reads (see :mod:`prunekit.metrics.stats`); the engine gathers only those.
"""
from __future__ import annotations

import dataclasses
import functools
import math
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
    # solver(W, stats, sparsity, pattern, mask, name=layer) -> (new W, mask). ``mask`` fixed by another metric or
    # None; ``name`` names the layer in its log messages.
    solver: Callable | None = None
    # bias_update(W_dense, mask, stats) -> additive bias correction or None (applied before zeroing).
    bias_update: Callable | None = None
    description: str = ""
    # keyword parameters of ``score`` / ``solver`` that users may set (``metric_params``), with their defaults
    params: dict = field(default_factory=dict)
    # param_check(params) raises PrunekitError on values out of range (after the type checks)
    param_check: Callable | None = None

    def check_params(self, given: dict, what: str = "metric_params") -> dict:
        """``given`` validated against ``params``: known names only, each value converted to its default's
        type (int, float, str, bool; bool refused for numbers, non-finite numbers refused). Raises
        PrunekitError with the valid names."""
        out = {}
        for k, v in given.items():
            if k not in self.params:
                valid = ", ".join(sorted(self.params)) or "none"
                raise PrunekitError(f"{what}: {self.name} has no parameter {k!r}; valid: {valid}")
            typ = type(self.params[k])
            if typ is bool:
                if not isinstance(v, bool):
                    raise PrunekitError(f"{what}: {self.name} {k} must be true or false, got {v!r}")
            elif typ in (int, float):
                if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                        or (typ is int and not float(v).is_integer())):
                    kind = "an integer" if typ is int else "a finite number"
                    raise PrunekitError(f"{what}: {self.name} {k} must be {kind}, got {v!r}")
            elif typ is str and not isinstance(v, str):
                raise PrunekitError(f"{what}: {self.name} {k} must be a string, got {v!r}")
            out[k] = typ(v)
        if self.param_check is not None:
            self.param_check(out)
        return out


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


BIAS_SWITCH = "bias_correction"  # a metric parameter that turns its bias update off (not passed to the score)


def configured_metric(name: str, params: dict | None = None) -> Metric:
    """The registered metric with the user's parameters (``metric_params``) bound into its score or
    solver, validated by ``Metric.check_params``; every consumer (the engine, allocation profiles) then
    scores with them. ``bias_correction=false`` drops the metric's bias update."""
    m = get_metric(name)
    if not params:
        return m
    p = m.check_params(params)
    kw = {k: v for k, v in p.items() if k != BIAS_SWITCH}
    return dataclasses.replace(m, score=functools.partial(m.score, **kw) if m.score else None,
                               solver=functools.partial(m.solver, **kw) if m.solver else None, params={**m.params, **p},
                               bias_update=m.bias_update if p.get(BIAS_SWITCH, True) else None)


@register_metric("magnitude", needs=(), group="layer", description="|W|, threshold per weight matrix")
def magnitude(W: torch.Tensor, stats: LayerStats | None = None) -> torch.Tensor:
    return W.abs()


@register_metric("wanda", needs=("sq_sum",), group="row", description="|W_ij| * ||X_j||_2, compared per output row")
def wanda(W: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    return W.abs() * stats.col_norm().to(W.device)[None, :]


# Further metrics register themselves on import (keep this list at the end of the file).
from . import extra as _extra  # noqa: E402,F401
