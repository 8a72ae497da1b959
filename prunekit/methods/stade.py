"""STADE: S_ij = W_ij^2 * Var(X_j), compared per output row, with a mean-preserving bias correction.

``Var(X_j)`` is the unbiased variance of input feature j over all calibration tokens (streamed from
``sum`` and ``sq_sum``). On zero-mean inputs Var(X_j) = ||X_j||^2 / (n - 1), so the score is
Wanda's score squared divided by a constant and the ranking is exactly Wanda's.

Bias compensation. Pruning removes sum_j W_ij * mask_ij * x_j from output i, whose mean over the calibration
tokens is delta_i = sum_j W_ij * mask_ij * mu_j (mu_j the mean of input j). Adding delta_i to the bias keeps
E[y_i] on the calibration data:

    E[(W * ~mask) x + b + delta] = E[W x + b].

``stade_bias_update(W_dense, mask, stats)`` returns delta (shape (out,), fp32). It must be computed from the
DENSE weights, i.e. *before* the pruned weights are zeroed: computed after zeroing, W * mask is 0 and the
correction is 0. That is what the published code does, so its compensation has no effect; prunekit does it
in the right order. Bias-free layers get a bias only where the saved model reloads it: before any work,
``models.families.declare_biases`` sets the config flags that give them one (LLaMA: ``attention_bias``,
``mlp_bias``) and refuses architectures that fix those layers bias-free; ``bias_correction=false``
(``--metric-param``) prunes with STADE's scores and no correction.
"""
from __future__ import annotations

import torch

from ..core.metric import register_metric
from ..core.registry import Params
from ..core.stats import LayerStats


class STADEParams(Params):
    bias_correction: bool = True  # false: STADE's scores without the bias correction


def stade_bias_update(W_dense: torch.Tensor, mask: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    """delta_i = sum_j W_ij * mask_ij * mu_j, from the weights *before* zeroing (mask True = pruned)."""
    Wf = W_dense.detach().float()
    mu = stats.mean().to(Wf.device)
    return (Wf * mask.to(Wf.device, torch.bool)) @ mu


@register_metric("stade", needs=("sq_sum", "sum"), group="row", bias_update=stade_bias_update,
                 params=STADEParams,
                 description="W_ij^2 * Var(X_j), compared per output row; bias += sum_j W_ij mask_ij mu_j (before zeroing)")
def stade(W: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    return W.float().pow(2) * stats.var().to(W.device)[None, :]
