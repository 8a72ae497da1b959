"""ALPS (Meng et al., NeurIPS 2024): the support and the weights of a layer chosen together, by ADMM with a rising
penalty, then the weights on that support solved exactly by conjugate gradients.

The problem is the layer's least-squares error (:mod:`prunekit.core.lsq`, damped and normalised: Wn = W D, unit
diagonal Hn) under a cardinality constraint instead of a given mask:

    min_B  sum_r (wn_r - b_r)^T Hn (wn_r - b_r)   subject to  B prunes int(s x numel) weights of the layer
                                                   (or N of every M in each row: an N:M pattern)

1. ADMM with the split B = D (D carries the constraint), dual V, penalty rho, from B = Wn, D = the projection of
   Wn, V = 0:
       B <- (Wn Hn - V + rho D) (Hn + rho I)^-1
       D <- the projection of B + V / rho       (keep the largest |.| of the layer, or per N:M group)
       V <- V + rho (B - D)
   (Hn + rho I)^-1 is factored again (one Cholesky, in place) whenever rho has changed, so an iteration is one
   GEMM (the public code keeps one eigendecomposition of Hn for every rho: two GEMMs per iteration and an (in, in)
   eigensolver workspace). Every ``update_every`` iterations rho follows how much the
   support (the pruned set of D) changed since the last check, as a fraction of the kept count: above 10%: rho x 1.3;
   above 0.5%: x 1.2 (both mark rho as "warmed up"); any change below that: x 1.1 once warmed up, else rho / 5 and a
   restart from the start point (the penalty was too strong to let the support move); no change: stop once warmed
   up, else rho / 5. rho stays <= 1e6. After ``min_iters`` iterations a change below 0.03% also stops; at most
   ``max_iters`` iterations.
2. The support is the projection of the final B; on it the weights are the exact least-squares solution, by
   conjugate gradients on all rows at once started from that projection (core.lsq.masked_cg), ``pcg_iters``
   iterations or until every row's residual is below ``pcg_rtol`` of its right side.

With a fixed mask (``--reconstruct alps``, or after ``--refine``) only step 2 runs, from the masked dense weights.

Defaults are the public code's: rho0 = 0.1, checks every 3 iterations, at least 30 and at most 300 iterations, 10 CG
iterations with a relative tolerance of 1e-4, damping 0.01 x mean(diag H) (prunekit's convention, which is also
ALPS's). Unstructured supports are compared over the whole layer, as there (and in SparseGPT); per-row ratios prune
floor(s_r x in) per row.

Robustness: a factorisation that fails is retried with more damping, then replaced by the diagonal (no
cross-column terms; core.lsq.damped_inverse); a non-finite result (only from non-finite weights) is replaced by the
masked dense weights, with a warning. Never raises for numerical reasons.

Memory: Hn (cached on the layer's statistics, so q/k/v and gate/up share it) and (Hn + rho I)^-1, two (in, in)
float32 matrices, plus five (out, in) float32 matrices during the iterations (Wn Hn, B, D, V and one buffer; the
projection's scores |.| go into a buffer that is overwritten next) and five in the conjugate gradients (Wn Hn, the
iterate, which reuses B, and three more). With a fixed mask only Hn and the result are whole: the conjugate
gradients run on slices of rows (core.lsq.solve_row_slices), their five matrices together 5/8 of an (in, in) one.
Measured in bench/results/sparsegpt_memory.md against SparseGPT's solve.
"""
from __future__ import annotations

from typing import Callable

import torch
from pydantic import Field

from ..core.errors import PrunekitError
from ..core.lsq import (DEFAULT_MAX_DAMP_TRIES, DEFAULT_PERCDAMP, Problem, check_solver_inputs, damped_inverse,
                        layer_problem, masked_cg, nothing_to_prune, solve_row_slices, solver_problem, unpruned)
from ..core.masks import make_mask
from ..core.metric import register_metric
from ..core.registry import Int, Params
from ..core.stats import LayerStats


RHO_MAX = 1e6


class ALPSParams(Params):
    rho: float = Field(0.1, gt=0, description="initial ADMM penalty on the unit-diagonal normalised Hessian")
    max_iters: Int = Field(300, ge=0, description="ADMM iterations at most")
    min_iters: Int = Field(30, ge=0, description="iterations before a nearly still support may stop the ADMM")
    update_every: Int = Field(3, ge=1, description="iterations between penalty updates")
    pcg_iters: Int = Field(10, ge=0, description="conjugate-gradient iterations on the final support")
    pcg_rtol: float = Field(1e-4, gt=0, description="relative residual at which a row's conjugate gradients stop")
    percdamp: float = Field(DEFAULT_PERCDAMP, ge=0, description="damping, a fraction of the mean Hessian diagonal")
    max_damp_tries: Int = Field(DEFAULT_MAX_DAMP_TRIES, ge=0, description="damping increases before the diagonal fallback")


def project(B: torch.Tensor, sparsity, pattern, work: torch.Tensor | None = None) -> torch.Tensor:
    """The prune mask that keeps the largest |B|: over the layer (float sparsity), per row (per-row ratios), or per
    group of M (N:M). ``work``: a free tensor of B's shape to hold |B| (else a new one)."""
    return make_mask(torch.abs(B, out=work) if work is not None else B.abs(), sparsity, pattern, "layer")


@torch.no_grad()
def admm_support(W: torch.Tensor, P: Problem, target: torch.Tensor, sparsity, pattern, rho: float = 0.1,
                 max_iters: int = 300, min_iters: int = 30, update_every: int = 3,
                 max_damp_tries: int = DEFAULT_MAX_DAMP_TRIES, name: str = "layer") -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Step 1 of the module docstring on W's normalised problem P (``target`` = Wn Hn): (B, its pruned set,
    diagnostics)."""
    B = P.normalise(W)
    pruned = start = project(B, sparsity, pattern)
    keep_count = max(int((~pruned).sum()), 1)
    D, V, R = B.masked_fill(start, 0.0), torch.zeros_like(B), torch.empty_like(B)
    inverse, inverse_rho = None, None
    warmed, its, restarts = False, 0, 0
    for t in range(int(max_iters)):
        its = t + 1
        if rho != inverse_rho:
            inverse, inverse_rho = None, rho  # drop the old one before the new one is made
            inverse = damped_inverse(P.Hn, rho, max_damp_tries, name)
        torch.add(target, D, alpha=rho, out=R).sub_(V)
        torch.matmul(R, inverse, out=B)
        torch.div(V, rho, out=R).add_(B)  # R now holds B + V / rho
        M = project(R, sparsity, pattern, work=D)  # D is overwritten next
        D.copy_(R).masked_fill_(M, 0.0)
        V.add_(B, alpha=rho).sub_(D, alpha=rho)
        if (t + 1) % update_every:
            continue
        change = int((M != pruned).sum())
        pruned = M
        frac = change / keep_count
        if frac > 0.1:
            rho, warmed = rho * 1.3, True
        elif frac > 0.005:
            rho, warmed = rho * 1.2, True
        elif change > 0:
            if warmed:
                rho *= 1.1
            else:  # the support barely moves: a smaller penalty, from the start again
                rho /= 5.0
                P.normalise(W, out=D).masked_fill_(start, 0.0)
                V.zero_()
                restarts += 1
        elif warmed:
            break
        else:
            rho /= 5.0
        rho = min(rho, RHO_MAX)
        if t + 1 >= min_iters and frac < 3e-4:
            break
    return B, project(B, sparsity, pattern, work=R), {"iters": its, "rho": rho, "restarts": restarts}


@torch.no_grad()
def alps_solve(W: torch.Tensor, H: torch.Tensor | None, sparsity=0.5, pattern: tuple[int, int] | None = None,
               mask: torch.Tensor | None = None, rho: float = 0.1, max_iters: int = 300, min_iters: int = 30,
               update_every: int = 3, pcg_iters: int = 10, pcg_rtol: float = 1e-4,
               percdamp: float = DEFAULT_PERCDAMP, max_damp_tries: int = DEFAULT_MAX_DAMP_TRIES,
               name: str = "layer", problem: Problem | Callable[[], Problem] | None = None,
               info: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune W (out, in) with ALPS; returns (new float32 weight, bool prune mask).

    ``mask`` given: only the exact weights on it (step 2). ``H``: the layer Hessian ((2/n) X^T X); or ``problem``
    (or a function returning it, called only when there is something to prune), then H is not read and
    ``percdamp`` is the problem's. ``info``, if given, receives the ADMM's iterations, final rho and restarts. W and H are not modified."""
    if problem is None and H is None:
        raise PrunekitError("ALPS needs the Hessian H or its normalised problem")
    s = check_solver_inputs(W, H.shape if problem is None else None, sparsity, pattern, mask, "ALPS")
    ALPSParams.check({"rho": rho, "max_iters": max_iters, "min_iters": min_iters, "update_every": update_every,
                      "pcg_iters": pcg_iters, "pcg_rtol": pcg_rtol, "percdamp": percdamp,
                      "max_damp_tries": max_damp_tries}, "ALPS", "alps")
    if nothing_to_prune(W.shape, s, pattern, mask):
        return unpruned(W)
    P = solver_problem(W, H, problem, percdamp, "ALPS", name)
    if mask is None:
        target = P.normalise(W) @ P.Hn
        if isinstance(s, torch.Tensor):
            s = s.to(target.device)
        B, m, extra = admm_support(W, P, target, s, pattern, rho, max_iters, min_iters, update_every, max_damp_tries,
                                   name)
        if info is not None:
            info.update(extra)
        X = masked_cg(P.Hn, target, ~m, B, pcg_iters, pcg_rtol, overwrite=True)  # B is not needed again
    else:  # rows are independent: conjugate gradients on slices of them
        m = mask.to(device=P.Hn.device, dtype=torch.bool)
        X = solve_row_slices(P, W, m, lambda B, m_rows: masked_cg(P.Hn, B @ P.Hn, ~m_rows, B, pcg_iters, pcg_rtol,
                                                                  overwrite=True))
    X = P.finite_or_dense(X.masked_fill_(m, 0.0), W, m, "ALPS", name)
    return P.restore(X), m


def alps_solver(W: torch.Tensor, stats: LayerStats, sparsity, pattern=None, mask=None, name: str = "layer",
                percdamp: float = DEFAULT_PERCDAMP, max_damp_tries: int = DEFAULT_MAX_DAMP_TRIES, **kw):
    """Adapter with the engine's solver signature: solver(W, stats, sparsity, pattern, mask). The normalised
    problem is computed once per statistics object and kept in ``stats.cache`` (layers that read the same input
    share it)."""
    if stats is None or stats.hessian is None:
        raise PrunekitError("ALPS needs the layer Hessian: gather statistics with needs=('hessian',)")
    return alps_solve(W, None, sparsity, pattern, mask, percdamp=percdamp, max_damp_tries=max_damp_tries, name=name,
                      problem=lambda: layer_problem(stats, W.device, percdamp, name), **kw)


register_metric(
    "alps", needs=("hessian",), group="layer",
    description="ALPS (Meng et al. 2024): support by ADMM with a rising penalty, then exact weights on it by "
                "conjugate gradients; with a fixed mask (--reconstruct alps) the exact weights only",
    solver=alps_solver, params=ALPSParams,
)(None)
