"""Swap refinement of a prune mask at fixed per-row counts (after SparseSwaps, Zimmer et al. 2025).

With every row's count of pruned weights fixed, the rows of a layer are independent and the mask-only error of
row r (the dense weights kept as they are, the pruned ones set to 0) is

    L_r = d_r^T Hn d_r,   d_r = the pruned part of the row (w on the pruned columns, 0 elsewhere),

in the damped, normalised coordinates of :mod:`prunekit.core.lsq` (w = the row of Wn = W D, Hn with unit
diagonal; the same objective as (W - Ŵ) H_d (W - Ŵ)^T with H_d the damped X^T X). A 1-swap keeps pruned column i
and prunes kept column j instead; with c = d^T Hn (kept per row) its exact change is

    dL(i, j) = a_i + b_j - 2 w_i w_j Hn_ij,   a_i = w_i^2 - 2 w_i c_i   (un-pruning i),
                                              b_j = w_j^2 + 2 w_j c_j   (pruning j),

so the best swap of a row needs no pass over the data, only c, the row and Hn. Each round makes, in every row
still improving, the best swap among the ``candidates`` lowest a_i and the ``candidates`` lowest b_j (the k x k
pairs evaluated exactly; ``candidates = 0``: all pairs, the exact best 1-swap), if it lowers L_r; then
c <- c + w_j Hn[j] - w_i Hn[i]. A row stops when its best evaluated swap does not lower its error; all stop after
``max_swaps`` rounds. For an N:M pattern only pairs inside one group of M columns are swaps (all of them are
evaluated: N (M - N) per group), so every group keeps N pruned weights. The per-row (per-group) counts never
change, so the layer's sparsity, its allocation and the pattern stay exactly what the metric and allocator chose.

Difference from the paper: SparseSwaps evaluates every pair of a row on a GPU; on a CPU the k x k shortlist keeps
a round at O(out x (in + k^2)); the swap made is still evaluated exactly, so the error goes down at every swap.

Objective: the mask-only error (the weights not updated); after ``--reconstruct`` the weights are then solved on the
refined mask. Memory: the layer's normalised problem (one (in, in) matrix, shared with ADMM/ALPS and the layers
that read the same input) and three (out, in) float32 matrices.
"""
from __future__ import annotations

import torch
from pydantic import Field

from ..core.lsq import DEFAULT_PERCDAMP, layer_problem
from ..core.refine import register_refiner
from ..core.registry import Int, Params

INF = float("inf")


class SwapsParams(Params):
    max_swaps: Int = Field(100, ge=0, description="swap rounds at most (each makes at most one swap per row)")
    candidates: Int = Field(32, ge=0, description="un-prune and prune candidates per row whose pairs are evaluated "
                                                   "exactly (0: all pairs)")
    percdamp: float = Field(DEFAULT_PERCDAMP, ge=0, description="damping of X^T X, a fraction of its mean diagonal")


def _free_shortlist(a: torch.Tensor, b: torch.Tensor, k: int):
    """Unstructured: the k lowest un-prune gains a and the k lowest prune gains b of each row (k = 0: all), every
    pair allowed. Returns (I, J, allowed) with allowed None (all pairs)."""
    n = a.shape[1]
    k = n if k == 0 else min(k, n)
    return torch.topk(a, k, dim=1, largest=False).indices, torch.topk(b, k, dim=1, largest=False).indices, None


def _group_shortlist(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, Hn: torch.Tensor, mask: torch.Tensor,
                     nm: tuple[int, int], k: int):
    """N:M: the k groups of each row whose best in-group swap gains most (k = 0: all groups); I = their N pruned
    columns, J = their M - N kept ones, a pair allowed only inside one group."""
    n_, M = nm
    rows, d = a.shape
    G = d // M
    ag, bg, wg = a.reshape(rows, G, M), b.reshape(rows, G, M), w.reshape(rows, G, M)
    idx = torch.arange(d, device=a.device).reshape(G, M)
    block = Hn[idx[:, :, None], idx[:, None, :]]  # (G, M, M): Hn inside each group
    pair = ag[..., :, None] + bg[..., None, :] - 2.0 * wg[..., :, None] * wg[..., None, :] * block[None]
    best = torch.nan_to_num(pair, nan=INF).reshape(rows, G, M * M).min(2).values
    k = G if k == 0 else min(k, G)
    groups = torch.topk(best, k, dim=1, largest=False).indices  # (rows, k)
    cols = (groups[:, :, None] * M + torch.arange(M, device=a.device)).reshape(rows, k * M)
    order = torch.sort((~mask.gather(1, cols)).reshape(rows, k, M).to(torch.int8), dim=2, stable=True).indices
    cols = cols.reshape(rows, k, M).gather(2, order)  # per group: the N pruned columns first
    I, J = cols[:, :, :n_].reshape(rows, -1), cols[:, :, n_:].reshape(rows, -1)
    allowed = (torch.arange(k, device=a.device).repeat_interleave(n_)[:, None]
               == torch.arange(k, device=a.device).repeat_interleave(M - n_)[None, :])
    return I, J, allowed


def _round(Wn, Hn, mask, c, loss, rows, nm, k: int, budget: torch.Tensor):
    """One round on ``rows``: a shortlist per row, then greedy swaps inside it with exact incremental gains (after
    swap (i1, j1), c changes by dc = w_j1 Hn[j1] - w_i1 Hn[i1]: a_i by -2 w_i dc_i, b_j by +2 w_j dc_j, the pair
    term not at all), at most ``budget`` per row. Updates mask, c and loss in place; returns swaps per row."""
    w, m, cr = Wn[rows], mask[rows], c[rows]
    a = (w * w - 2.0 * w * cr).masked_fill(~m, INF)
    b = (w * w + 2.0 * w * cr).masked_fill(m, INF)
    if nm is None:
        I, J, allowed = _free_shortlist(a, b, k)
    else:
        I, J, allowed = _group_shortlist(a, b, w, Hn, m, nm, k)
    av, bv, wI, wJ = a.gather(1, I), b.gather(1, J), w.gather(1, I), w.gather(1, J)
    HII = Hn[I[:, :, None], I[:, None, :]]
    HJJ = Hn[J[:, :, None], J[:, None, :]]
    HIJ = Hn[I[:, :, None], J[:, None, :]]
    cross = -2.0 * wI[:, :, None] * wJ[:, None, :] * HIJ
    if allowed is not None:
        cross = cross.masked_fill(~allowed, INF)
    n, p, q = cross.shape
    ar = torch.arange(n, device=Wn.device)
    made = torch.zeros(n, dtype=torch.long, device=Wn.device)
    live = budget > 0
    tiny = torch.finfo(torch.float32).tiny
    dd = torch.zeros_like(w)  # the change of the pruned part d, applied to c at the end of the round
    for _ in range(min(p, q)):
        pair = torch.nan_to_num(av[:, :, None] + bv[:, None, :] + cross, nan=INF).reshape(n, -1)
        best = pair.min(1)
        ok = live & torch.isfinite(best.values) & (best.values < -1e-7 * loss[rows].abs().clamp_min(tiny))
        if not bool(ok.any()):
            break
        p1, q1 = best.indices // q, best.indices % q
        sel = ar[ok]
        p1, q1 = p1[ok], q1[ok]
        i1, j1 = I[sel, p1], J[sel, q1]
        w_i, w_j = wI[sel, p1], wJ[sel, q1]
        mask[rows[sel], i1] = False
        mask[rows[sel], j1] = True
        dd[sel, i1] -= w_i
        dd[sel, j1] += w_j
        loss[rows[sel]] += best.values[ok]
        dc_I = w_j[:, None] * HIJ[sel, :, q1] - w_i[:, None] * HII[sel, p1, :]
        dc_J = w_j[:, None] * HJJ[sel, q1, :] - w_i[:, None] * HIJ[sel, p1, :]
        av[sel] -= 2.0 * wI[sel] * dc_I
        bv[sel] += 2.0 * wJ[sel] * dc_J
        av[sel, p1] = INF  # i1 is kept now, j1 pruned: neither is a candidate of this round any more
        bv[sel, q1] = INF
        made[sel] += 1
        live = ok & (made < budget)
    c[rows] += dd @ Hn
    return made


@register_refiner("swaps", params=SwapsParams, needs=("hessian",),
                  description="exact-gain 1-swaps per row on the mask-only error d^T X^T X d (SparseSwaps), per-row "
                              "and N:M-group counts unchanged")
def swaps(W: torch.Tensor, mask: torch.Tensor, stats, nm=None, max_swaps: int = 100, candidates: int = 32,
          percdamp: float = DEFAULT_PERCDAMP) -> tuple[torch.Tensor, dict]:
    """The refined mask and {'swaps', 'rows_changed', 'error_before', 'error_after'} (the layer's mask-only error,
    summed over rows, in the damped normalised objective)."""
    P = layer_problem(stats, W.device, percdamp)
    Wn, Hn = P.normalise(W), P.Hn
    mask = mask.clone()
    d = Wn.masked_fill(~mask, 0.0)
    c = d @ Hn
    loss = (d * c).sum(1)
    before = float(loss.sum(dtype=torch.float64))
    swaps_made = torch.zeros(W.shape[0], dtype=torch.long, device=W.device)
    rows = torch.arange(W.shape[0], device=W.device)
    while rows.numel():
        made = _round(Wn, Hn, mask, c, loss, rows, nm, int(candidates), int(max_swaps) - swaps_made[rows])
        swaps_made[rows] += made
        rows = rows[(made > 0) & (swaps_made[rows] < int(max_swaps))]
    d = Wn.masked_fill(~mask, 0.0)
    after = float((d * (d @ Hn)).sum(dtype=torch.float64))
    return mask, {"swaps": int(swaps_made.sum()), "rows_changed": int((swaps_made > 0).sum()),
                  "error_before": before, "error_after": after}
