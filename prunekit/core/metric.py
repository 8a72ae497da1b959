"""The element-metric contract: a score function or a solver, the statistics it reads, its parameters.

A metric scores every weight of a layer from the weight and the layer's input statistics,
``score(W, stats, **params) -> Tensor`` (W float32, shape (out, in); higher = more important), compared per
output row or per matrix (``group``); or it is a solver that chooses its mask and rewrites the weights
(``solver(W, stats, sparsity, pattern, mask, name=..., **params) -> (W_new, mask)``, SparseGPT). ``needs``
lists the statistics it reads (:mod:`prunekit.core.stats`); the engine gathers only those. A metric may
also correct the bias (``bias_update(W_dense, mask, stats)``, applied before zeroing: STADE), which a
``bias_correction`` parameter can turn off. Methods register themselves in ``prunekit/methods/``.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable

import torch

from .registry import NoParams, Params, Registry

BIAS_SWITCH = "bias_correction"  # a parameter that turns the metric's bias update off (not passed to the score)


@dataclass(frozen=True)
class Metric:
    name: str
    needs: frozenset[str] = frozenset()
    group: str = "row"  # where unstructured scores are compared: per output row or per layer
    score: Callable[..., torch.Tensor] | None = None
    solver: Callable | None = None
    bias_update: Callable | None = None
    description: str = ""
    params: type[Params] = NoParams  # the parameter class (``metric_params`` / ``reconstruct_params``)
    bound: Params | None = None  # the values bound into score / solver (None: the defaults)

    @property
    def values(self) -> dict:
        """The parameter values in use (defaults included)."""
        return (self.bound or self.params()).kwargs()

    def check_params(self, given: dict | None, what: str = "metric_params") -> Params:
        return self.params.check(given, what, self.name)


METRICS: Registry[Metric] = Registry("metric")


def register_metric(name: str, needs=(), group: str = "row", description: str = "", params: type[Params] = NoParams,
                    solver: Callable | None = None, bias_update: Callable | None = None):
    """Decorator registering a score function (``solver=`` given: decorate ``None``, the solver is the method)."""

    def deco(fn):
        METRICS.add(name, Metric(name, frozenset(needs), group, score=fn, solver=solver, bias_update=bias_update,
                                 description=description, params=params))
        return fn

    return deco


def get_metric(name: str) -> Metric:
    return METRICS.get(name)


def configured_metric(name: str, params: dict | None = None, what: str = "metric_params") -> Metric:
    """The registered metric with the user's parameters validated and bound into its score or solver; every
    consumer (the engine, allocation profiles, searches) then scores with them. ``bias_correction=false``
    drops the metric's bias update."""
    m = get_metric(name)
    if not params:
        return m
    p = m.check_params(params, what)
    kw = {k: getattr(p, k) for k in p.model_fields_set if k != BIAS_SWITCH}  # the rest: the functions' defaults
    return dataclasses.replace(m, score=functools.partial(m.score, **kw) if m.score else None,
                               solver=functools.partial(m.solver, **kw) if m.solver else None, bound=p,
                               bias_update=m.bias_update if getattr(p, BIAS_SWITCH, True) else None)
