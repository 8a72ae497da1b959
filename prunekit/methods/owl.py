"""OWL (Yin et al. 2024): blocks with more activation outliers are pruned less."""
from __future__ import annotations

from typing import Literal, Union

import torch
from pydantic import Field

from ..core.allocation import ModelSummary, block_index, check_target, register_allocator
from ..core.errors import PrunekitError
from ..core.registry import Params

OUTLIER_MS = (3.0, 5.0, 7.0, 10.0)  # the M values whose outlier ratios the plan gathers


class OWLParams(Params):
    M: Union[float, Literal["auto"]] = Field(5.0, description="outlier threshold: score > M x block mean")
    lam: Union[float, Literal["auto"]] = Field(0.08, description="ratios span [S - lam, S + lam]; 0.08 is the "
                                               "paper's value, a prune run tunes it ('auto') unless given")


@register_allocator("owl", needs=("outliers",), params=OWLParams,
                    auto={"lam": [0.0, 0.02, 0.05, 0.08, 0.12, 0.16, 0.2], "M": list(OUTLIER_MS)},
                    default_auto=("lam",),
                    description="OWL: less pruning for blocks with more outliers")
def owl(summary: ModelSummary, target: float, M: float = 5.0, lam: float = 0.08) -> dict[str, float]:
    """``D_b = summary.outliers[M][b]`` (outlier ratio of block b's dense Wanda scores);
    ``D~ = (D - min) / (max - min) * 2 lam`` (all equal -> 0); block ratio
    ``s_b = 1 - (D~_b - mean(D~) + 1 - S) = S + mean(D~) - D~_b`` in ``[S - lam, S + lam]``, shared by
    all layers of the block (mean over blocks, unweighted: blocks have equal size in LLMs;
    ``finalize`` makes the weighted mean exact). ``lam = 0`` gives exactly ``S`` everywhere.
    """
    check_target(target)
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
