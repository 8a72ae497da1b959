"""ACE: activation-cosine-similarity loss estimate plus an activation-variance term.

The published description only says: "combines an activation-cosine-similarity loss estimate
(first-order change of the output direction when W_ij is removed, times a Wanda-like term) with an
activation-variance term"; the exact formula is unverified. What follows is *prunekit's reading* of that
description, derived here; it is not a transcription of the authors' formula and may differ from it.

Derivation
----------
Layer output on token t: y_t = W x_t (out-dim), direction u_t = y_t / |y_t|. Removing W_ij changes the output
by dy_t = -W_ij x_tj e_i. To first order the direction changes by

    du_t = (I - u_t u_t^T) dy_t / |y_t|,    |du_t| = |W_ij x_tj| * sqrt(1 - u_ti^2) / |y_t|,

i.e. (first-order change of the output direction per unit of output i:  g_ti = sqrt(1 - u_ti^2) / |y_t|)
times (the Wanda-like size of the removed contribution: |W_ij x_tj|). For unit vectors
1 - cos = |u - u'|^2 / 2, so the cosine-similarity loss of removing W_ij is, to leading order,

    1 - cos(y_t, y_t + dy_t) = 1/2 * W_ij^2 x_tj^2 (1 - u_ti^2) / |y_t|^2.

Only per-feature sums are gathered (``sq_sum``, ``sum``; no per-token outputs), so the token average is taken
in mean-field form: x_tj^2 -> E2_j = ||X_j||^2 / n (Wanda's statistic), |y_t|^2 -> R, u_ti^2 -> rho_i = r_i / R
with r_i = sum_j W_ij^2 E2_j (mean energy of output i under a diagonal input covariance, i.e. ignoring
feature correlations) and R = sum_i r_i. The cosine term is

    C_ij = 1/2 * W_ij^2 * E2_j * (1 - rho_i) / R     (= 1/2 * (Wanda_ij^2 / n) * (1 - rho_i) / R).

Activation-variance term: of the removed contribution W_ij x_tj only the fluctuating part W_ij (x_tj - mu_j)
cannot be restored by a bias (the mean part can, see STADE); its energy W_ij^2 Var(X_j), normalised by the
same R so that both terms are fractions of the output energy, is added with weight lambda:

    V_ij = W_ij^2 * Var(X_j) / R.

Score (higher = more important)
-------------------------------

    ACE_ij = W_ij^2 / R * ( (1 - rho_i) / 2 * E2_j  +  lambda * Var(X_j) ),   lambda = 0.5 by default,

compared per output row (``group='row'``) like Wanda. Properties: on zero-mean inputs Var(X_j) = n/(n-1) E2_j,
so within a row ACE is a positive multiple of Wanda^2 and ranks exactly like Wanda (and STADE); inputs with a
large mean relative to their spread are ranked lower than Wanda ranks them, more so in rows that carry a large
share rho_i of the output energy (a change along the output direction barely rotates it). R only matters when
ACE scores are compared across rows or layers.

Measured (``tests/test_metrics_extra.py``): on a 16 x 32 layer with independent inputs and one dominant row,
the Spearman rank correlation between C_ij and the exactly measured mean 1 - cos(y, y') of removing W_ij alone
is 0.998 (plain Wanda^2 without the row factor: 0.999). The mean-field (1 - rho_i) factor is thus a crude
correction across rows (it under-weights the dominant row); within a row C ranks exactly like Wanda. Whether
ACE helps perplexity has to be measured on a model; nothing here claims it does. Cost: O(out * in), no statistics beyond Wanda's + the mean.
"""
from __future__ import annotations

import torch
from pydantic import Field

from ..core.metric import register_metric
from ..core.registry import Params
from ..core.stats import LayerStats

ACE_LAMBDA = 0.5


class ACEParams(Params):
    lam: float = Field(ACE_LAMBDA, description="weight of the variance term")


def ace_terms(W: torch.Tensor, stats: LayerStats) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, V): the cosine-loss estimate C_ij and the variance term V_ij of the module docstring."""
    W2 = W.float().pow(2)
    n = max(stats.count, 1)
    e2 = (stats.sq_sum / n).float().to(W2.device)
    var = stats.var().to(W2.device)
    tiny = torch.finfo(torch.float32).tiny
    r = W2 @ e2  # (out,) mean output energy per row, diagonal-covariance approximation
    R = r.sum().clamp_min(tiny)
    rho = (r / R).clamp(0.0, 1.0)
    C = 0.5 * W2 * e2[None, :] * (1.0 - rho)[:, None] / R
    V = W2 * var[None, :] / R
    return C, V


@register_metric("ace", needs=("sq_sum", "sum"), group="row", params=ACEParams,
                 description="prunekit's reading of ACE: W^2/R * ((1-rho_i)/2 * E[x_j^2] + lambda * Var(x_j)), per row")
def ace(W: torch.Tensor, stats: LayerStats, lam: float = ACE_LAMBDA) -> torch.Tensor:
    C, V = ace_terms(W, stats)
    return C + lam * V
