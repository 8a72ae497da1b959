"""DSnoT (Zhang et al., ICLR 2024, "Dynamic Sparse No Training"): training-free prune-and-grow swaps of a mask,
driven by the expected change of each output.

For row r of a layer, with mu_j the mean of input feature j over the calibration tokens, pruning weight W_rj moves
the row's expected output by W_rj mu_j. The row's expected error is

    e_r = sum over pruned j of W_rj mu_j      (what the pruned weights took away from the mean output).

Each cycle, every row still active makes one swap that moves e_r towards 0:

- grow (un-prune) the pruned weight whose W_rj mu_j / Var(x_j)^p is the largest (e_r > 0) or the smallest
  (e_r <= 0): a large expected contribution of the right sign, from a low-variance feature (whose mean stands for
  it well);
- prune, of the weights kept by the original mask, the one with the lowest Wanda score |W_rj| ||x_j|| among those
  whose W_rj mu_j has the opposite sign of e_r (the same sign as what the growth removed), so that both halves of
  the swap reduce |e_r|; for an N:M pattern, the kept weight with the lowest Wanda score in the grown weight's group.

A row stops when |e_r| <= ``threshold``, when the swap would not lower |e_r| or would flip its sign (the paper's
rule; the public code's default drops the sign condition), when it runs out of candidates, or after ``max_cycles``
swaps. A weight grown is never pruned again and a weight pruned by a swap never grown (each list is walked once), so
every row (every N:M group) keeps its count. Defaults are the public code's: 50 cycles, threshold 0.1, p = 1.

Statistics: the mean and variance of every input feature and its norm (``sum`` and ``sq_sum``; no (in, in)
matrix). Memory: a few (out, in) float32 and int64 matrices.
"""
from __future__ import annotations

import torch
from pydantic import Field

from ..core.refine import register_refiner
from ..core.registry import Int, Params

INF = float("inf")
SKIP = ("mlp.*", "fc1", "fc2")  # the public code's default: attention layers only (LLaMA/Qwen/NeoX/GPT-2 MLPs, OPT's)


class DSnoTParams(Params):
    max_cycles: Int = Field(50, ge=0, description="swaps per row at most")
    threshold: float = Field(0.1, ge=0, description="a row stops once its expected error |e_r| is this small")
    var_power: float = Field(1.0, ge=0, description="growth key: W mu / Var(x)^var_power")
    skip: list[str] = Field(default_factory=lambda: list(SKIP), description="layers left as the metric chose them "
                            "(patterns on the layer name, as for ignore; [] refines every layer)")


def _walk(key: torch.Tensor, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the indices of the allowed entries in ascending ``key`` (the rest after them) and their count."""
    return torch.sort(key.masked_fill(~allowed, INF), dim=1, stable=True).indices, allowed.sum(1)


@register_refiner("dsnot", params=DSnoTParams, needs=("sum", "sq_sum"),
                  description="DSnoT: prune-and-grow swaps per row that drive the expected output change sum W mu "
                              "of the pruned weights to 0; per-row and N:M-group counts unchanged")
def dsnot(W: torch.Tensor, mask: torch.Tensor, stats, nm=None, max_cycles: int = 50, threshold: float = 0.1,
          var_power: float = 1.0) -> tuple[torch.Tensor, dict]:
    """The refined mask and {'swaps', 'rows_changed', 'error_before', 'error_after'} (sum over rows of |e_r|)."""
    dev = W.device
    mu = stats.mean().to(dev)
    var = stats.var().to(dev).clamp_min(torch.finfo(torch.float32).tiny)
    wanda = W.abs() * stats.col_norm().to(dev)[None, :]
    contrib = W * mu[None, :]
    growth_key = contrib / var.pow(var_power)[None, :]
    mask = mask.clone()
    rows_n, cols = W.shape
    rows = torch.arange(rows_n, device=dev)
    e = (contrib * mask).sum(1)
    before = float(e.abs().sum())
    # growth candidates: the originally pruned weights, walked from both ends of the ascending growth key
    grow, n_grow = _walk(growth_key, mask)
    lo, hi = torch.zeros_like(n_grow), n_grow - 1
    kept0 = ~mask
    if nm is None:  # prune candidates: originally kept, by sign of contribution, lowest Wanda first
        pos, n_pos = _walk(wanda, kept0 & (contrib > 0))
        neg, n_neg = _walk(wanda, kept0 & (contrib <= 0))
        p_pos, p_neg = torch.zeros_like(n_pos), torch.zeros_like(n_neg)
    else:
        prunable = kept0.clone()
    sign0 = torch.sign(e)
    active = e.abs() > threshold
    made = torch.zeros(rows_n, dtype=torch.long, device=dev)
    for _ in range(int(max_cycles)):
        if not bool(active.any()):
            break
        up = e > 0
        g = grow[rows, torch.where(up, hi, lo).clamp(0, cols - 1)]
        ok = active & (lo <= hi)
        if nm is None:
            use_pos = e < 0  # prune a weight that adds to e (e < 0) or takes from it (e >= 0)
            ptr = torch.where(use_pos, p_pos, p_neg)
            ok &= ptr < torch.where(use_pos, n_pos, n_neg)
            pr = torch.where(use_pos, pos[rows, ptr.clamp(max=cols - 1)], neg[rows, ptr.clamp(max=cols - 1)])
        else:
            M = nm[1]
            group = (g // M)[:, None] * M + torch.arange(M, device=dev)[None, :]
            cand = wanda.gather(1, group).masked_fill(~prunable.gather(1, group), INF)
            best = cand.min(1)
            ok &= torch.isfinite(best.values)
            pr = group[rows, best.indices]
        after = e - contrib[rows, g] + contrib[rows, pr]
        ok &= (after.abs() < e.abs()) & ((torch.sign(after) == sign0) | (after == 0))
        sel = rows[ok]
        mask[sel, g[ok]] = False
        mask[sel, pr[ok]] = True
        e = torch.where(ok, after, e)
        made += ok.long()
        hi = torch.where(ok & up, hi - 1, hi)
        lo = torch.where(ok & ~up, lo + 1, lo)
        if nm is None:
            p_pos = torch.where(ok & use_pos, p_pos + 1, p_pos)
            p_neg = torch.where(ok & ~use_pos, p_neg + 1, p_neg)
        else:
            prunable[sel, pr[ok]] = False
        active = ok & (e.abs() > threshold)
    return mask, {"swaps": int(made.sum()), "rows_changed": int((made > 0).sum()), "error_before": before,
                  "error_after": float(e.abs().sum())}
