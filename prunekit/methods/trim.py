"""Row-wise sparsity allocation inside one linear layer (TRIM).

A row-wise allocator turns a layer's target sparsity ``s`` into one ratio per output row, which
:func:`prunekit.masks.rowwise_mask` turns into a mask (row ``r`` drops its ``floor(d_in * s_r)``
lowest scores). It works on top of any score metric (magnitude, Wanda, RIA, ...); solvers that
build their own masks (SparseGPT) are not supported.

TRIM (row-wise, iterative, metric-driven allocation)
--------------------------------------------------------
X holds the inputs of the last token of each calibration sample, shape (n, d_in) (the paper's
choice; ``rowwise_params={"tokens_per_sample": k}`` takes k evenly spaced positions ending at the last
token instead, k x more rows from the same calibration data; the config's ``rowwise_skip`` patterns
name layers that keep the metric's plain mask instead; ``{"inputs": "all"}`` scores on every calibration
token instead, through a square-root factor of X^T X, see :func:`gram_factor`). Start from the uniform allocation
``x_r = s``. Each iteration:

1. prune with the current allocation, giving ``W_p``;
2. ``q_r`` = cosine similarity between row ``r`` of ``W X^T`` and of ``W_p X^T`` (per output
   channel, over the n samples);
3. ``x += centred(minmax(q) * 2 * lr)``: better-preserved rows get pruned more (for lr > 0);
4. project back: clip to ``[0, max_row]`` *and* mean ``s``. A plain clip followed by a shift is not
   enough (the shift can push rows out of the box again), so we take the fixed point of
   alternating clip / re-centre directly: the one shift ``t`` with ``mean(clip(x + t, 0, max_row))
   == s`` (a plain shift when that stays in the box; else bisection on ``t``, whose left side is
   continuous and non-decreasing, then ``t`` solved exactly from the rows not at a bound). Both
   conditions then hold (the mean to ~1e-15); see :func:`project_mean_box`.

The layer score is the cosine similarity of the flattened outputs ``W X^T`` and ``W_p X^T``.
For each lr (increasing), run ``iters`` iterations from the uniform start and keep the best ``x``
by layer score; stop at the first lr whose best does not improve on the best so far. If no
positive lr beats uniform, try the negative lrs the same way. The best allocation overall is
returned; uniform is a candidate, so the result never scores below uniform.

Exact total (``total="uniform"``, the default)
---------------------------------------------
(Under the engine's default ``row_rounding: exact`` TRIM gets the plain mask's per-row counts instead,
``uniform_counts = masks.row_counts(scores, s)``: total ``int(out * d_in * s)``, the layer's ratio to one weight;
those counts are then the uniform candidate, so "never below uniform" is relative to the mask TRIM replaces.)
TRIM keeps the layer's total sparsity exact: every candidate (not only the final one) is turned
into integer per-row counts whose sum is exactly what the uniform per-row mask prunes,
``K = out * int(d_in * s)`` (the count of ``unstructured_mask(scores, s, group="row")`` and of
``rowwise_mask`` with every ratio ``s``). Counts are ``floor(d_in * x_r)`` corrected by the largest-
remainder rule (rows with the largest fractional part get +1 first, rows with the smallest get
-1 first), within ``[0, floor(d_in * max_row)]``. Scoring happens on these exact-count masks, so
the search compares allocations with the same number of pruned weights as uniform. With
``total="layer"`` the count is ``int(out * d_in * s)`` instead (matches a per-layer threshold; it
may prune up to ``out - 1`` more weights than uniform per-row, so the "never below uniform" guarantee
is then relative to the uniform allocation rounded to that same count).

The returned ratios are ``count / d_in`` in float64 (one ulp higher where float rounding would lose
a weight), for which ``rowwise_mask`` reproduces the counts exactly; keep them float64 (a float32
copy can floor one short). The integer counts are also in ``info["counts"]``.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from ..core.errors import PrunekitError
from ..core.registry import Floats, Int, Params
from ..core.rowwise import register_rowwise

DEFAULT_LRS = (0.01, 0.02, 0.04, 0.08, 0.12, 0.16)
DEFAULT_NEG_LRS = (-0.01, -0.02, -0.04)


# ---- helpers ---------------------------------------------------------------------------------
def project_mean_box(x: torch.Tensor, target: float, hi: float, steps: int = 100) -> torch.Tensor:
    """The clip-to-[0, hi] / re-centre-to-mean-``target`` fixed point: ``clip(x + t, 0, hi)`` with
    the shift ``t`` that makes the mean equal ``target`` (needs 0 <= target <= hi). A plain shift
    when that stays in the box; otherwise bisection on ``t`` finds which rows sit at a bound, and
    ``t`` is then solved in closed form from the free rows."""
    x = x.double()
    n = x.numel()
    t = target - float(x.mean())
    if float(x.min()) + t >= 0.0 and float(x.max()) + t <= hi:
        return x + t
    lo_t, hi_t = -float(x.max()), hi - float(x.min())  # mean 0 at lo_t, mean hi at hi_t
    for _ in range(steps):
        mid = 0.5 * (lo_t + hi_t)
        if float((x + mid).clamp(0.0, hi).mean()) < target:
            lo_t = mid
        else:
            hi_t = mid
    t = 0.5 * (lo_t + hi_t)
    y = x + t
    free = (y > 0.0) & (y < hi)
    if bool(free.any()):
        n_hi = int((y >= hi).sum())
        t = (target * n - hi * n_hi - float(x[free].sum())) / int(free.sum())
    return (x + t).clamp(0.0, hi)


def counts_with_total(x: torch.Tensor, d_in: int, total: int, cap: int) -> torch.Tensor:
    """Integer per-row counts close to ``x * d_in`` with ``sum == total`` and each in [0, cap]
    (floor, then largest-remainder corrections; ties by row index, so deterministic)."""
    y = x.double() * d_in
    c = torch.floor(y).clamp(0, cap).long()
    frac = y - c.double()
    out = c.numel()
    if not 0 <= total <= out * cap:
        raise PrunekitError(f"cannot place {total} pruned weights in {out} rows of at most {cap}")
    d = total - int(c.sum())
    while d != 0:
        if d > 0:
            room = c < cap
            key = torch.where(room, frac, torch.full_like(frac, -float("inf")))
            order = torch.sort(key, descending=True, stable=True).indices
        else:
            room = c > 0
            key = torch.where(room, frac, torch.full_like(frac, float("inf")))
            order = torch.sort(key, stable=True).indices
        take = order[: min(abs(d), int(room.sum()))]
        step = 1 if d > 0 else -1
        c[take] += step
        frac[take] -= step  # a second round (rare) prefers other rows first
        d -= step * take.numel()
    return c


def ratios_from_counts(counts: torch.Tensor, d_in: int) -> torch.Tensor:
    """Row ratios (float64) for which ``rowwise_mask`` prunes exactly ``counts``: ``count / d_in``,
    nudged up by one ulp where rounding would make ``floor(d_in * r)`` fall one short (1/49*49 < 1)."""
    r = counts.double() / d_in
    short = torch.floor(r * d_in) < counts.double()
    return torch.where(short, torch.nextafter(r, torch.full_like(r, 2.0)), r)


def _minmax(q: torch.Tensor) -> torch.Tensor:
    span = q.max() - q.min()
    if not span > 0:
        return torch.zeros_like(q)
    return (q - q.min()) / span


def trim_update(x: torch.Tensor, q: torch.Tensor, lr: float, target: float, hi: float) -> torch.Tensor:
    """One TRIM step: ``x + centred(minmax(q) * 2 * lr)``, projected to [0, hi] with mean ``target``.
    For lr > 0 the rows whose outputs are better preserved (higher ``q``) get pruned more."""
    step = _minmax(q.double()) * (2.0 * lr)
    return project_mean_box(x + (step - step.mean()), target, hi)


# ---- TRIM ------------------------------------------------------------------------------------
@torch.no_grad()
def trim_row_sparsity(W: torch.Tensor, scores: torch.Tensor, X: torch.Tensor, target: float,
                      lrs=DEFAULT_LRS, neg_lrs=DEFAULT_NEG_LRS, iters: int = 10, max_row: float = 0.95,
                      total: str = "uniform", eps: float = 1e-12, uniform_counts: torch.Tensor | None = None):
    """TRIM row-wise sparsity for one layer.

    W: (out, d_in) dense weights; scores: (out, d_in) metric scores (higher = keep); X: (n, d_in)
    calibration inputs (last token of each sample); target: the layer's sparsity. ``uniform_counts``: the
    per-row counts of the plain mask TRIM starts from and is compared with (the engine passes
    ``masks.row_counts(scores, target)``, whose total is ``int(out * d_in * target)``); it overrides ``total``.
    Returns ``(row_sparsity, info)``: ``row_sparsity`` (out,) float64 on W's device, to pass to
    ``rowwise_mask`` / ``make_mask``; ``info`` = {"lr", "score_uniform", "score", "iters_run",
    "counts", "total"}. ``lr`` is 0.0 when uniform was kept.
    """
    if W.dim() != 2 or scores.shape != W.shape:
        raise PrunekitError(f"TRIM needs 2-D weights and scores of the same shape, got {tuple(W.shape)} "
                            f"and {tuple(scores.shape)}")
    target = float(target)
    if not 0.0 <= target < 1.0:
        raise PrunekitError(f"sparsity must be in [0, 1), got {target}")
    if total not in ("uniform", "layer"):
        raise PrunekitError(f"total must be 'uniform' or 'layer', got {total!r}")
    out, d_in = W.shape
    dev = W.device
    hi = max(float(max_row), target)  # a target above max_row leaves no room: stays uniform
    cap = min(d_in, int(d_in * hi))
    K = out * int(d_in * target) if total == "uniform" else int(out * d_in * target)
    if uniform_counts is not None:
        uniform_counts = uniform_counts.cpu().long()
        if uniform_counts.shape != (out,) or bool((uniform_counts < 0).any()) or bool((uniform_counts > d_in).any()):
            raise PrunekitError(f"uniform_counts must be {out} counts in [0, {d_in}]")
        K = int(uniform_counts.sum())

    Wf = W.float()
    # rank of every weight within its row, in rowwise_mask's order (stable ascending sort), so the
    # mask for any per-row counts k is just rank < k (identical to rowwise_mask, without re-sorting)
    order = torch.sort(scores.to(dev), dim=1, stable=True).indices
    rank = torch.empty((out, d_in), dtype=torch.int32, device=dev)
    rank.scatter_(1, order, torch.arange(d_in, dtype=torch.int32, device=dev).expand(out, d_in).contiguous())
    del order

    # the allocation itself (out,) lives on the CPU in float64: the projection and rounding are
    # many tiny ops, which would otherwise be many device synchronisations
    uniform = torch.full((out,), target, dtype=torch.float64)
    u_counts = uniform_counts if uniform_counts is not None else counts_with_total(uniform, d_in, K, cap)
    X = X.to(dev, torch.float32) if X is not None else torch.zeros(0, d_in, device=dev)
    info = {"lr": 0.0, "score_uniform": None, "score": None, "iters_run": 0, "counts": u_counts.cpu(),
            "total": K}
    if X.shape[0] == 0 or target == 0.0 or cap <= int(d_in * target) or K > out * cap:
        return ratios_from_counts(u_counts, d_in).to(dev), info

    Xt = X.t().contiguous()
    Y = Wf @ Xt  # (out, n) dense outputs
    Yd = Y.double()
    y_norm = Yd.norm(dim=1)
    y_all = Yd.pow(2).sum().sqrt()

    def evaluate(counts):
        """(per-row cosines q, layer cosine) of the exact-count mask."""
        mask = rank < counts.to(dev, torch.int32)[:, None]  # == rowwise_mask(scores, ratios_from_counts(counts))
        Yp = Wf.masked_fill(mask, 0.0) @ Xt
        dots = (Yd * Yp.double()).sum(1)
        p_norm = Yp.norm(dim=1).double()
        q = dots / (y_norm * p_norm).clamp_min(eps)
        layer = float(dots.sum() / (y_all * p_norm.pow(2).sum().sqrt()).clamp_min(eps))
        return q.cpu(), layer

    q_uni, s_uni = evaluate(u_counts)
    info["score_uniform"] = info["score"] = s_uni
    best = {"score": s_uni, "counts": u_counts, "lr": 0.0}

    def run(lr):
        """``iters`` TRIM iterations from uniform with this lr; best (score, counts) seen."""
        x, q = uniform.clone(), q_uni
        top_score, top_counts = -float("inf"), None
        for _ in range(iters):
            x = trim_update(x, q, lr, target, hi)
            counts = counts_with_total(x, d_in, K, cap)
            q, score = evaluate(counts)
            info["iters_run"] += 1
            if score > top_score:
                top_score, top_counts = score, counts
        return top_score, top_counts

    def sweep(rates):
        for lr in rates:
            score, counts = run(float(lr))
            if counts is None or not score > best["score"]:
                break  # stops improving: no larger lr
            best.update(score=score, counts=counts, lr=float(lr))

    sweep(lrs)
    if best["lr"] == 0.0:  # no positive lr beats uniform
        sweep(neg_lrs)
    info.update(lr=best["lr"], score=best["score"], counts=best["counts"].cpu())
    return ratios_from_counts(best["counts"], d_in).to(dev), info


def gram_factor(G: torch.Tensor, rel_tol: float = 1e-10) -> torch.Tensor:
    """A matrix ``F`` (r, d) with ``F^T F == G`` for a symmetric PSD ``G`` (d, d): ``sqrt(L) V^T`` from
    ``G = V diag(L) V^T`` (float64 eigendecomposition), keeping only eigenvalues above ``rel_tol * max``.
    Every quantity TRIM computes from its inputs X is a function of ``X^T X`` (row outputs' dot products
    and norms: ``<W_r X^T, V_r X^T> = W_r X^T X V_r^T``), so ``F`` stands in for all calibration tokens
    exactly, with at most d rows whatever the number of tokens."""
    G = G.double()
    G = 0.5 * (G + G.t())
    L, V = torch.linalg.eigh(G)
    keep = L > rel_tol * max(float(L.max()), 0.0)
    if not bool(keep.any()):
        return torch.zeros(0, G.shape[0], dtype=torch.float32, device=G.device)
    return (L[keep].sqrt()[:, None] * V[:, keep].t()).float()


# ---- registration ----------------------------------------------------------------------------
TRIM_INPUTS = ("last", "all")


class TRIMParams(Params):
    tokens_per_sample: Int = Field(1, ge=1, description="rows of X per calibration sequence (inputs=last)")
    inputs: Literal["last", "all"] = Field("last", description="last: last-token inputs; all: every token")
    lrs: Floats = list(DEFAULT_LRS)
    neg_lrs: Floats = list(DEFAULT_NEG_LRS)
    iters: Int = Field(10, ge=1)
    max_row: float = Field(0.95, gt=0, le=1)
    total: Literal["uniform", "layer"] = "uniform"
    eps: float = Field(1e-12, gt=0)

    @model_validator(mode="after")
    def _one_input_rule(self):
        if self.inputs == "all" and "tokens_per_sample" in self.model_fields_set:
            raise ValueError("tokens_per_sample picks TRIM's token rows; inputs=all already uses every token: set "
                             "one of them")
        return self


def trim_needs(p: TRIMParams) -> frozenset:
    """inputs=all reads X^T X (the 'hessian' statistic, d_in x d_in fp32 per layer while the layer is pruned, as
    for SparseGPT); inputs=last the last-token rows."""
    return frozenset({"hessian"} if p.inputs == "all" else {"last_tokens"})


def trim_stats_options(p: TRIMParams) -> dict:
    """How many rows of X each calibration sequence gives (an option of the 'last_tokens' statistic)."""
    return {"tokens_per_sample": p.tokens_per_sample} if "tokens_per_sample" in p.model_fields_set else {}


@register_rowwise("trim", params=TRIMParams, needs=trim_needs, stats_options=trim_stats_options,
                  description="TRIM: per-row ratios that preserve each row's outputs best")
def trim(W, scores, stats, target, uniform_counts=None, tokens_per_sample: int = 1, inputs: str = "last", **kw):
    """TRIM on one layer from its statistics (see the module docstring); ``tokens_per_sample`` was consumed when
    the statistics were gathered. With inputs="all", X stands for every calibration token through a
    square-root factor of X^T X: the per-row and layer cosines are those over all tokens (each evaluation
    costs out x d_in x d_in)."""
    need = trim_needs(TRIMParams(inputs=inputs))
    if stats is None or not need <= set(stats.needs):
        raise PrunekitError(f"row-wise 'trim' with inputs={inputs!r} needs the {sorted(need)} calibration "
                            "statistic (the engine adds the row-wise method's needs to what it gathers)")
    if inputs == "all":  # a layer the forward never called has no statistics: X is empty and TRIM keeps uniform
        X = gram_factor(stats.hessian) if stats.hessian is not None else torch.zeros(0, W.shape[1])
    else:
        X = stats.last_token_inputs()
    return trim_row_sparsity(W, scores, X, target, uniform_counts=uniform_counts, **kw)
