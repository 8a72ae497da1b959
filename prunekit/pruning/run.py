"""One prune, in order: check the config against the model (a model whose blocks prunekit would mostly leave
dense is refused, :func:`check_coverage`), remove blocks or experts or select calibration windows when asked,
gather what the allocator needs and allocate (then spread each MoE layer's ratio over its experts when asked),
calibrate and prune block by block, build the report."""
from __future__ import annotations

import logging
import time

import torch

from ..core.allocation import allocate
from ..core.data import calibration_windows
from ..core.errors import PrunekitError
from ..core.families import (
    COVERAGE_MIN,
    block_linears,
    coverage,
    declare_biases,
    family_of,
    get_blocks,
    name_matches,
    resolve_seqlen,
    unmatched_patterns,
    weight_view,
)
from ..core.masks import check_nm_shape
from ..core.metric import configured_metric
from ..core.offload import resolve_device
from ..methods.experts import ExpertAllocationParams, expert_allocation, remove_experts
from ..methods.prototype import parse_select, select_windows
from ..methods.removal import prune_and_comp, remove_one_shot
from .allocator_inputs import allocator_inputs
from .auto import auto_params
from .config import PruneConfig, make_config
from .layer_pruner import LayerPruner, prune_all
from .plan import needs_calibration
from .report import build_report

log = logging.getLogger(__name__)


def layer_ratios(cfg: PruneConfig, model, tokenizer, blocks, block_layers, calib_ids, device, metric) -> tuple[dict, dict]:
    """Per-layer sparsity: from the per-block list, or from the allocator. Returns (ratios, what the report shows
    of the allocation: the allocator's info, the parameters used, 'auto' trials, OWL's outlier profile)."""
    n_blocks = len(blocks)
    if isinstance(cfg.sparsity, list):
        if len(cfg.sparsity) != n_blocks:
            raise PrunekitError(f"sparsity list has {len(cfg.sparsity)} entries, the model has {n_blocks} blocks")
        if cfg.allocation != "uniform":
            raise PrunekitError("a per-block sparsity list and an allocation method exclude each other")
        return {n: float(cfg.sparsity[b]) for b, d in enumerate(block_layers) for n in d}, {}
    summary = allocator_inputs(cfg, model, blocks, block_layers, calib_ids, device, metric)
    params, auto_info = auto_params(cfg, model, tokenizer, summary, blocks, block_layers, calib_ids, device,
                                    metric, dict(cfg.allocation_params))
    result = allocate(cfg.allocation, summary, cfg.target(), granularity=cfg.granularity,
                      max_ratio=cfg.max_ratio, **params)
    extra = dict(result.info)
    extra["params"] = params
    if auto_info:
        extra["auto"] = auto_info
    if summary.outliers is not None:
        extra["outliers"] = summary.outliers
    return dict(result), extra


def prune(model, tokenizer, config: PruneConfig | dict, calib_ids: torch.Tensor | None = None) -> dict:
    """Prune ``model`` in place and return the report (a JSON-able dict)."""
    cfg = config if isinstance(config, PruneConfig) else make_config(**config)
    t0 = time.time()
    fam = family_of(model)
    metric = configured_metric(cfg.metric, cfg.metric_params)
    nm = cfg.nm
    cover = check_coverage(model, cfg)
    check_layer_patterns(model, cfg, cover)
    if nm is not None:
        for d in block_linears(model, cfg.ignore):
            for name, m in d.items():
                check_nm_shape(nm, weight_view(m).shape[1], name)
    seqlen = resolve_seqlen(model, cfg.seqlen)
    device = resolve_device(cfg.device)
    extra_report = {}
    if metric.bias_update is not None:  # corrected biases must survive a reload: after the checks, before any work
        flags = declare_biases(model, [n for d in block_linears(model, cfg.ignore) for n in d],
                               f"{cfg.metric}'s bias correction")
        if flags:
            extra_report["config_flags_set"] = {f: True for f in flags}
    if calib_ids is None and (cfg.calib_select or cfg.remove_blocks or cfg.remove_experts):
        if tokenizer is None:
            raise PrunekitError("calibration selection, block and expert removal need a tokenizer or calib_ids")
        calib_ids, info = select_and_remove(cfg, model, tokenizer, seqlen, device)
        extra_report.update(info)
    else:
        extra_report.update(removal_steps(cfg, model, calib_ids, device))
    if cfg.remove_blocks or cfg.remove_experts:  # the report describes the model as pruned
        cover = {**coverage(model), **({"warning": cover["warning"]} if "warning" in cover else {})}
    blocks = get_blocks(model)
    block_layers = block_linears(model, cfg.ignore)
    if calib_ids is None and needs_calibration(metric, cfg):
        if tokenizer is None:
            raise PrunekitError(f"{cfg.metric} / {cfg.allocation} needs calibration data: pass a tokenizer or calib_ids")
        calib_ids = calibration_windows(tokenizer, cfg.calib, cfg.nsamples, seqlen, cfg.seed)
    t_data = time.time()
    ratios, alloc_extra = layer_ratios(cfg, model, tokenizer, blocks, block_layers, calib_ids, device, metric)
    if cfg.expert_allocation != "uniform":
        ratios, alloc_extra["experts"] = expert_allocation(
            model, calib_ids, block_layers, ratios, cfg.expert_allocation,
            ExpertAllocationParams(**cfg.expert_allocation_params).eps, cfg.max_ratio, device, cfg.batch_size)
    t_alloc = time.time()
    pruner = LayerPruner.from_config(cfg, metric, ratios)
    if nm is None and all(r == 0 for r in ratios.values()):  # nothing to prune (e.g. block removal only)
        for d in block_layers:
            for name, m in d.items():
                pruner(name, m, None)
    else:
        prune_all(pruner, metric, model, blocks, block_layers, calib_ids, device, cfg, "pruning")
    t_prune = time.time()
    alloc_extra.update(extra_report)
    return build_report(cfg, model, fam.name, block_layers, pruner, seqlen, calib_ids, alloc_extra, cover, {
        "data_s": round(t_data - t0, 2), "allocation_s": round(t_alloc - t_data, 2),
        "prune_s": round(t_prune - t_alloc, 2), "total_s": round(t_prune - t0, 2)}, device)


def check_coverage(model, cfg) -> dict:
    """The share of each block's parameters prunekit can prune (:func:`prunekit.core.families.coverage`). Where some
    block's share is below ``COVERAGE_MIN`` the run is refused before any work, naming what would be left dense,
    unless ``ignore`` names those parameters (the user chose to leave them dense) or the family is known to be
    partial (then a warning, also in the report). Returns the coverage with any ``warning``."""
    cover = coverage(model)
    if cover["min"] >= COVERAGE_MIN:
        return cover
    n_blocks = len(cover["blocks"])
    per_block = cover["block_params"] / max(n_blocks, 1)
    big = {n: v for n, v in cover["dense"].items() if v / n_blocks >= 0.01 * per_block}  # >= 1% of a block each
    what = ", ".join(f"{n} ({v / n_blocks / per_block:.1%} of a block)" for n, v in list(big.items())[:4])
    share = f"{cover['min']:.1%}"
    fam = family_of(model)
    if fam.partial:
        cover["warning"] = f"only {share} of a block's parameters are prunable; left dense: {what} ({fam.partial})"
    elif all(name_matches(n, cfg.ignore) for n in big):
        cover["warning"] = f"only {share} of a block's parameters are prunable; left dense as ignore asks: {what}"
    else:
        raise PrunekitError(f"prunekit can prune only {share} of a block's parameters of this "
                            f"{model.config.model_type} model: {what} would be left dense; refusing to report a "
                            "sparsity over the rest (pass --ignore with a pattern naming them to prune the rest anyway)")
    log.warning(cover["warning"])
    return cover


def check_layer_patterns(model, cfg, cover: dict | None = None) -> None:
    """An ``ignore`` or ``rowwise_skip`` pattern that matches no prunable layer is most likely misspelt (and a
    misspelt ``ignore`` would prune a layer the user wanted dense): say so before any work. An ``ignore`` pattern
    may also name parameters prunekit leaves dense anyway (``cover["dense"]``, see :func:`check_coverage`)."""
    names = [n for d in block_linears(model) for n in d]
    kept = [n for n in names if not name_matches(n, cfg.ignore)]  # what block_linears(model, cfg.ignore) keeps
    dense = list((cover or {}).get("dense", {}))
    for field, pats, pool in (("ignore", cfg.ignore, names + dense), ("rowwise_skip", cfg.rowwise_skip, kept)):
        bad = unmatched_patterns(pool, pats)
        if bad:
            raise PrunekitError(f"{field} pattern(s) {', '.join(map(repr, bad))} match no prunable layer"
                                f"{' left by ignore' if pool is kept else ''} (names look like "
                                f"{pool[0] if pool else '(none)'!r})")
    if names and not kept:
        raise PrunekitError(f"ignore pattern(s) {', '.join(map(repr, cfg.ignore))} match every prunable layer: "
                            "nothing is left to prune")


def removal_steps(cfg, model, calib_ids, device) -> dict:
    """Block removal, then expert removal, as configured; what the report shows of each."""
    info = {}
    if cfg.remove_blocks:
        if calib_ids is None:
            raise PrunekitError("block removal needs calibration data")
        fn = prune_and_comp if cfg.removal == "prune-comp" else remove_one_shot
        info["layer_removal"] = fn(model, calib_ids, cfg.remove_blocks, score=cfg.removal_score, device=device,
                                   batch_size=cfg.batch_size)
    if cfg.remove_experts:
        if calib_ids is None:
            raise PrunekitError("expert removal needs calibration data")
        info["expert_removal"] = remove_experts(model, calib_ids, cfg.remove_experts, cfg.expert_score, device,
                                                cfg.batch_size)
    return info


def select_and_remove(cfg, model, tokenizer, seqlen, device):
    """Calibration windows (optionally chosen by prototype scores from a larger pool), then block and expert
    removal."""
    info = {}
    if cfg.calib_select:
        pool = calibration_windows(tokenizer, cfg.calib, cfg.calib_pool or 4 * cfg.nsamples, seqlen, cfg.seed)
        idx, sel = select_windows(pool, cfg.nsamples, parse_select(cfg.calib_select), seed=cfg.seed, embed=model,
                                  device=device, batch_size=cfg.batch_size or 8)
        calib_ids = pool[idx]
        info["calib_select"] = sel
    else:
        calib_ids = calibration_windows(tokenizer, cfg.calib, cfg.nsamples, seqlen, cfg.seed)
    info.update(removal_steps(cfg, model, calib_ids, device))
    return calib_ids, info
