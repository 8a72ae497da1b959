"""Empirical spectral density (ESD) of weight matrices and power-law tail fits (HT-SR metrics).

Pure torch, CPU or CUDA, batched. Conventions (as in AlphaPruning and FARMS):

* eigenvalues of ``W^T W``: ``svdvals(W.float())**2``, **not** divided by N, sorted ascending;
  a matrix of shape (m, n) has ``min(m, n)`` of them. SVDs run in fp32, fits in float64.
* power-law fit (Clauset-style, as in AlphaPruning / WeightWatcher): for every candidate
  ``xmin = lambda_i`` the MLE ``alpha_i = 1 + n_i / sum_{k>=i} ln(lambda_k / lambda_i)``
  (``n_i`` = number of eigenvalues >= lambda_i) and the KS distance
  ``D_i = max_{j=0..n_i-1} |1 - (lambda_{i+j}/lambda_i)^(1-alpha_i) - j/n_i|``; the candidate with the
  smallest ``D_i`` wins (ties: the smallest xmin). Vectorised: tail log-sums are one reversed
  cumulative sum; the KS distances of all candidates are one masked (candidates x eigenvalues)
  computation, chunked to bound memory.

Candidate rules (documented choices):

* eigenvalues ``<= rel_floor * lambda_max`` (numerically zero, default 1e-10; and non-positive ones) are
  dropped before anything else;
* a candidate needs at least ``min_tail`` eigenvalues in its tail (default 10; 2 in compat mode,
  which is what the reference code does: every eigenvalue but the largest is a candidate); when a
  matrix has too few eigenvalues for that, ``min_tail`` shrinks to ``max(2, n // 2)``; fewer than 3
  positive eigenvalues give ``alpha = nan``;
* more than ``max_candidates`` (default 4096) candidates are thinned to every ``ceil(count / max)``-th
  one (smallest first), so the fit is exact for any matrix whose short side is <= 4096 (LLaMA-7B
  included) and stays O(max_candidates * n) for large pooled (FARMS) spectra. Every eigenvalue still
  enters the MLE and the KS distance of each candidate kept. ``max_candidates=None`` disables it.
* ``xmin_mode="peak"`` (WeightWatcher's "xmin_peak"): histogram ``log10(lambda)`` in 100 equal bins
  between its min and max; ``peak = 10 ** (left edge of the fullest bin)`` (first one on ties).
  Corrected mode (default, ``compat=False``): candidates with ``0.95 * peak <= lambda_i <= 1.5 * peak``,
  which is scale-invariant. ``compat=True`` reproduces the reference code, whose lower bound is
  ``log10(0.95 * peak)`` compared against *raw* eigenvalues: candidates with
  ``log10(0.95 * peak) <= lambda_i <= 1.5 * peak``. That bound is in log units, so in practice it
  removes nothing when ``peak < ~1`` (negative bound) and far too little otherwise; the result then
  depends on the scale of W. If no candidate falls in the window (only possible in pathological
  spectra), all candidates are used. Compat mode differs from the reference only in arithmetic
  (float64 here, fp32 there) and in dropping non-positive eigenvalues (the reference would take
  their log).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Literal, Optional, Sequence

import torch

from .registry import Int, Params

__all__ = [
    "PowerLawFit", "eigenvalues", "eigenvalues_many", "fit_power_law", "fit_power_law_many",
    "spectral_stats", "spectral_stats_many", "farms_windows", "farms_eigenvalues", "farms_fit",
    "farms_alpha",
]

_FIT_DTYPE = torch.float64
_DEFAULT_MAX_ELEMS = 1 << 22  # elements of one (batch x candidates x eigenvalues) KS chunk
_SVD_BATCH_ELEMS = 1 << 27  # matrix elements stacked into one batched svdvals call


@dataclass
class PowerLawFit:
    alpha: float  # power-law exponent of the ESD tail (nan if no fit was possible)
    xmin: float  # start of the tail (an eigenvalue)
    ks: float  # Kolmogorov-Smirnov distance of the fit over the tail
    n_tail: int  # eigenvalues >= xmin
    n: int  # eigenvalues used (positive ones)


# ----------------------------------------------------------------------------- eigenvalues

def eigenvalues(W: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of ``W^T W`` (``svdvals(W)**2`` in fp32), ascending, not normalised.

    Works on a batch ``(..., m, n)`` too (sorted along the last dim). Stays on ``W``'s device.
    """
    W = W.float()
    if W.shape[-2] < W.shape[-1]:  # same singular values; LAPACK is ~2x faster on tall matrices
        W = W.transpose(-2, -1)
    s = torch.linalg.svdvals(W)
    return (s * s).flip(-1)  # svdvals are descending; flip keeps exact values


def _device_of(device, tensors: Iterable[torch.Tensor]) -> torch.device:
    if device is not None:
        return torch.device(device)
    for t in tensors:
        return t.device
    return torch.device("cpu")


def _group_by_shape(shapes: Sequence[tuple]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(shapes):
        groups.setdefault(tuple(s), []).append(i)
    return groups


def _batched_eigs(mats: Sequence[torch.Tensor], device: torch.device,
                  max_elems: int = _SVD_BATCH_ELEMS) -> torch.Tensor:
    """Eigenvalues of equally shaped matrices, stacked ``(B, min(m, n))``, in chunks of <= max_elems."""
    m, n = mats[0].shape
    per = max(1, max_elems // max(1, m * n))
    out = []
    for a in range(0, len(mats), per):
        stack = torch.stack([w.to(device=device, dtype=torch.float32) for w in mats[a:a + per]])
        out.append(eigenvalues(stack))
        del stack
    return torch.cat(out)


def eigenvalues_many(weights: Sequence[torch.Tensor], device=None) -> list[torch.Tensor]:
    """``eigenvalues`` of many 2-D matrices; equal shapes share one batched ``svdvals`` call.

    Returns a list in input order, each tensor on ``device`` (default: the first matrix's device).
    """
    weights = list(weights)
    dev = _device_of(device, weights)
    out: list[torch.Tensor | None] = [None] * len(weights)
    for shape, idx in _group_by_shape([tuple(w.shape) for w in weights]).items():
        if len(shape) != 2:
            raise ValueError(f"eigenvalues_many expects 2-D matrices, got shape {shape}")
        eigs = _batched_eigs([weights[i] for i in idx], dev)
        for row, i in enumerate(idx):
            out[i] = eigs[row]
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------- power-law fit

def _peak_window(E: torch.Tensor, valid: torch.Tensor, compat: bool, bins: int = 100):
    """Per-row (lower, upper) bounds of the xmin_peak candidate window (see module docstring)."""
    B, N = E.shape
    L = torch.log10(torch.where(valid, E, torch.ones_like(E)))
    big = torch.finfo(E.dtype).max
    mn = torch.where(valid, L, torch.full_like(L, big)).amin(1, keepdim=True)
    mx = torch.where(valid, L, torch.full_like(L, -big)).amax(1, keepdim=True)
    width = (mx - mn) / bins
    safe = torch.where(width > 0, width, torch.ones_like(width))
    b = torch.floor((L - mn) / safe).clamp(0, bins - 1).long()
    b = torch.where(valid & (width > 0), b, torch.where(valid, torch.zeros_like(b), torch.full_like(b, bins)))
    counts = torch.zeros(B, bins + 1, dtype=E.dtype, device=E.device)
    counts.scatter_add_(1, b, torch.ones_like(E))
    ih = counts[:, :bins].argmax(1, keepdim=True).to(E.dtype)
    peak = 10.0 ** (mn + ih * width)
    lower = torch.log10(0.95 * peak) if compat else 0.95 * peak
    return lower, 1.5 * peak


def _fit_rows(E: torch.Tensor, xmin_mode: str = "all", compat: bool = False, min_tail: int | None = None,
              max_candidates: int | None = 4096, rel_floor: float = 1e-10,
              max_elems: int | None = None):
    """Fit every row of ``E`` (B, N) (eigenvalues, any order). Returns tensors alpha, xmin, ks, n_tail, n."""
    if xmin_mode not in ("all", "peak"):
        raise ValueError(f"xmin_mode must be 'all' or 'peak', got {xmin_mode!r}")
    if E.dim() == 1:
        E = E[None]
    E = torch.sort(E.to(_FIT_DTYPE), dim=1).values
    B, N = E.shape
    dev = E.device
    if max_elems is None:  # memory of one KS chunk: 32 MB per temporary on CPU, 256 MB on GPU
        max_elems = _DEFAULT_MAX_ELEMS if dev.type == "cpu" else 8 * _DEFAULT_MAX_ELEMS
    if min_tail is None:
        min_tail = 2 if compat else 10
    min_tail = max(2, int(min_tail))

    top = E[:, -1:]
    valid = (E > 0) & (E > rel_floor * top)
    n_valid = valid.sum(1)  # (B,)
    tiny = torch.finfo(_FIT_DTYPE).tiny
    logE = torch.log(E.clamp_min(tiny))
    logE = logE - logE[:, -1:]  # shift for accuracy of the tail sums (alpha is shift-invariant)
    tail_sum = logE.flip(1).cumsum(1).flip(1)  # sum_{k>=i} log lambda_k
    idx = torch.arange(N, device=dev)
    n_i = (N - idx).to(_FIT_DTYPE).expand(B, N)
    denom = tail_sum - n_i * logE
    alpha = 1.0 + n_i / torch.where(denom > 0, denom, torch.ones_like(denom))

    eff_min = torch.clamp(torch.div(n_valid, 2, rounding_mode="floor"), min=2, max=min_tail)
    cand = valid & (n_i >= eff_min[:, None]) & (denom > 0) & (alpha > 1) & (n_valid >= 3)[:, None]
    if xmin_mode == "peak":
        lo, hi = _peak_window(E, valid, compat)
        win = cand & (E >= lo) & (E <= hi)
        cand = torch.where(win.any(1, keepdim=True), win, cand)
    if max_candidates is not None:
        count = cand.sum(1, keepdim=True)
        step = torch.clamp(torch.div(count + max_candidates - 1, max_candidates, rounding_mode="floor"), min=1)
        rank = cand.long().cumsum(1) - 1
        cand = cand & (rank % step == 0)

    # Candidate indices per row, padded (pad index N-1 with mask False).
    C = int(cand.sum(1).max()) if B else 0
    nan = torch.full((B,), float("nan"), dtype=_FIT_DTYPE, device=dev)
    if C == 0:
        return nan, nan, nan, torch.zeros(B, dtype=torch.long, device=dev), n_valid
    order = torch.sort((~cand).to(torch.int8), dim=1, stable=True).indices[:, :C]  # candidates first, ascending
    cmask = torch.gather(cand, 1, order)
    D = torch.full((B, C), float("inf"), dtype=_FIT_DTYPE, device=dev)
    # Small row chunks: a chunk only needs the columns k >= its smallest candidate (saves ~half).
    chunk = max(1, min(256, max_elems // max(1, B * N)))
    for a in range(0, C, chunk):
        ii = order[:, a:a + chunk]  # (B, c) ascending within each row
        cm = cmask[:, a:a + chunk]
        first = int(torch.where(cm, ii, torch.full_like(ii, N - 1)).min())
        a_i = torch.gather(alpha, 1, ii)[..., None]
        l_i = torch.gather(logE, 1, ii)[..., None]
        n_c = torch.gather(n_i, 1, ii)[..., None]
        # For k < i both the log-ratio and j are clamped to 0, which gives |1 - 1 - 0| = 0: no mask needed.
        x = logE[:, None, first:] - l_i
        x.clamp_(min=0).mul_(1.0 - a_i).exp_()  # (lambda_k / lambda_i)^(1 - alpha_i)
        j = (idx[first:][None, None, :] - ii[..., None]).clamp_(min=0).to(_FIT_DTYPE).div_(n_c)
        x.add_(j).sub_(1.0).abs_()  # |1 - (lambda_k/lambda_i)^(1-alpha) - j/n_i|
        D[:, a:a + chunk] = torch.where(cm, x.amax(-1), torch.full_like(cm, float("inf"), dtype=_FIT_DTYPE))
        del x, j
    best = D.argmin(1, keepdim=True)  # first minimum -> smallest xmin among ties
    bi = torch.gather(order, 1, best)
    has = cmask.any(1)
    a_out = torch.where(has, torch.gather(alpha, 1, bi)[:, 0], nan)
    x_out = torch.where(has, torch.gather(E, 1, bi)[:, 0], nan)
    k_out = torch.where(has, torch.gather(D, 1, best)[:, 0], nan)
    t_out = torch.where(has, (N - bi[:, 0]), torch.zeros_like(bi[:, 0]))
    return a_out, x_out, k_out, t_out, n_valid


def fit_power_law_many(E: torch.Tensor, xmin_mode: str = "all", compat: bool = False, **kw) -> list[PowerLawFit]:
    """Batched :func:`fit_power_law` over the rows of ``E`` (B, N)."""
    a, x, k, t, n = _fit_rows(E, xmin_mode, compat, **kw)
    a, x, k, t, n = (v.cpu().tolist() for v in (a, x, k, t, n))
    return [PowerLawFit(float(a[i]), float(x[i]), float(k[i]), int(t[i]), int(n[i])) for i in range(len(a))]


def fit_power_law(eigs: torch.Tensor, xmin_mode: str = "all", compat: bool = False, *,
                  min_tail: int | None = None, max_candidates: int | None = 4096,
                  rel_floor: float = 1e-10, max_elems: int | None = None) -> PowerLawFit:
    """Fit a power law ``p(x) ~ x^-alpha`` to the tail of a 1-D set of eigenvalues.

    ``xmin_mode``: "all" (every eigenvalue is a candidate xmin) or "peak" (window around the
    log-histogram peak). ``compat=True`` reproduces the reference code's scale-dependent peak window
    (see the module docstring); ``compat=False`` (default) is the corrected, scale-invariant one.
    Returns alpha = nan when no candidate exists (fewer than 3 positive eigenvalues).
    """
    eigs = torch.as_tensor(eigs)
    if eigs.dim() != 1:
        raise ValueError(f"fit_power_law expects a 1-D tensor, got shape {tuple(eigs.shape)}")
    return fit_power_law_many(eigs[None], xmin_mode, compat, min_tail=min_tail, max_candidates=max_candidates,
                              rel_floor=rel_floor, max_elems=max_elems)[0]


# ----------------------------------------------------------------------------- spectral statistics

def _stats_from(E: torch.Tensor, shape, fits: list[PowerLawFit]) -> list[dict]:
    E = E.to(_FIT_DTYPE)
    top = E.amax(1)
    total = E.sum(1)
    out = []
    for i, f in enumerate(fits):
        lmax = float(top[i])
        out.append({
            "alpha": f.alpha,
            "alpha_hat": f.alpha * math.log10(lmax) if lmax > 0 else float("nan"),
            "stable_rank": float(total[i]) / lmax if lmax > 0 else float("nan"),
            "spectral_norm": lmax,
            "xmin": f.xmin,
            "ks": f.ks,
            "n_tail": f.n_tail,
            "shape": tuple(int(s) for s in shape),
        })
    return out


def spectral_stats(W: torch.Tensor, **fit_kw) -> dict:
    """HT-SR statistics of one matrix: alpha, alpha_hat = alpha * log10(lambda_max), stable_rank =
    sum(lambda) / lambda_max, spectral_norm = lambda_max (largest eigenvalue of W^T W), xmin, ks,
    n_tail, shape. ``fit_kw`` go to :func:`fit_power_law`."""
    E = eigenvalues(W)[None]
    return _stats_from(E, W.shape, fit_power_law_many(E, **fit_kw))[0]


def spectral_stats_many(named_weights: dict[str, torch.Tensor], device=None, **fit_kw) -> dict[str, dict]:
    """:func:`spectral_stats` of many matrices: one batched SVD and one batched fit per shape."""
    names = list(named_weights)
    dev = _device_of(device, named_weights.values())
    out: dict[str, dict] = {}
    for shape, idx in _group_by_shape([tuple(named_weights[k].shape) for k in names]).items():
        group = [names[i] for i in idx]
        E = _batched_eigs([named_weights[k] for k in group], dev)
        for k, st in zip(group, _stats_from(E, shape, fit_power_law_many(E, **fit_kw))):
            out[k] = st
    return {k: out[k] for k in names}


# ----------------------------------------------------------------------------- FARMS

def farms_windows(shape: tuple[int, int], max_side: int = 2000, q: float = 1.0, grid: int = 12):
    """Window size and top-left corners of the FARMS submatrices of a (m, n) matrix.

    The short side of the window is ``n' = min(max_side, min(m, n))`` and lies along the short side of
    the matrix; the other side is ``min(max(1, round(n' * q)), long side)`` (so it always fits).
    Corners are ``grid`` evenly spaced positions per dimension (rounded, duplicates removed), i.e. a
    sliding window covering the matrix. Returns ``((h, w), rows, cols)``.
    """
    m, n = int(shape[0]), int(shape[1])
    short, long = min(m, n), max(m, n)
    a = max(1, min(int(max_side), short))
    b = min(max(1, int(round(a * q))), long)
    h, w = (a, b) if m <= n else (b, a)
    if h > m or w > n:  # q < 1 with a square-ish matrix: keep both sides inside
        h, w = min(h, m), min(w, n)

    def pos(L, s):
        return sorted({int(round(x)) for x in torch.linspace(0, L - s, max(1, grid)).tolist()})

    return (h, w), pos(m, h), pos(n, w)


def farms_eigenvalues(W: torch.Tensor, max_side: int = 2000, q: float = 1.0, grid: int = 12,
                      device=None) -> torch.Tensor:
    """Pooled (concatenated) eigenvalues of all FARMS windows of ``W`` (see :func:`farms_windows`),
    ascending. Windows go through batched ``svdvals`` in chunks."""
    dev = _device_of(device, [W])
    Wd = W.to(device=dev, dtype=torch.float32)
    (h, w), rows, cols = farms_windows(tuple(W.shape), max_side, q, grid)
    corners = [(r, c) for r in rows for c in cols]
    per = max(1, _SVD_BATCH_ELEMS // (h * w))
    out = []
    for a in range(0, len(corners), per):
        stack = torch.stack([Wd[r:r + h, c:c + w] for r, c in corners[a:a + per]])
        out.append(eigenvalues(stack).reshape(-1))
    return torch.sort(torch.cat(out)).values


def farms_fit(W: torch.Tensor, max_side: int = 2000, q: float = 1.0, grid: int = 12, device=None,
              **fit_kw) -> PowerLawFit:
    """:func:`fit_power_law` on :func:`farms_eigenvalues`."""
    return fit_power_law(farms_eigenvalues(W, max_side, q, grid, device), **fit_kw)


def farms_alpha(W: torch.Tensor, max_side: int = 2000, q: float = 1.0, grid: int = 12, device=None,
                **fit_kw) -> float:
    """FARMS alpha of one matrix (see :func:`farms_fit`)."""
    return farms_fit(W, max_side, q, grid, device, **fit_kw).alpha


# ----------------------------------------------------------------------------- per-layer alphas

class ESDFitParams(Params):
    """The fit's settings, as allocators built on ESD alphas expose them (see the module docstring)."""

    xmin_mode: Literal["all", "peak"] = "all"
    compat: bool = False
    device: Optional[str] = None  # where the SVDs run (default: CUDA when available)
    min_tail: Optional[Int] = None
    max_candidates: Optional[Int] = 4096


def default_device(device=None):
    """``device``, or CUDA when available, else the CPU (SVDs are the cost of an ESD fit)."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def layer_alphas(weights: dict[str, torch.Tensor], kind: str = "alpha", device=None, xmin_mode: str = "all",
                 compat: bool = False, max_side: int = 2000, q: float = 1.0, grid: int = 12,
                 **fit_kw) -> tuple[dict[str, float], dict[str, dict] | None]:
    """Per-matrix power-law alpha: ``kind="alpha"``, the ESD of each full matrix (batched SVD per shape), also
    returning the full :func:`spectral_stats` per matrix; ``kind="farms"``, the pooled ESD of the FARMS
    windows (stats None). ``device=None``: CUDA when available."""
    dev = default_device(device)
    fit_kw = dict(fit_kw, xmin_mode=xmin_mode, compat=compat)
    if kind == "alpha":
        stats = spectral_stats_many(weights, device=dev, **fit_kw)
        return {k: v["alpha"] for k, v in stats.items()}, stats
    if kind == "farms":
        return {k: farms_fit(W, max_side, q, grid, dev, **fit_kw).alpha for k, W in weights.items()}, None
    raise ValueError(f"kind must be 'alpha' or 'farms', got {kind!r}")
