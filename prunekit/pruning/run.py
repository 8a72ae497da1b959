"""The orchestrator: validate, allocate, calibrate block by block, apply masks, report."""
from __future__ import annotations

import logging
import time

import torch

from ..allocate import LayerInfo, ModelSummary, allocate, get_allocator
from ..config import PruneConfig, make_config
from ..data import calibration_windows
from ..errors import PrunekitError
from ..masks import check_nm_shape
from ..metrics import configured_metric
from ..models.families import (block_linears, declare_biases, family_of, get_blocks, model_context_length, name_matches,
                              unmatched_patterns, weight_view)
from ..profiles import auto_params, engine_callable, outlier_profile, score_profile
from ..pruner import LayerPruner, prune_all, stats_needs
from ..report.env import machine, versions
from ..save import probe_ids

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PrunekitError("device 'cuda' requested but no CUDA device is available")
    return torch.device(device)


def resolve_seqlen(model, seqlen: int | None) -> int:
    ctx = model_context_length(model)
    if seqlen is None:
        return min(2048, ctx) if ctx else 2048
    if ctx and seqlen > ctx:
        raise PrunekitError(f"seqlen {seqlen} is longer than the model's context ({ctx} tokens)")
    return seqlen


def model_summary(model, block_layers, needs: frozenset[str]) -> ModelSummary:
    layers = [LayerInfo(name, b, tuple(weight_view(m).shape)) for b, d in enumerate(block_layers) for name, m in d.items()]
    summary = ModelSummary(layers)
    if "weights" in needs:
        summary.weights = {name: weight_view(m) for d in block_layers for name, m in d.items()}
    return summary


def layer_ratios(cfg: PruneConfig, model, tokenizer, blocks, block_layers, calib_ids, device) -> tuple[dict, dict]:
    """Per-layer sparsity: from the per-block list, or from the allocator. Returns (ratios, extra info)."""
    n_blocks = len(blocks)
    if isinstance(cfg.sparsity, list):
        if len(cfg.sparsity) != n_blocks:
            raise PrunekitError(f"sparsity list has {len(cfg.sparsity)} entries, the model has {n_blocks} blocks")
        if cfg.allocation != "uniform":
            raise PrunekitError("a per-block sparsity list and an allocation method exclude each other")
        return {n: float(cfg.sparsity[b]) for b, d in enumerate(block_layers) for n in d}, {}
    alloc = get_allocator(cfg.allocation)
    metric, nm = configured_metric(cfg.metric, cfg.metric_params), cfg.nm
    summary = model_summary(model, block_layers, alloc.needs)
    if "outliers" in alloc.needs:
        summary.outliers = outlier_profile(model, blocks, block_layers, calib_ids, device, cfg.batch_size)
    if "scores" in alloc.needs:
        summary.scores = score_profile(model, blocks, block_layers, calib_ids, metric, device, cfg.batch_size,
                                       cfg.seed)
    if "engine" in alloc.needs:
        summary.extra["engine"] = engine_callable(cfg, model, blocks, block_layers, calib_ids, device, metric, nm)
    params, auto_info = auto_params(cfg, model, tokenizer, summary, blocks, block_layers, calib_ids, device,
                                    metric, nm, dict(cfg.allocation_params))
    ratios = allocate(cfg.allocation, summary, cfg.target(), granularity=cfg.granularity,
                      max_ratio=cfg.max_ratio, **params)
    extra = {k: v for k, v in summary.extra.items() if k not in ("engine", "esd")}
    if "esd" in summary.extra:
        extra["esd"] = {n: {k: v for k, v in st.items() if k != "shape"} for n, st in summary.extra["esd"].items()}
    extra["params"] = params
    if auto_info:
        extra["auto"] = auto_info
    if summary.outliers is not None:
        extra["outliers"] = summary.outliers
    return ratios, extra


class Report(dict):
    """The JSON-able report; ``.masks`` holds the bit-packed prune masks (name -> uint8 tensor),
    ``.probe_ids`` the (token ids, source) of the reload probe (see :mod:`prunekit.save`) or None."""

    def __init__(self, data: dict, masks: dict | None = None, probe_ids=None):
        super().__init__(data)
        self.masks = masks or {}
        self.probe_ids = probe_ids


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
    alloc_needs = get_allocator(cfg.allocation).needs
    extra_report = {}
    if metric.bias_update is not None:  # the corrected biases must reload with from_pretrained: after the checks, before any work
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
    needs_data = (bool(stats_needs(metric, cfg)) or bool(alloc_needs & {"outliers", "engine"})
                  or ("scores" in alloc_needs and (bool(metric.needs) or metric.score is None))
                  or "auto" in cfg.allocation_params.values())
    if calib_ids is None and needs_data:
        if tokenizer is None:
            raise PrunekitError(f"{cfg.metric} / {cfg.allocation} needs calibration data: pass a tokenizer or calib_ids")
        calib_ids = calibration_windows(tokenizer, cfg.calib, cfg.nsamples, seqlen, cfg.seed)
    t_data = time.time()
    ratios, alloc_extra = layer_ratios(cfg, model, tokenizer, blocks, block_layers, calib_ids, device)
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
    from ..layer_removal import prune_and_comp, remove_one_shot

    if calib_ids is None:
        raise PrunekitError("block removal needs calibration data")
    fn = prune_and_comp if cfg.removal == "prune-comp" else remove_one_shot
    return fn(model, calib_ids, cfg.remove_blocks, score=cfg.removal_score, device=device, batch_size=cfg.batch_size)


def select_and_remove(cfg, model, tokenizer, seqlen, device):
    """Calibration windows (optionally chosen by prototype scores from a larger pool), then block removal."""
    info = {}
    if cfg.calib_select:
        from ..data.select import parse_select, select_windows

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


def build_report(cfg, model, family, block_layers, pruner, seqlen, calib_ids, alloc_extra, timing, device) -> dict:
    layers = []
    for b, d in enumerate(block_layers):
        for name in d:
            rec = pruner.records[name]
            layers.append({"name": name, "block": b, "shape": rec["shape"], "target": rec["target"],
                           "sparsity": rec["pruned"] / rec["numel"], "numel": rec["numel"]})
            if "rowwise" in rec:  # e.g. TRIM: chosen lr, layer output cosine with and without it
                layers[-1]["rowwise"] = rec["rowwise"]
    blocks = []
    for b in range(len(block_layers)):
        ls = [l for l in layers if l["block"] == b]
        num = sum(l["numel"] for l in ls)
        blocks.append({"block": b, "sparsity": sum(l["sparsity"] * l["numel"] for l in ls) / num if num else 0.0,
                       "numel": num})
    prunable = sum(l["numel"] for l in layers)
    total_params = sum(p.numel() for p in model.parameters())
    return Report({
        "model": cfg.model,
        "architecture": model.config.model_type,
        "family": family,
        "method": {"metric": cfg.metric, "pattern": cfg.pattern, "allocation": cfg.allocation,
                   "allocation_params": cfg.allocation_params,
                   "granularity": cfg.granularity or get_allocator(cfg.allocation).granularity,
                   "sequential": cfg.sequential, "rowwise": cfg.rowwise, "row_rounding": cfg.row_rounding,
                   "rowwise_params": cfg.rowwise_params, "rowwise_skip": cfg.rowwise_skip,
                   "reconstruct": cfg.reconstruct,
                   # the values used: the registered defaults with the user's settings over them
                   "metric_params": configured_metric(cfg.metric, cfg.metric_params).params,
                   "reconstruct_params": (configured_metric(cfg.reconstruct, cfg.reconstruct_params).params
                                          if cfg.reconstruct else {})},
        "target_sparsity": cfg.target(),
        "protocol": {"calib": cfg.calib if calib_ids is not None else None,
                     "nsamples": int(calib_ids.shape[0]) if calib_ids is not None else 0,
                     "seqlen": seqlen, "seed": cfg.seed, "device": str(device),
                     "dtype": str(next(model.parameters()).dtype).replace("torch.", "")},
        "params": {"total": total_params, "prunable": prunable},
        "overall_sparsity": sum(l["sparsity"] * l["numel"] for l in layers) / prunable if prunable else 0.0,
        "blocks": blocks,
        "layers": layers,
        "allocation": alloc_extra,
        "timing": timing,
        "versions": versions(),
        "machine": machine(),
        "config": cfg.model_dump(),
    }, masks=pruner.masks, probe_ids=None if calib_ids is None else probe_ids(model, calib_ids))
