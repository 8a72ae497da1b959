"""Layer-wise sparsity allocation: pure functions from a model summary to per-layer ratios.

An allocator is registered with ``@register_allocator(name, needs=...)`` and called as
``fn(summary, target, **params) -> dict[layer_name, ratio]``. ``needs`` declares which parts of the
summary it reads: ``"shapes"`` (always there), ``"weights"`` (dense weight matrices),
``"outliers"`` (per-block Wanda outlier ratios of the dense model, for OWL-like methods),
``"scores"`` (per-layer score tensors, for a global threshold) or ``"engine"`` (it drives pruning
itself, e.g. MRP). Every allocator's result is passed through :func:`finalize`, which clips ratios to
``[0, max_ratio]`` and renormalises so that the parameter-weighted mean equals the target exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import PrunekitError


@dataclass
class LayerInfo:
    name: str
    block: int
    shape: tuple[int, int]  # (out_features, in_features)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass
class ModelSummary:
    layers: list[LayerInfo]
    weights: dict[str, torch.Tensor] | None = None  # name -> (out, in) weight, CPU, only if requested
    outliers: dict[float, list[float]] | None = None  # M -> per-block outlier ratio of dense Wanda scores
    scores: dict[str, torch.Tensor] | None = None  # name -> score tensor, only if requested
    extra: dict = field(default_factory=dict)

    @property
    def n_blocks(self) -> int:
        return max(l.block for l in self.layers) + 1

    def numels(self) -> torch.Tensor:
        return torch.tensor([l.numel for l in self.layers], dtype=torch.float64)


@dataclass(frozen=True)
class Allocator:
    name: str
    fn: Callable
    needs: frozenset[str]
    description: str = ""
    granularity: str = "block"  # the method's own level, used when the config does not choose one


ALLOCATORS: dict[str, Allocator] = {}


def register_allocator(name: str, needs=("shapes",), description: str = "", granularity: str = "block"):
    def deco(fn):
        ALLOCATORS[name] = Allocator(name, fn, frozenset(needs), description, granularity)
        return fn

    return deco


def get_allocator(name: str) -> Allocator:
    try:
        return ALLOCATORS[name]
    except KeyError:
        raise PrunekitError(f"unknown allocation {name!r}; valid: {', '.join(sorted(ALLOCATORS))}") from None


def finalize(ratios: torch.Tensor, numels: torch.Tensor, target: float, max_ratio: float = 0.99,
             tol: float = 1e-12) -> torch.Tensor:
    """Clip to [0, max_ratio] and rescale so that sum(r * n) / sum(n) == target exactly.

    Water-filling: layers at a bound stay there, the free ones are scaled (or shifted when all
    are zero) until the weighted mean is hit. Raises if the target is not reachable.
    """
    r = ratios.double().clone().clamp(0.0, max_ratio)
    n = numels.double()
    total = float((n).sum())
    if not 0.0 <= target <= max_ratio:
        raise PrunekitError(f"target sparsity {target} outside [0, max_ratio={max_ratio}]")
    for _ in range(100):
        cur = float((r * n).sum()) / total
        gap = target - cur
        if abs(gap) <= tol:
            break
        free = (r < max_ratio - 1e-15) if gap > 0 else (r > 1e-15)
        if not bool(free.any()):
            break
        nf = n[free]
        mass = float((r[free] * nf).sum())
        if mass > 0:
            scale = (mass + gap * total) / mass
            r[free] = r[free] * scale
        else:  # all free ratios are zero: spread evenly
            r[free] = r[free] + gap * total / float(nf.sum())
        r.clamp_(0.0, max_ratio)
    return r


def allocator_params(name: str) -> list[str]:
    """The parameter names allocator ``name`` takes (from its function's signature)."""
    import inspect

    sig = inspect.signature(get_allocator(name).fn)
    return [p.name for p in list(sig.parameters.values())[2:]  # after (summary, target)
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def check_allocation_params(name: str, params: dict) -> None:
    """Refuse parameter names allocator ``name`` does not take, before any calibration pass (the allocator
    itself would refuse them only after its statistics were gathered; ``uniform`` would ignore them)."""
    valid = allocator_params(name)
    unknown = sorted(k for k in params if k not in valid)
    if unknown:
        raise PrunekitError(f"allocation {name!r} has no parameter(s) {', '.join(map(repr, unknown))}; "
                            f"valid: {', '.join(valid) or 'none'}")


def allocate(name: str, summary: ModelSummary, target: float, granularity: str | None = None,
             max_ratio: float = 0.99, **params) -> dict[str, float]:
    """Run an allocator and return exact, clipped per-layer ratios.

    ``granularity='block'`` gives every layer of a block the block's ratio (the allocator's per-layer
    output is averaged per block, parameter-weighted, before finalising); ``None`` uses the method's
    own level (per layer for ER, ER-plus and the global threshold, per block for the others).
    """
    alloc = get_allocator(name)
    granularity = granularity or alloc.granularity
    raw = alloc.fn(summary, target, **params)
    r = torch.tensor([float(raw[l.name]) for l in summary.layers], dtype=torch.float64)
    n = summary.numels()
    if granularity == "block":
        blocks = torch.tensor([l.block for l in summary.layers])
        for b in blocks.unique():
            sel = blocks == b
            if not bool((r[sel] == r[sel][0]).all()):  # equal ratios stay bit-exact
                r[sel] = float((r[sel] * n[sel]).sum() / n[sel].sum())
    elif granularity != "layer":
        raise PrunekitError(f"granularity must be 'block' or 'layer', got {granularity!r}")
    r = finalize(r, n, target, max_ratio)
    return {l.name: float(v) for l, v in zip(summary.layers, r)}


@register_allocator("uniform", description="every layer at the target")
def uniform(summary: ModelSummary, target: float, **_) -> dict[str, float]:
    return {l.name: target for l in summary.layers}


# Further allocators register themselves on import (keep at the end of the file).
from . import extra as _extra  # noqa: E402,F401
