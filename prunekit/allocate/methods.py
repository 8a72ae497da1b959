"""Layer-wise allocators from the literature: ER, ER-plus, OWL, AlphaPruning, FARMS.

Every function returns raw per-layer ratios; :func:`prunekit.allocate.allocate` then averages per
block (``granularity='block'``), clips to ``[0, max_ratio]`` and renormalises to the exact target.
See ``methods.md``, "Layer-wise sparsity allocation".
"""
from __future__ import annotations

import torch

from ..errors import PrunekitError
from . import ModelSummary, register_allocator
from .esd import farms_fit, spectral_stats_many

__all__ = ["linear_map_ratios", "block_index", "layer_alphas", "er", "er_plus", "owl", "alphapruning", "farms"]


def _check_params(name: str, unused: dict) -> None:
    if unused:
        raise PrunekitError(f"allocation {name!r} got unknown parameter(s): {', '.join(sorted(unused))}")


def _check_target(target: float) -> None:
    if not 0.0 <= float(target) <= 1.0:
        raise PrunekitError(f"target sparsity {target} outside [0, 1]")


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


# ----------------------------------------------------------------------------- ER / ER-plus

def _er_density(summary: ModelSummary, target: float, dense: torch.Tensor | None = None) -> torch.Tensor:
    """ER densities ``c * (n_in + n_out) / (n_in * n_out)`` with the weighted density = 1 - target.

    ``dense`` (bool per layer) marks layers kept at density 1; the others share the remaining budget.
    """
    n = summary.numels()
    e = torch.tensor([(l.shape[0] + l.shape[1]) / (l.shape[0] * l.shape[1]) for l in summary.layers],
                     dtype=torch.float64)
    budget = (1.0 - float(target)) * float(n.sum())
    d = torch.ones_like(e)
    free = torch.ones_like(e, dtype=torch.bool) if dense is None else ~dense
    budget -= float(n[~free].sum())
    if not bool(free.any()) or budget <= 0:
        raise PrunekitError(f"target {target} cannot be reached with the dense layers of ER-plus")
    d[free] = e[free] * budget / float((n[free] * e[free]).sum())
    return d


@register_allocator("er", granularity="layer", description="Erdos-Renyi: density ~ (n_in + n_out) / (n_in * n_out)")
def er(summary: ModelSummary, target: float, **unused) -> dict[str, float]:
    """ER (Mocanu et al.; Evci et al.): density proportional to ``(n_in + n_out) / (n_in n_out)``,
    scaled so the parameter-weighted density is ``1 - target``; ratio = 1 - density (layers whose
    density would exceed 1 are clipped to ratio 0 and the rest renormalised by ``finalize``)."""
    _check_params("er", unused)
    _check_target(target)
    d = _er_density(summary, target)
    return {l.name: float(1.0 - x) for l, x in zip(summary.layers, d)}


@register_allocator("er-plus", granularity="layer", description="ER with the last pruned layer kept dense (LLM adaptation)")
def er_plus(summary: ModelSummary, target: float, dense_last: str = "layer", **unused) -> dict[str, float]:
    """ER-plus, adapted to LLMs (documented choice; the paper's adaptation is unverified).

    Liu et al. (ICLR'22, "The unreasonable effectiveness of random pruning") define ER-plus / ERK-plus
    as ER(K) that forces the *last layer* (the classifier) dense while keeping the overall parameter
    budget. An LLM's classifier (``lm_head``) is never pruned here, so the analogue used is the last
    prunable layer before it: ``dense_last="layer"`` (default) keeps the last layer of the last
    block (e.g. ``mlp.down_proj``) dense; ``dense_last="block"`` keeps the whole last block dense.
    All other layers get ER densities rescaled so the global target is still met exactly.
    With ``granularity='block'`` the dense layer is averaged into its block's ratio (use
    ``granularity='layer'`` for the layer-level variant).
    """
    _check_params("er-plus", unused)
    _check_target(target)
    last_block = max(l.block for l in summary.layers)
    if dense_last == "layer":
        last = max(i for i, l in enumerate(summary.layers) if l.block == last_block)
        dense = torch.tensor([i == last for i in range(len(summary.layers))])
    elif dense_last == "block":
        dense = torch.tensor([l.block == last_block for l in summary.layers])
    else:
        raise PrunekitError(f"dense_last must be 'layer' or 'block', got {dense_last!r}")
    d = _er_density(summary, target, dense)
    return {l.name: float(1.0 - x) for l, x in zip(summary.layers, d)}


# ----------------------------------------------------------------------------- OWL

@register_allocator("owl", needs=("outliers",), description="OWL: less pruning for blocks with more outliers")
def owl(summary: ModelSummary, target: float, M: float = 5, lam: float = 0.08, **unused) -> dict[str, float]:
    """OWL (Yin et al. 2024). ``D_b = summary.outliers[M][b]`` (outlier ratio of block b's dense Wanda
    scores); ``D~ = (D - min) / (max - min) * 2 lam`` (all equal -> 0); block ratio
    ``s_b = 1 - (D~_b - mean(D~) + 1 - S) = S + mean(D~) - D~_b`` in ``[S - lam, S + lam]``, shared by
    all layers of the block (mean over blocks, unweighted: blocks have equal size in LLMs;
    ``finalize`` makes the weighted mean exact). ``lam = 0`` gives exactly ``S`` everywhere.
    """
    _check_params("owl", unused)
    _check_target(target)
    if lam < 0:
        raise PrunekitError(f"lam must be >= 0, got {lam}")
    if not summary.outliers:
        raise PrunekitError("OWL needs outlier ratios (summary.outliers); none were collected")
    if M not in summary.outliers:
        raise PrunekitError(f"OWL: no outlier ratios for M={M}; collected: {sorted(summary.outliers)}")
    blocks, where, _ = block_index(summary)
    D = torch.as_tensor(summary.outliers[M], dtype=torch.float64)
    if D.numel() < len(blocks) or D.numel() <= max(blocks):
        raise PrunekitError(f"OWL: {D.numel()} outlier ratios for blocks up to {max(blocks)}")
    D = D[torch.tensor(blocks)]
    lo, hi = float(D.min()), float(D.max())
    Dt = torch.zeros_like(D) if hi <= lo else (D - lo) / (hi - lo) * (2.0 * lam)
    s = float(target) + (Dt.mean() - Dt)
    return {l.name: float(s[where[i]]) for i, l in enumerate(summary.layers)}


# ----------------------------------------------------------------------------- AlphaPruning / FARMS

def _device(device):
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def layer_alphas(summary: ModelSummary, kind: str = "alpha", device=None, xmin_mode: str = "all",
                 compat: bool = False, max_side: int = 2000, q: float = 1.0, grid: int = 12,
                 **fit_kw) -> dict[str, float]:
    """Per-layer power-law alpha of the dense weights, independent of the allocation granularity.

    ``kind="alpha"``: ESD of each full matrix (batched SVD per shape); ``kind="farms"``: pooled ESD of
    FARMS windows. Also stores the result in ``summary.extra[kind]`` (``"alpha"`` or ``"farms_alpha"``)
    and the full statistics of ``kind="alpha"`` in ``summary.extra["esd"]`` for reports.
    ``device=None``: CUDA when available, else CPU.
    """
    if not summary.weights:
        raise PrunekitError("this allocation needs the dense weights (summary.weights)")
    missing = [l.name for l in summary.layers if l.name not in summary.weights]
    if missing:
        raise PrunekitError(f"weights missing for {len(missing)} layer(s), e.g. {missing[0]}")
    dev = _device(device)
    fit_kw = dict(fit_kw, xmin_mode=xmin_mode, compat=compat)
    if kind == "alpha":
        stats = spectral_stats_many({l.name: summary.weights[l.name] for l in summary.layers}, device=dev, **fit_kw)
        alphas = {k: v["alpha"] for k, v in stats.items()}
        summary.extra["esd"] = stats
        summary.extra["alpha"] = alphas
    elif kind == "farms":
        alphas = {l.name: farms_fit(summary.weights[l.name], max_side, q, grid, dev, **fit_kw).alpha
                  for l in summary.layers}
        summary.extra["farms_alpha"] = alphas
    else:
        raise PrunekitError(f"kind must be 'alpha' or 'farms', got {kind!r}")
    return alphas


def _map_alphas(summary: ModelSummary, alphas: dict[str, float], target: float, eps: float,
                level: str, key: str) -> dict[str, float]:
    a = torch.tensor([alphas[l.name] for l in summary.layers], dtype=torch.float64)
    if level == "block":
        blocks, where, numels = block_index(summary)
        count = torch.zeros(len(blocks), dtype=torch.float64).index_add_(0, where, torch.ones_like(a))
        ab = torch.zeros(len(blocks), dtype=torch.float64).index_add_(0, where, a) / count
        summary.extra[f"{key}_block"] = ab.tolist()
        s = linear_map_ratios(ab, numels, target, eps)[where]
    elif level == "layer":
        s = linear_map_ratios(a, summary.numels(), target, eps)
    else:
        raise PrunekitError(f"level must be 'block' or 'layer', got {level!r}")
    return {l.name: float(x) for l, x in zip(summary.layers, s)}


@register_allocator("alphapruning", needs=("weights",),
                    description="AlphaPruning: ESD power-law alpha, larger alpha -> more pruning")
def alphapruning(summary: ModelSummary, target: float, eps: float = 0.3, xmin_mode: str = "all",
                 compat: bool = False, level: str = "block", device=None, min_tail: int | None = None,
                 max_candidates: int | None = 4096, **unused) -> dict[str, float]:
    """AlphaPruning (Lu et al. 2024). alpha of every matrix (:func:`layer_alphas`); ``level="block"``
    (the paper's default): mean alpha over each block's matrices, one ratio per block; ``level="layer"``:
    one ratio per matrix (use with ``granularity='layer'``). Ratios by :func:`linear_map_ratios`
    (``[1-eps, 1+eps] * S``, rescaled to the target). ``xmin_mode``/``compat``: see ``esd``."""
    _check_params("alphapruning", unused)
    _check_target(target)
    alphas = layer_alphas(summary, "alpha", device, xmin_mode, compat, min_tail=min_tail,
                          max_candidates=max_candidates)
    return _map_alphas(summary, alphas, target, eps, level, "alpha")


@register_allocator("farms", needs=("weights",),
                    description="FARMS: AlphaPruning mapping on fixed-aspect-ratio submatrix ESDs")
def farms(summary: ModelSummary, target: float, eps: float = 0.3, max_side: int = 2000, q: float = 1.0,
          grid: int = 12, xmin_mode: str = "all", compat: bool = False, level: str = "block", device=None,
          min_tail: int | None = None, max_candidates: int | None = 4096, **unused) -> dict[str, float]:
    """FARMS: like :func:`alphapruning` but alpha is fitted on the pooled eigenvalues of ``n' x n'q``
    windows (``n' = min(max_side, min(m, n))``, ``grid`` positions per dimension), which removes the
    aspect-ratio bias between square and rectangular matrices."""
    _check_params("farms", unused)
    _check_target(target)
    alphas = layer_alphas(summary, "farms", device, xmin_mode, compat, max_side, q, grid, min_tail=min_tail,
                          max_candidates=max_candidates)
    return _map_alphas(summary, alphas, target, eps, level, "farms_alpha")
