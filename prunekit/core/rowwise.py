"""The row-wise allocation contract: one layer's target sparsity turned into one ratio per output row.

A row-wise method is ``fn(W, scores, stats, target, uniform_counts=None, **params) -> (row_ratios, info)``
registered with ``@register_rowwise(name, params=ParamsClass, needs=..., stats_options=...)``. ``needs(params)``
names the statistics it reads (added to the metric's), ``stats_options(params)`` the options of those statistics
(e.g. how many token rows per calibration sequence). The row ratios go to :func:`prunekit.core.masks.make_mask`
with the same scores. TRIM is the method registered today (``prunekit/methods/trim.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .registry import NoParams, Params, Registry


@dataclass(frozen=True)
class RowwiseMethod:
    name: str
    fn: Callable
    params: type[Params] = NoParams
    needs: Callable[[Params], frozenset] = lambda p: frozenset()
    stats_options: Callable[[Params], dict] = lambda p: {}
    description: str = ""

    def check_params(self, given: dict | None) -> Params:
        return self.params.check(given, "rowwise_params", self.name)


ROWWISE: Registry[RowwiseMethod] = Registry("rowwise method")


def register_rowwise(name: str, params: type[Params] = NoParams, needs=None, stats_options=None, description=""):
    def deco(fn):
        ROWWISE.add(name, RowwiseMethod(name, fn, params, needs or (lambda p: frozenset()),
                                        stats_options or (lambda p: {}), description))
        return fn

    return deco


def rowwise_needs(name: str, params: dict | None = None) -> frozenset:
    """The statistics row-wise method ``name`` reads with these params."""
    m = ROWWISE.get(name)
    return frozenset(m.needs(m.check_params(params)))


def rowwise_stats_options(name: str, params: dict | None = None) -> dict:
    m = ROWWISE.get(name)
    return m.stats_options(m.check_params(params))


def apply_rowwise(name: str, W: torch.Tensor, scores: torch.Tensor, stats, target: float,
                  info: dict | None = None, uniform_counts: torch.Tensor | None = None, **params) -> torch.Tensor:
    """Per-row sparsity of one layer by row-wise method ``name``; pass the result to ``make_mask`` with the same
    ``scores``. ``info``, if given, is filled with the method's diagnostics. Only the parameters given are
    passed on (the method's own defaults apply to the rest)."""
    m = ROWWISE.get(name)
    p = m.check_params(params)
    rows, extra = m.fn(W.float(), scores, stats, float(target), uniform_counts=uniform_counts,
                       **{k: getattr(p, k) for k in p.model_fields_set})
    if info is not None:
        info.update(extra)
    return rows
