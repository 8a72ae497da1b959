"""ADMM weight update (Boža 2024, "Fast and Optimal Weight Update for Pruned Large Language Models").

Fixed mask (``--reconstruct admm`` after any metric, allocation, row-wise method, refiner or N:M pattern). The
layer's least-squares problem (:mod:`prunekit.core.lsq`: damped, in normalised coordinates Wn = W D)

    min_V  sum_r (wn_r - v_r)^T Hn (wn_r - v_r)   subject to  V = 0 on the mask

is split as f(V) + g(Z) with V = Z (g: zero outside the set {Z = 0 on the mask}, infinite inside it) and solved
by scaled ADMM, starting from V = Wn, U = 0:

    Z <- (V + U) with the pruned entries set to 0          (projection onto the mask)
    U <- U + V - Z                                         (scaled dual: the running disagreement)
    V <- (Wn Hn + rho (Z - U)) (Hn + rho I)^-1             (the quadratic step, one GEMM)

The inverse is computed once per Hessian (one Cholesky, shared by the layers that read the same input). The
problem is convex, so Z converges to the exact least-squares optimum on the mask; the result is the last Z (exact
zeros where pruned). ``tol`` > 0 stops once ||V - Z|| and the change of Z in one step are both below tol x ||Z||
(over the whole layer; 0: always ``iters`` iterations).

Gradual mask (``--metric admm`` alone: the paper's "ADMM gradual"). The same iterations; during the first
T = min(``gradual``, ``iters``) of them (at least one) the mask is chosen again at every step from |V + U| (in
normalised coordinates, |w_ij| x ||x_j||: a Wanda-like score of the current iterate rather than of the dense
weights), at a sparsity rising on the cubic schedule s_t = s (1 - (1 - t / T)^3), t = 1 .. T; the remaining
iterations update the weights on the final mask. Unstructured masks compare scores over the whole layer (the paper's default), so a layer prunes
exactly int(s x numel) weights, as SparseGPT does; per-row ratios prune floor(s_r x in) per row. N:M: at step t the
weights the N:M rule would prune from |V + U| are the candidates and the lowest s_t of the layer among them are
pruned, so the last step prunes exactly the N:M mask.

Defaults (the paper's code): rho = 1 on the unit-diagonal Hn, 20 iterations, the first 15 choosing the mask. The
damping follows prunekit's convention (core.lsq, SparseGPT's 0.01 x mean(diag H) before normalising); the paper's
code adds 0.1 after normalising, i.e. 0.1 x diag H.

Robustness: the factorisation raises its damping on failure and falls back to the diagonal (core.lsq.damped_inverse);
a non-finite result (only from non-finite weights) is replaced by the masked dense weights, with a warning. Never
raises for numerical reasons, never returns NaN.

Memory: Hn and (Hn + rho I)^-1, two (in, in) float32 matrices (cached on the layer's statistics, so q/k/v and
gate/up share them; the inverse is factored in place), one (out, in) state matrix T = V + U (the result is made in
it) and its mask. Each iteration runs on slices of max(32, in / 8) rows (core.lsq.row_slices) with two slice-sized
buffers, takes Wn from W slice by slice, and chooses the gradual mask over the whole layer from |T| slice by slice
(core.masks.mask_by_row_slices), so no score, Wn Hn or dual matrix exists. Measured in
bench/results/sparsegpt_memory.md: 4.79 Hessian-sized matrices on a 2048 x 2048 layer (SparseGPT 4.99), 3.38 on
1024 x 4096 (SparseGPT 3.69).
"""
from __future__ import annotations

from typing import Callable

import torch
from pydantic import Field

from ..core.errors import PrunekitError
from ..core.lsq import (DEFAULT_MAX_DAMP_TRIES, DEFAULT_PERCDAMP, Problem, check_solver_inputs, damped_inverse,
                        layer_problem, nothing_to_prune, row_slices, solver_problem, unpruned)
from ..core.masks import mask_by_row_slices, nm_mask
from ..core.metric import register_metric
from ..core.registry import Int, Params
from ..core.stats import LayerStats


DEFAULT_RHO = 1.0
DEFAULT_ITERS = 20
DEFAULT_GRADUAL = 15


class ADMMParams(Params):
    rho: float = Field(DEFAULT_RHO, gt=0, description="ADMM penalty on the unit-diagonal normalised Hessian")
    iters: Int = Field(DEFAULT_ITERS, ge=1, description="ADMM iterations per layer")
    gradual: Int = Field(DEFAULT_GRADUAL, ge=0, description="first iterations that choose the mask (metric admm only)")
    percdamp: float = Field(DEFAULT_PERCDAMP, ge=0, description="damping, a fraction of the mean Hessian diagonal")
    tol: float = Field(0.0, ge=0, description="stop when the residuals are below tol x ||Z|| (0: all iterations)")
    max_damp_tries: Int = Field(DEFAULT_MAX_DAMP_TRIES, ge=0, description="damping increases before the diagonal fallback")


def gradual_mask(T: torch.Tensor, sparsity, pattern, fraction: float,
                 bounds: list[tuple[int, int]]) -> torch.Tensor:
    """The mask of one gradual step from the scores |T| (lower = pruned first), computed by the row slices
    ``bounds`` (no score matrix): ``fraction`` (0..1] of the final sparsity. Float sparsity: the lowest
    int(fraction x s x numel) of the layer; per-row tensor: floor(fraction x s_r x in) per row; N:M: the lowest
    fraction x N/M of the layer among what the N:M rule prunes."""
    def magnitude(a: int, b: int) -> torch.Tensor:
        return T[a:b].abs()

    if pattern is not None:
        if fraction >= 1.0:
            return mask_by_row_slices(magnitude, T.shape, None, pattern, bounds)

        def candidates_only(a: int, b: int) -> torch.Tensor:
            x = T[a:b].abs()
            return x.masked_fill_(~nm_mask(x, *pattern), float("inf"))

        return mask_by_row_slices(candidates_only, T.shape, fraction * pattern[0] / pattern[1], None, bounds)
    scaled = sparsity * fraction if isinstance(sparsity, torch.Tensor) else float(sparsity) * fraction
    return mask_by_row_slices(magnitude, T.shape, scaled, None, bounds)


@torch.no_grad()
def _iterate(P: Problem, W: torch.Tensor, Ainv: torch.Tensor, m: torch.Tensor | None, rho: float, iters: int,
             tol: float, choose: Callable[[torch.Tensor, int, list], torch.Tensor] | None = None,
             steps: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The scaled ADMM iterations of the module docstring on W's normalised problem P, on the fixed mask ``m``, or
    with ``choose(T, t, bounds)`` giving the mask from T = V + U at the first ``steps`` iterations. Returns (the
    projection Z, a new (out, in) matrix; the final mask).

    The state is the one matrix T = V + U: the projection splits it into Z (T off the mask) and U (T on it), so
    the quadratic step needs only T and the mask, and, as (Hn + rho I)^-1 Hn = I - rho (Hn + rho I)^-1,

        V <- Wn Hn (Hn + rho I)^-1 + rho (Z - U) (Hn + rho I)^-1 = Wn + rho (Z - U - Wn) (Hn + rho I)^-1

    takes Wn from W slice by slice (no Wn Hn matrix). Each iteration runs on slices of rows (core.lsq.row_slices)
    with two slice-sized buffers; the gradual mask is chosen over the whole layer from |T| by slices too
    (core.masks.mask_by_row_slices). ``tol``: the residuals ||V - Z|| and ||Z - Z_prev|| summed over the slices."""
    rows, cols = W.shape
    bounds = row_slices(rows, cols)
    T = P.normalise(W)  # V + U with V = Wn, U = 0
    size = bounds[0][1] - bounds[0][0]
    rhs, V = (torch.empty(size, cols, dtype=torch.float32, device=T.device) for _ in range(2))
    dual_prev = None
    for t in range(iters):
        if choose is not None and t < steps:
            m = None  # the new mask replaces it
            m = choose(T, t, bounds)
        check = tol > 0 and (choose is None or t >= steps)
        zz = primal = dual = 0.0
        for a, b in bounds:
            Ts, ms, r, v = T[a:b], m[a:b], rhs[:b - a], V[:b - a]
            torch.where(ms, torch.neg(Ts, out=r), Ts, out=r)  # Z - U: T off the mask, -T on it
            P.add_normalised(r, W[a:b], -1.0).mul_(rho)
            P.add_normalised(torch.matmul(r, Ainv, out=v), W[a:b])  # the quadratic step
            if check:
                r.copy_(Ts).masked_fill_(ms, 0.0)  # Z
                zz += float(torch.linalg.vector_norm(r)) ** 2
                primal += float(torch.linalg.vector_norm(r.sub_(v))) ** 2
                dual += float(torch.linalg.vector_norm(r.masked_fill_(ms, 0.0))) ** 2  # Z_next - Z (mask fixed)
            Ts.masked_fill_(~ms, 0.0).add_(v)  # the next T = V + U, U = the pruned part of this T
        Ts = ms = None  # views: they would keep this mask alive while the next one is chosen
        if check:
            bound = tol * zz ** 0.5
            if dual_prev is not None and primal ** 0.5 <= bound and dual_prev ** 0.5 <= bound:
                break
            dual_prev = dual
    return T.masked_fill_(m, 0.0), m


@torch.no_grad()
def admm_solve(W: torch.Tensor, H: torch.Tensor | None, sparsity=0.5, pattern: tuple[int, int] | None = None,
               mask: torch.Tensor | None = None, rho: float = DEFAULT_RHO, iters: int = DEFAULT_ITERS,
               gradual: int = DEFAULT_GRADUAL, percdamp: float = DEFAULT_PERCDAMP, tol: float = 0.0,
               max_damp_tries: int = DEFAULT_MAX_DAMP_TRIES, name: str = "layer",
               problem: Problem | Callable[[], Problem] | None = None,
               inverse: Callable[[Problem], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune W (out, in) and update its kept weights by ADMM; returns (new float32 weight, bool prune mask).

    ``mask`` given: the weight update on that mask (``sparsity`` and ``pattern`` are not read). Otherwise the
    gradual variant chooses the mask for ``sparsity`` (a float or per-row ratios) or the N:M ``pattern``.
    ``H``: the layer Hessian ((2/n) X^T X); or ``problem`` (a :class:`~prunekit.core.lsq.Problem`, or a function
    returning it, called only when there is something to prune), then H is not read and ``percdamp`` is the
    problem's. ``inverse(problem)``: (Hn + rho I)^-1 (the engine's adapter caches it); by default computed here.
    W and H are not modified."""
    if problem is None and H is None:
        raise PrunekitError("ADMM needs the Hessian H or its normalised problem")
    s = check_solver_inputs(W, H.shape if problem is None else None, sparsity, pattern, mask, "ADMM")
    ADMMParams.check({"rho": rho, "iters": iters, "gradual": gradual, "percdamp": percdamp, "tol": tol,
                      "max_damp_tries": max_damp_tries}, "ADMM", "admm")
    if nothing_to_prune(W.shape, s, pattern, mask):
        return unpruned(W)
    P = solver_problem(W, H, problem, percdamp, "ADMM", name)
    Ainv = inverse(P) if inverse is not None else damped_inverse(P.Hn, rho, max_damp_tries, name)
    if mask is not None:
        Z, m = _iterate(P, W, Ainv, mask.to(device=P.Hn.device, dtype=torch.bool), rho, int(iters), tol)
    else:
        steps = max(min(int(gradual), int(iters)), 1)  # mask-choosing iterations; the last reaches the sparsity

        def choose(T: torch.Tensor, t: int, bounds: list) -> torch.Tensor:
            return gradual_mask(T, s, pattern, 1.0 - (1.0 - (t + 1) / steps) ** 3, bounds)

        Z, m = _iterate(P, W, Ainv, None, rho, int(iters), tol, choose, steps)
    Z = P.finite_or_dense(Z, W, m, "ADMM", name)
    return P.restore(Z), m


def admm_solver(W: torch.Tensor, stats: LayerStats, sparsity, pattern=None, mask=None, name: str = "layer",
                rho: float = DEFAULT_RHO, percdamp: float = DEFAULT_PERCDAMP,
                max_damp_tries: int = DEFAULT_MAX_DAMP_TRIES, **kw):
    """Adapter with the engine's solver signature: solver(W, stats, sparsity, pattern, mask). The normalised
    problem and the inverse of Hn + rho I are computed once per statistics object and kept in ``stats.cache``
    (layers that read the same input share them)."""
    if stats is None or stats.hessian is None:
        raise PrunekitError("ADMM needs the layer Hessian: gather statistics with needs=('hessian',)")

    def inverse(P: Problem) -> torch.Tensor:
        key = ("admm_inverse", str(W.device), float(percdamp), float(rho), int(max_damp_tries))
        if key not in stats.cache:
            stats.cache[key] = damped_inverse(P.Hn, rho, max_damp_tries, name)
        return stats.cache[key]

    return admm_solve(W, None, sparsity, pattern, mask, rho=rho, percdamp=percdamp, max_damp_tries=max_damp_tries,
                      name=name, problem=lambda: layer_problem(stats, W.device, percdamp, name), inverse=inverse, **kw)


register_metric(
    "admm", needs=("hessian",), group="layer",
    description="ADMM (Boza 2024): exact least-squares weight update on a fixed mask (--reconstruct admm), or with "
                "the gradual mask (--metric admm: |W+U| on a cubic schedule); one (in,in) inverse per Hessian",
    solver=admm_solver, params=ADMMParams,
)(None)
