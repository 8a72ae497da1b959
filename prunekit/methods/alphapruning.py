"""AlphaPruning (Lu et al. 2024): heavy-tailed self-regularisation; a larger ESD alpha means more pruning."""
from __future__ import annotations

from typing import Literal, Union

from pydantic import Field

from ..core.allocation import Allocation, ModelSummary, alpha_ratios, check_target, register_allocator
from ..core.esd import ESDFitParams, layer_alphas


class AlphaPruningParams(ESDFitParams):
    eps: Union[float, Literal["auto"]] = Field(0.3, description="ratios span [1 - eps, 1 + eps] x S before rescaling; "
                                               "0.3 is the paper's value, a prune run tunes it ('auto') unless given")
    level: Literal["block", "layer"] = "block"


@register_allocator("alphapruning", needs=("weights",), params=AlphaPruningParams,
                    auto={"eps": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]}, default_auto=("eps",),
                    description="AlphaPruning: ESD power-law alpha, larger alpha -> more pruning")
def alphapruning(summary: ModelSummary, target: float, eps: float = 0.3, xmin_mode: str = "all",
                 compat: bool = False, level: str = "block", device=None, min_tail: int | None = None,
                 max_candidates: int | None = 4096) -> Allocation:
    """alpha of every matrix (:func:`prunekit.core.esd.layer_alphas`); ``level="block"`` (the paper's default):
    mean alpha over each block's matrices, one ratio per block; ``level="layer"``: one ratio per matrix (use
    with ``granularity='layer'``). Ratios by :func:`prunekit.core.allocation.linear_map_ratios`
    (``[1-eps, 1+eps] * S``, rescaled to the target). ``xmin_mode``/``compat``: see ``core.esd``."""
    check_target(target)
    alphas, stats = layer_alphas(summary.layer_weights(), "alpha", device, xmin_mode, compat, min_tail=min_tail,
                                 max_candidates=max_candidates)
    ratios, block_alphas = alpha_ratios(summary, alphas, target, eps, level)
    info = {"alpha": alphas, "esd": {n: {k: v for k, v in st.items() if k != "shape"} for n, st in stats.items()}}
    if block_alphas is not None:
        info["alpha_block"] = block_alphas
    return Allocation(ratios, info)
