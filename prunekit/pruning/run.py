"""One prune, in order: check the config against the model, remove blocks or select calibration windows when
asked, gather what the allocator needs and allocate, calibrate and prune block by block, build the report."""
from __future__ import annotations

import logging
import time

import torch

from ..core.allocation import allocate
from ..core.data import calibration_windows
from ..core.errors import PrunekitError
from ..core.families import (
    block_linears,
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
    check_layer_patterns(model, cfg)
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
    if calib_ids is None and (cfg.calib_select or cfg.remove_blocks):
        if tokenizer is None:
            raise PrunekitError("calibration selection and block removal need a tokenizer or calib_ids")
        calib_ids, info = select_and_remove(cfg, model, tokenizer, seqlen, device)
        extra_report.update(info)
    elif cfg.remove_blocks:
        extra_report["layer_removal"] = remove_blocks_step(cfg, model, calib_ids, device)
    blocks = get_blocks(model)
    block_layers = block_linears(model, cfg.ignore)
    if calib_ids is None and needs_calibration(metric, cfg):
        if tokenizer is None:
            raise PrunekitError(f"{cfg.metric} / {cfg.allocation} needs calibration data: pass a tokenizer or calib_ids")
        calib_ids = calibration_windows(tokenizer, cfg.calib, cfg.nsamples, seqlen, cfg.seed)
    t_data = time.time()
    ratios, alloc_extra = layer_ratios(cfg, model, tokenizer, blocks, block_layers, calib_ids, device, metric)
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
    return build_report(cfg, model, fam.name, block_layers, pruner, seqlen, calib_ids, alloc_extra, {
        "data_s": round(t_data - t0, 2), "allocation_s": round(t_alloc - t_data, 2),
        "prune_s": round(t_prune - t_alloc, 2), "total_s": round(t_prune - t0, 2)}, device)


def check_layer_patterns(model, cfg) -> None:
    """An ``ignore`` or ``rowwise_skip`` pattern that matches no prunable layer is most likely misspelt (and a
    misspelt ``ignore`` would prune a layer the user wanted dense): say so before any work."""
    names = [n for d in block_linears(model) for n in d]
    kept = [n for n in names if not name_matches(n, cfg.ignore)]  # what block_linears(model, cfg.ignore) keeps
    for field, pats, pool in (("ignore", cfg.ignore, names), ("rowwise_skip", cfg.rowwise_skip, kept)):
        bad = unmatched_patterns(pool, pats)
        if bad:
            raise PrunekitError(f"{field} pattern(s) {', '.join(map(repr, bad))} match no prunable layer"
                                f"{' left by ignore' if pool is kept else ''} (names look like "
                                f"{pool[0] if pool else '(none)'!r})")
    if names and not kept:
        raise PrunekitError(f"ignore pattern(s) {', '.join(map(repr, cfg.ignore))} match every prunable layer: "
                            "nothing is left to prune")


def remove_blocks_step(cfg, model, calib_ids, device) -> dict:
    if calib_ids is None:
        raise PrunekitError("block removal needs calibration data")
    fn = prune_and_comp if cfg.removal == "prune-comp" else remove_one_shot
    return fn(model, calib_ids, cfg.remove_blocks, score=cfg.removal_score, device=device, batch_size=cfg.batch_size)


def select_and_remove(cfg, model, tokenizer, seqlen, device):
    """Calibration windows (optionally chosen by prototype scores from a larger pool), then block removal."""
    info = {}
    if cfg.calib_select:
        pool = calibration_windows(tokenizer, cfg.calib, cfg.calib_pool or 4 * cfg.nsamples, seqlen, cfg.seed)
        idx, sel = select_windows(pool, cfg.nsamples, parse_select(cfg.calib_select), seed=cfg.seed, embed=model,
                                  device=device, batch_size=cfg.batch_size or 8)
        calib_ids = pool[idx]
        info["calib_select"] = sel
    else:
        calib_ids = calibration_windows(tokenizer, cfg.calib, cfg.nsamples, seqlen, cfg.seed)
    if cfg.remove_blocks:
        info["layer_removal"] = remove_blocks_step(cfg, model, calib_ids, device)
    return calib_ids, info
