"""The search-method contract: what every search gets (:class:`SearchSetup`) and how it registers.

A search method is ``run(setup, budget, out_dir, resume, progress, fingerprint, **params) -> (result, recipe)``
registered with ``@register_search(name, params=ParamsClass)``: ``result`` is JSON-able (its ``best``, the
baselines, the history), ``recipe`` the prune config keys that reproduce the best allocation without searching.
``extra_needs`` are statistics the search's fitness must gather beyond the metric's (OptiShear's meta metric).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..core.allocation import ModelSummary
from ..core.registry import NoParams, Params, Registry


@dataclass
class SearchSetup:
    """Everything a search needs that does not depend on the method: the cached fitness, the allocator's
    layer summary, the target and the calibration windows."""

    model: torch.nn.Module
    fitness: object  # prunekit.search.fitness.Fitness
    summary: ModelSummary
    target: float
    lam: float
    calib_ids: torch.Tensor
    batch_size: int | None
    seed: int


@dataclass(frozen=True)
class SearchMethod:
    name: str
    run: Callable
    params: type[Params] = NoParams
    extra_needs: frozenset = frozenset()


SEARCHES: Registry[SearchMethod] = Registry("search method")


def register_search(name: str, params: type[Params] = NoParams, extra_needs=()):
    def deco(fn):
        SEARCHES.add(name, SearchMethod(name, fn, params, frozenset(extra_needs)))
        return fn

    return deco
