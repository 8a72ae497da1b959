"""The mask-refinement contract: a layer's prune mask improved without changing how many weights each row prunes.

A refiner is ``fn(W, mask, stats, nm=None, **params) -> (mask, info)`` registered with
``@register_refiner(name, params=ParamsClass, needs=...)``. ``W`` is the layer's dense float32 weight (out, in),
``mask`` the bool prune mask (True = pruned) that the metric, the allocator and any row-wise method chose, ``nm``
the N:M pattern or None. The returned mask must prune exactly as many weights as ``mask`` in every row, and for an
N:M pattern in every group of M columns of every row: a refiner only swaps a pruned weight for a kept one of the
same row (of the same group). :func:`apply_refine` checks that, so the layer's sparsity, the allocation and the
pattern are what they were. ``info`` is a small dict of diagnostics for the report. ``needs`` names the statistics
it reads (added to the metric's by :mod:`prunekit.pruning.plan`). A parameter named ``skip`` (a list of layer-name
patterns) is the engine's, not the function's: those layers keep their mask (:func:`apply_refine`).

In a prune the order is: mask (metric, allocation, row-wise method) -> refine -> weight reconstruction
(``reconstruct``, or the solver metric's own solve on the refined mask). Refiners live in ``prunekit/methods/``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .errors import PrunekitError
from .families import name_matches
from .registry import NoParams, Params, Registry


@dataclass(frozen=True)
class RefineMethod:
    name: str
    fn: Callable
    params: type[Params] = NoParams
    needs: frozenset = frozenset()
    description: str = ""

    def check_params(self, given: dict | None) -> Params:
        return self.params.check(given, "refine_params", self.name)


REFINERS: Registry[RefineMethod] = Registry("refine method")


def register_refiner(name: str, params: type[Params] = NoParams, needs=(), description: str = ""):
    def deco(fn):
        REFINERS.add(name, RefineMethod(name, fn, params, frozenset(needs), description))
        return fn

    return deco


def refine_needs(name: str) -> frozenset:
    """The statistics refiner ``name`` reads."""
    return REFINERS.get(name).needs


def group_counts(mask: torch.Tensor, nm: tuple[int, int] | None) -> torch.Tensor:
    """Pruned weights per row, or per (row, group of M columns) for an N:M pattern."""
    if nm is None:
        return mask.sum(1)
    return mask.reshape(mask.shape[0], -1, nm[1]).sum(2)


def apply_refine(name: str, W: torch.Tensor, mask: torch.Tensor, stats, nm: tuple[int, int] | None = None,
                 info: dict | None = None, layer: str | None = None, **params) -> torch.Tensor:
    """``mask`` refined by refiner ``name`` (the given parameters validated; the method's defaults apply to the
    rest). ``info``, if given, is filled with the method's diagnostics. A refiner whose parameters have a ``skip``
    field (fnmatch patterns, matched like ``ignore``) leaves the layers it names (``layer``: the layer's name)
    as they are. Raises if the refiner changed a row's (or an N:M group's) count: that would be a bug in the
    refiner, and the prune must not go on with it."""
    m = REFINERS.get(name)
    p = m.check_params(params)
    if layer is not None and name_matches(layer, getattr(p, "skip", ())):
        return mask
    new, extra = m.fn(W.float(), mask, stats, nm, **{k: getattr(p, k) for k in p.model_fields_set if k != "skip"})
    if new.shape != mask.shape or new.dtype != torch.bool:
        raise PrunekitError(f"refiner {name} returned a mask of shape {tuple(new.shape)} ({new.dtype}) for "
                            f"{tuple(mask.shape)}")
    if not torch.equal(group_counts(new, nm), group_counts(mask, nm)):
        raise PrunekitError(f"refiner {name} changed the number of pruned weights of a "
                            f"{'row' if nm is None else 'group'} (a bug in the refiner); the prune stops here")
    if info is not None:
        info.update(extra)
    return new
