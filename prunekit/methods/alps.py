"""ALPS (Meng et al., NeurIPS 2024): the support and the weights of a layer chosen together, by ADMM with a rising
penalty, then the weights on that support solved exactly by conjugate gradients.

The problem is the layer's least-squares error (:mod:`prunekit.core.lsq`, damped and normalised: Wn = W D, unit
diagonal Hn) under a cardinality constraint instead of a given mask:

    min_B  sum_r (wn_r - b_r)^T Hn (wn_r - b_r)   subject to  B prunes int(s x numel) weights of the layer
                                                   (or N of every M in each row: an N:M pattern)

1. ADMM with the split B = D (D carries the constraint), dual V, penalty rho, from D = the projection of Wn, V = 0:
       B <- (Wn Hn - V + rho D) (Hn + rho I)^-1 = Wn + (rho (D - Wn) - V) (Hn + rho I)^-1
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
2. The support is the projection of the final B (the B-step after the last dual step: the public code returns
   the B of the last iteration, one step earlier, which needs a second (out, in) matrix kept through the
   iterations: ``keep_b=True`` does that; measured in NOTES.md, issue 22, session 16); on it the weights are the
   exact least-squares solution, by conjugate gradients started from that projection (core.lsq.masked_cg, on
   slices of rows: the rows are independent on a fixed support), ``pcg_iters`` iterations or until every row's
   residual is below ``pcg_rtol`` of its right side.

With a fixed mask (``--reconstruct alps``, or after ``--refine``) only step 2 runs, from the masked dense weights.

Defaults are the public code's: rho0 = 0.1, checks every 3 iterations, at least 30 and at most 300 iterations, 10 CG
iterations with a relative tolerance of 1e-4, damping 0.01 x mean(diag H) (prunekit's convention, which is also
ALPS's). Unstructured supports are compared over the whole layer, as there (and in SparseGPT); per-row ratios prune
floor(s_r x in) per row.

Robustness: a factorisation that fails is retried with more damping, then replaced by the diagonal (no
cross-column terms; core.lsq.damped_inverse); a non-finite result (only from non-finite weights) is replaced by the
masked dense weights, with a warning. Never raises for numerical reasons.

Memory: Hn (cached on the layer's statistics, so q/k/v and gate/up share it) and (Hn + rho I)^-1, two (in, in)
float32 matrices, one (out, in) state matrix R = B + V / rho with its projection's mask (D and V follow from them),
the last check's support as bits, and two slice-sized buffers: the iterations run on slices of max(32, in / 8) rows
(core.lsq.row_slices), take Wn from W, and project over the layer slice by slice (core.masks.mask_by_row_slices).
The final B is made in R's storage and the conjugate gradients run on slices of rows in it (four slice-sized
matrices). Measured in bench/results/sparsegpt_memory.md: 4.89 Hessian-sized matrices on a 2048 x 2048 layer
(SparseGPT 4.99), 3.43 on 1024 x 4096 (SparseGPT 3.69); with a fixed mask 3.38 and 2.49; with ``keep_b`` one more
(out, in) matrix (5.89 and 3.70).
"""
from __future__ import annotations

from typing import Callable

import torch
from pydantic import Field

from ..core.errors import PrunekitError
from ..core.lsq import (DEFAULT_MAX_DAMP_TRIES, DEFAULT_PERCDAMP, Problem, check_solver_inputs, damped_inverse,
                        layer_problem, masked_cg, nothing_to_prune, row_slices, solver_problem, unpruned)
from ..core.masks import mask_by_row_slices, pack_bits
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
    keep_b: bool = Field(False, description="return the last iteration's B, as the public code does, kept in a second "
                         "(out, in) matrix (default: one more B-step after the loop, no second matrix)")


def project(B: torch.Tensor, sparsity, pattern, bounds: list[tuple[int, int]]) -> torch.Tensor:
    """The prune mask that keeps the largest |B|: over the layer (float sparsity), per row (per-row ratios), or per
    group of M (N:M); computed by the row slices ``bounds`` (no |B| matrix)."""
    return mask_by_row_slices(lambda a, b: B[a:b].abs(), B.shape, sparsity, pattern, bounds)


_ONES = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32)  # set bits of each byte value


def _pack(M: torch.Tensor, bounds: list[tuple[int, int]]) -> list[torch.Tensor]:
    """The mask M kept as bits, slice by slice (an eighth of a bool matrix; only compared, never read back)."""
    return [pack_bits(M[a:b].reshape(-1)) for a, b in bounds]


def _count_changes(M: torch.Tensor, packed: list[torch.Tensor], bounds: list[tuple[int, int]]) -> int:
    """How many entries the mask M and a mask kept by :func:`_pack` disagree on (the set bits of their XOR)."""
    ones = _ONES.to(M.device)
    return sum(int(ones[torch.bitwise_xor(pack_bits(M[a:b].reshape(-1)), p).int()].sum())
               for (a, b), p in zip(bounds, packed))


@torch.no_grad()
def admm_support(W: torch.Tensor, P: Problem, sparsity, pattern, rho: float = 0.1, max_iters: int = 300,
                 min_iters: int = 30, update_every: int = 3, max_damp_tries: int = DEFAULT_MAX_DAMP_TRIES,
                 name: str = "layer", keep_b: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Step 1 of the module docstring on W's normalised problem P: (B, its pruned set, diagnostics).

    The state between iterations is one matrix, R = B + V / rho, and its projection's mask M: D = R off M and
    V = rho R on M (the dual step leaves V = rho (R - D)). With (Hn + rho I)^-1 Hn = I - rho (Hn + rho I)^-1 the
    B-step is B = Wn + (rho (D - Wn) - V) (Hn + rho I)^-1 (Wn taken from W by slices, no Wn Hn matrix); each
    iteration runs on slices of rows (core.lsq.row_slices) and projects over the layer by slices
    (core.masks.mask_by_row_slices). B is returned as the B-step after the last dual step (the B the next
    iteration would take), so no B of the iterations is kept; with ``keep_b`` the last iteration's B instead (the
    public code's), copied into a second (out, in) matrix at every iteration that may be the last; with
    ``max_iters`` = 0, B = Wn."""
    rows, cols = W.shape
    bounds = row_slices(rows, cols)
    size = bounds[0][1] - bounds[0][0]
    rhs, out = (torch.empty(size, cols, dtype=torch.float32, device=P.Hn.device) for _ in range(2))

    def start() -> tuple[torch.Tensor, torch.Tensor]:  # D = the projection of Wn, V = 0
        R = P.normalise(W, out=state)
        M = project(R, sparsity, pattern, bounds)
        return R.masked_fill_(M, 0.0), M

    def b_step(R: torch.Tensor, M: torch.Tensor, rho: float, rho_v: float, inverse: torch.Tensor,
               last: bool, copy: torch.Tensor | None = None) -> None:
        """One B-step on every slice, then R <- B + V / rho (R <- B with ``last``); B also into ``copy``."""
        for a, b in bounds:
            Rs, Ms, r, o = R[a:b], M[a:b], rhs[:b - a], out[:b - a]
            torch.where(Ms, torch.mul(Rs, -rho_v, out=o), torch.mul(Rs, rho, out=r), out=r)  # rho D - V
            P.add_normalised(r, W[a:b], -rho)
            P.add_normalised(torch.matmul(r, inverse, out=o), W[a:b])  # B
            if copy is not None:
                copy[a:b].copy_(o)
            if last:
                Rs.copy_(o)
            else:
                Rs.masked_fill_(~Ms, 0.0).mul_(rho_v / rho).add_(o)  # B + V / rho

    state = torch.empty(rows, cols, dtype=torch.float32, device=P.Hn.device)
    R, M = start()
    pruned = _pack(M, bounds)  # the support at the last check, as bits
    keep_count = max(R.numel() - int(torch.count_nonzero(M)), 1)
    rho_v = rho  # the rho of V = rho_v R on M (V = 0 at the start)
    inverse, inverse_rho, kept = None, None, None
    warmed, its, restarts = False, 0, 0
    for t in range(int(max_iters)):
        its = t + 1
        if rho != inverse_rho:
            inverse, inverse_rho = None, rho  # drop the old one before the new one is made
            inverse = damped_inverse(P.Hn, rho, max_damp_tries, name)
        may_stop = (t + 1) % update_every == 0 or t + 1 == int(max_iters)
        if keep_b and may_stop and kept is None:
            kept = torch.empty_like(R)
        b_step(R, M, rho, rho_v, inverse, last=False, copy=kept if keep_b and may_stop else None)
        rho_v = rho
        M = None  # the projection below replaces it
        M = project(R, sparsity, pattern, bounds)
        if (t + 1) % update_every:
            continue
        change = _count_changes(M, pruned, bounds)
        pruned = _pack(M, bounds)
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
                R, M = start()
                restarts += 1
        elif warmed:
            break
        else:
            rho /= 5.0
        rho = min(rho, RHO_MAX)
        if t + 1 >= min_iters and frac < 3e-4:
            break
    pruned = None
    if its and keep_b:
        B, R, state = kept, None, None
    elif its:
        if rho != inverse_rho:
            inverse = None
            inverse = damped_inverse(P.Hn, rho, max_damp_tries, name)
        b_step(R, M, rho, rho_v, inverse, last=True)
        B = R
    else:
        B = P.normalise(W, out=state)
    inverse = M = None
    return B, project(B, sparsity, pattern, bounds), {"iters": its, "rho": rho, "restarts": restarts}


@torch.no_grad()
def alps_solve(W: torch.Tensor, H: torch.Tensor | None, sparsity=0.5, pattern: tuple[int, int] | None = None,
               mask: torch.Tensor | None = None, rho: float = 0.1, max_iters: int = 300, min_iters: int = 30,
               update_every: int = 3, pcg_iters: int = 10, pcg_rtol: float = 1e-4,
               percdamp: float = DEFAULT_PERCDAMP, max_damp_tries: int = DEFAULT_MAX_DAMP_TRIES,
               name: str = "layer", problem: Problem | Callable[[], Problem] | None = None,
               info: dict | None = None, keep_b: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune W (out, in) with ALPS; returns (new float32 weight, bool prune mask).

    ``mask`` given: only the exact weights on it (step 2). ``H``: the layer Hessian ((2/n) X^T X); or ``problem``
    (or a function returning it, called only when there is something to prune), then H is not read and
    ``percdamp`` is the problem's. ``info``, if given, receives the ADMM's iterations, final rho and restarts.
    W and H are not modified."""
    if problem is None and H is None:
        raise PrunekitError("ALPS needs the Hessian H or its normalised problem")
    s = check_solver_inputs(W, H.shape if problem is None else None, sparsity, pattern, mask, "ALPS")
    ALPSParams.check({"rho": rho, "max_iters": max_iters, "min_iters": min_iters, "update_every": update_every,
                      "pcg_iters": pcg_iters, "pcg_rtol": pcg_rtol, "percdamp": percdamp,
                      "max_damp_tries": max_damp_tries, "keep_b": keep_b}, "ALPS", "alps")
    if nothing_to_prune(W.shape, s, pattern, mask):
        return unpruned(W)
    P = solver_problem(W, H, problem, percdamp, "ALPS", name)
    if mask is None:
        if isinstance(s, torch.Tensor):
            s = s.to(P.Hn.device)
        B, m, extra = admm_support(W, P, s, pattern, rho, max_iters, min_iters, update_every, max_damp_tries, name,
                                   keep_b)
        if info is not None:
            info.update(extra)
    else:
        m = mask.to(device=P.Hn.device, dtype=torch.bool)
        B = P.normalise(W)
    for a, b in row_slices(*W.shape):  # rows are independent on a fixed support: conjugate gradients by slices
        Wn = P.normalise(W[a:b])
        masked_cg(P.Hn, Wn @ P.Hn, ~m[a:b], B[a:b], pcg_iters, pcg_rtol, overwrite=True)  # in place in B
    X = P.finite_or_dense(B.masked_fill_(m, 0.0), W, m, "ALPS", name)
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
