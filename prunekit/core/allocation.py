"""Layer-wise sparsity allocation: the contract every allocator follows, and the arithmetic they share.

An allocator is a pure function ``fn(summary, target, **params)`` registered with
``@register_allocator(name, needs=..., params=ParamsClass)``. Its inputs are the fields of
:class:`ModelSummary`; ``needs`` says which it reads beyond the layer shapes, and the pruning plan
(``prunekit.pruning.plan``) fills exactly those:

- ``"weights"``: the dense weight matrices (``summary.weights``);
- ``"outliers"``: per-block outlier ratios of the dense model's Wanda scores (``summary.outliers``, OWL);
- ``"scores"``: per-layer samples of the metric's scores on the dense model (``summary.scores``, global, DSA);
- ``"engine"``: ``summary.prune_to(ratios, M)``, which prunes the model in place and returns per-block outlier
  ratios (iterative allocators: MRP).

It returns per-layer ratios: a dict, or an :class:`Allocation` (a dict) whose ``info`` holds what the report
should show (fitted alphas, a threshold, a history). :func:`allocate` validates the parameters, averages per
block when asked, and passes the result through :func:`finalize`, which clips to ``[0, max_ratio]`` and makes
the parameter-weighted mean exactly the target.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import PrunekitError
from .registry import NoParams, Params, Registry


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
    """An allocator's inputs (see the module docstring): the layers, and what its ``needs`` asked for."""

    layers: list[LayerInfo]
    weights: dict[str, torch.Tensor] | None = None  # name -> (out, in) weight, CPU
    outliers: dict[float, list[float]] | None = None  # M -> per-block outlier ratio of dense Wanda scores
    scores: dict[str, torch.Tensor] | None = None  # name -> sorted sample of the metric's dense scores
    prune_to: Callable[[dict, float], list[float]] | None = None  # the in-place engine (MRP)

    @property
    def n_blocks(self) -> int:
        return max(l.block for l in self.layers) + 1

    def numels(self) -> torch.Tensor:
        return torch.tensor([l.numel for l in self.layers], dtype=torch.float64)

    def layer_weights(self) -> dict[str, torch.Tensor]:
        """The dense weight of every layer (for allocators that need ``"weights"``)."""
        if not self.weights:
            raise PrunekitError("this allocation needs the dense weights (summary.weights)")
        missing = [l.name for l in self.layers if l.name not in self.weights]
        if missing:
            raise PrunekitError(f"weights missing for {len(missing)} layer(s), e.g. {missing[0]}")
        return {l.name: self.weights[l.name] for l in self.layers}


class Allocation(dict):
    """Per-layer ratios (name -> ratio); ``info``: what the allocator reports besides them."""

    def __init__(self, ratios: dict, info: dict | None = None):
        super().__init__(ratios)
        self.info = dict(info or {})


@dataclass(frozen=True)
class Allocator:
    name: str
    fn: Callable
    needs: frozenset[str]
    description: str = ""
    granularity: str = "block"  # the method's own level, used when the config does not choose one
    params: type[Params] = NoParams
    auto: dict = field(default_factory=dict)  # parameter -> grid that ``"auto"`` searches (prunekit.pruning.auto)
    # Parameters a prune run tunes with ``"auto"`` unless the user gives a value: those whose published default
    # helped one measured model and hurt another (issue 23). The pure function and a given value keep the
    # published default (the Params default); ``tuned_params`` fills the ``"auto"``.
    default_auto: tuple[str, ...] = ()


ALLOCATORS: Registry[Allocator] = Registry("allocation")


def register_allocator(name: str, needs=(), description: str = "", granularity: str = "block",
                       params: type[Params] = NoParams, auto: dict | None = None, default_auto: tuple[str, ...] = ()):
    missing = [k for k in default_auto if k not in (auto or {})]
    if missing:
        raise ValueError(f"allocator {name!r}: default_auto {missing} has no 'auto' grid")

    def deco(fn):
        ALLOCATORS.add(name, Allocator(name, fn, frozenset(needs), description, granularity, params, dict(auto or {}),
                                       tuple(default_auto)))
        return fn

    return deco


def get_allocator(name: str) -> Allocator:
    return ALLOCATORS.get(name)


def check_allocation_params(name: str, params: dict) -> Params:
    """The allocator's parameters validated before any calibration pass (``"auto"`` where it has a grid)."""
    alloc = get_allocator(name)
    p = alloc.params.check(params, "allocation_params", name)
    bad = [k for k, v in p.kwargs().items() if v == "auto" and k not in alloc.auto]
    if bad:
        raise PrunekitError(f"allocation {name!r}: no 'auto' for {bad[0]}; 'auto' works for: "
                            f"{', '.join(alloc.auto) or 'none'}")
    return p


def tuned_params(name: str, given: dict) -> dict:
    """The parameters a prune run uses: ``given`` (in the user's order), then ``"auto"`` for each of the
    allocator's ``default_auto`` parameters that the user did not set."""
    return {**given, **{k: "auto" for k in _unset_default_auto(name, given)}}


def published_params(name: str, given: dict) -> dict:
    """``given`` plus the published (Params) default of each ``default_auto`` parameter not given: the run a
    caller means when it wants the paper's allocation rather than the tuned one (the benchmarks' stored runs)."""
    defaults = get_allocator(name).params()
    return {**given, **{k: getattr(defaults, k) for k in _unset_default_auto(name, given)}}


def _unset_default_auto(name: str, given: dict) -> list[str]:
    """The allocator's ``default_auto`` parameters that ``given`` leaves unset."""
    return [k for k in get_allocator(name).default_auto if k not in given]


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


def allocate(name: str, summary: ModelSummary, target: float, granularity: str | None = None,
             max_ratio: float = 0.99, **params) -> Allocation:
    """Run an allocator and return exact, clipped per-layer ratios (with the allocator's ``info``).

    ``granularity='block'`` gives every layer of a block the block's ratio (the allocator's per-layer
    output is averaged per block, parameter-weighted, before finalising); ``None`` uses the method's
    own level (per layer for ER, ER-plus and the global threshold, per block for the others).
    """
    alloc = get_allocator(name)
    p = alloc.params.check(params, "allocation_params", name)
    if any(v == "auto" for v in p.kwargs().values()):
        raise PrunekitError(f"allocation {name!r}: resolve 'auto' parameters first (prunekit.pruning.auto)")
    granularity = granularity or alloc.granularity
    raw = alloc.fn(summary, target, **p.kwargs())
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
    return Allocation({l.name: float(v) for l, v in zip(summary.layers, r)}, getattr(raw, "info", None))


def block_index(summary: ModelSummary) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """(sorted block ids, per-layer position of its block in that list, parameters per block)."""
    blocks = sorted({l.block for l in summary.layers})
    pos = {b: i for i, b in enumerate(blocks)}
    where = torch.tensor([pos[l.block] for l in summary.layers])
    numels = torch.zeros(len(blocks), dtype=torch.float64).index_add_(0, where, summary.numels())
    return blocks, where, numels


def linear_map_ratios(values, numels, target: float, eps: float) -> torch.Tensor:
    """AlphaPruning's mapping, shared by every metric-driven allocator.

    ``r_i = s1 + (v_i - v_min) / (v_max - v_min) * (s2 - s1)`` with ``s1 = 1 - eps``, ``s2 = 1 + eps``
    (larger value -> more pruning), then ``s_i = r_i * S * sum(N) / sum(N_i r_i)`` so that the
    ``numels``-weighted mean is exactly ``target`` before clipping. All values equal (to 1e-12
    relative) gives exactly ``target`` everywhere. No clipping here (:func:`finalize` does it).
    """
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    n = torch.as_tensor(numels, dtype=torch.float64).reshape(-1)
    if v.shape != n.shape:
        raise PrunekitError(f"{v.numel()} metric values for {n.numel()} groups")
    if not bool(torch.isfinite(v).all()):
        raise PrunekitError("metric values contain nan/inf (matrix too small for a power-law fit?)")
    if eps < 0:
        raise PrunekitError(f"eps must be >= 0, got {eps}")
    lo, hi = float(v.min()), float(v.max())
    if hi - lo <= 1e-12 * max(1.0, abs(hi), abs(lo)) or eps == 0:
        return torch.full_like(v, float(target))
    r = (1.0 - eps) + (v - lo) / (hi - lo) * (2.0 * eps)
    return r * float(target) * n.sum() / (n * r).sum()


def alpha_ratios(summary: ModelSummary, alphas: dict[str, float], target: float, eps: float,
                 level: str) -> tuple[dict[str, float], list[float] | None]:
    """Per-layer ratios from per-layer alphas by :func:`linear_map_ratios`: ``level="block"`` maps each block's
    mean alpha (returned too), ``"layer"`` each matrix's. Shared by AlphaPruning and FARMS."""
    a = torch.tensor([alphas[l.name] for l in summary.layers], dtype=torch.float64)
    if level == "block":
        blocks, where, numels = block_index(summary)
        count = torch.zeros(len(blocks), dtype=torch.float64).index_add_(0, where, torch.ones_like(a))
        ab = torch.zeros(len(blocks), dtype=torch.float64).index_add_(0, where, a) / count
        s = linear_map_ratios(ab, numels, target, eps)[where]
        return {l.name: float(x) for l, x in zip(summary.layers, s)}, ab.tolist()
    if level == "layer":
        s = linear_map_ratios(a, summary.numels(), target, eps)
        return {l.name: float(x) for l, x in zip(summary.layers, s)}, None
    raise PrunekitError(f"level must be 'block' or 'layer', got {level!r}")


def check_target(target: float) -> None:
    if not 0.0 <= float(target) <= 1.0:
        raise PrunekitError(f"target sparsity {target} outside [0, 1]")
