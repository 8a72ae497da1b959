"""What a configured prune must gather, decided once from the config and the registered methods: the per-layer
input statistics the engine accumulates in its calibration pass (the metric's, the row-wise method's, the
refiner's and the reconstruction's, :func:`stats_needs`) with their options (:func:`stats_options`), and whether the run reads
calibration windows at all (:func:`needs_calibration`). What the allocator reads is gathered by
:mod:`prunekit.pruning.allocator_inputs`."""
from __future__ import annotations

from ..core.allocation import get_allocator
from ..core.metric import get_metric
from ..core.refine import refine_needs
from ..core.rowwise import rowwise_needs, rowwise_stats_options


def stats_needs(metric, cfg) -> frozenset[str]:
    """Every statistic the chosen metric, row-wise method, refiner and reconstruction read, gathered in one pass."""
    needs = set(metric.needs)
    if cfg.rowwise:
        needs |= rowwise_needs(cfg.rowwise, cfg.rowwise_params)
    if cfg.refine:
        needs |= refine_needs(cfg.refine)
    if cfg.reconstruct:
        needs |= get_metric(cfg.reconstruct).needs
    return frozenset(needs)


def stats_options(cfg) -> dict:
    """Keyword options of the statistics themselves (passed to ``iterate_blocks``), e.g. TRIM's
    ``tokens_per_sample`` (rows of X per calibration sequence)."""
    return rowwise_stats_options(cfg.rowwise, cfg.rowwise_params) if cfg.rowwise else {}


def needs_calibration(metric, cfg) -> bool:
    """Whether the run reads calibration windows: statistics for the layers, an allocator input gathered from
    data, or an 'auto' parameter (tuned on a held-out proxy)."""
    needs = get_allocator(cfg.allocation).needs
    return (bool(stats_needs(metric, cfg)) or bool(needs & {"outliers", "engine"})
            or ("scores" in needs and (bool(metric.needs) or metric.score is None))
            or "auto" in cfg.allocation_params.values() or cfg.expert_allocation != "uniform")
