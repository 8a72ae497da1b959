"""FARMS: AlphaPruning's mapping on alphas fitted to fixed-aspect-ratio submatrices (no aspect-ratio bias)."""
from __future__ import annotations

from typing import Literal, Union

from pydantic import Field

from ..core.allocation import Allocation, ModelSummary, alpha_ratios, check_target, register_allocator
from ..core.esd import ESDFitParams, layer_alphas
from ..core.registry import Int


class FARMSParams(ESDFitParams):
    eps: Union[float, Literal["auto"]] = Field(0.3, description="ratios span [1 - eps, 1 + eps] x S before rescaling; "
                                               "0.3 is the paper's value, a prune run tunes it ('auto') unless given")
    level: Literal["block", "layer"] = "block"
    max_side: Int = Field(2000, ge=1, description="short side of a window")
    q: float = Field(1.0, gt=0, description="aspect ratio of a window")
    grid: Int = Field(12, ge=1, description="window positions per dimension")


@register_allocator("farms", needs=("weights",), params=FARMSParams,
                    auto={"eps": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]}, default_auto=("eps",),
                    description="FARMS: AlphaPruning mapping on fixed-aspect-ratio submatrix ESDs")
def farms(summary: ModelSummary, target: float, eps: float = 0.3, max_side: int = 2000, q: float = 1.0,
          grid: int = 12, xmin_mode: str = "all", compat: bool = False, level: str = "block", device=None,
          min_tail: int | None = None, max_candidates: int | None = 4096) -> Allocation:
    """Like AlphaPruning, but alpha is fitted on the pooled eigenvalues of ``n' x n'q`` windows
    (``n' = min(max_side, min(m, n))``, ``grid`` positions per dimension), which removes the aspect-ratio
    bias between square and rectangular matrices."""
    check_target(target)
    alphas, _ = layer_alphas(summary.layer_weights(), "farms", device, xmin_mode, compat, max_side, q, grid,
                             min_tail=min_tail, max_candidates=max_candidates)
    ratios, block_alphas = alpha_ratios(summary, alphas, target, eps, level)
    info = {"farms_alpha": alphas}
    if block_alphas is not None:
        info["farms_alpha_block"] = block_alphas
    return Allocation(ratios, info)
