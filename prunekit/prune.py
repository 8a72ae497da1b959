"""The orchestrator: validate, allocate, calibrate block by block, apply masks, report."""
from __future__ import annotations

import logging
import platform
import time

import torch

from .allocate import LayerInfo, ModelSummary, allocate, get_allocator
from .calibrate import iterate_blocks
from .config import PruneConfig, make_config
from .data import calibration_windows
from .errors import PrunekitError
from .masks import check_nm_shape, make_mask, pack_mask
from .metrics import get_metric, wanda
from .models.families import block_linears, family_of, get_blocks, model_context_length, weight_view

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


def versions() -> dict:
    import transformers

    from . import __version__

    return {"prunekit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def machine() -> dict:
    import os

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def model_summary(model, block_layers, needs: frozenset[str]) -> ModelSummary:
    layers = [LayerInfo(name, b, tuple(weight_view(m).shape)) for b, d in enumerate(block_layers) for name, m in d.items()]
    summary = ModelSummary(layers)
    if "weights" in needs:
        summary.weights = {name: weight_view(m) for d in block_layers for name, m in d.items()}
    return summary


def outlier_profile(model, blocks, block_layers, calib_ids, device, batch_size, ms=(3.0, 5.0, 7.0, 10.0)):
    """OWL statistics of the *dense* model: per block, the share of Wanda scores above M x block mean."""
    out = {float(m): [] for m in ms}
    current: list[torch.Tensor] = []

    def handle(name, module, stats):
        current.append(wanda(weight_view(module).float(), stats).flatten())

    def done(b):
        a = torch.cat(current)
        mean = a.mean()
        for m in out:
            out[m].append(float((a > m * mean).double().mean()))
        current.clear()

    iterate_blocks(model, blocks, block_layers, calib_ids, frozenset({"sq_sum"}), handle, device,
                   batch_size=batch_size, sequential=True, desc="OWL profile", on_block_done=done)
    return out


def layer_ratios(cfg: PruneConfig, model, blocks, block_layers, calib_ids, device) -> tuple[dict, dict]:
    """Per-layer sparsity: from the per-block list, or from the allocator. Returns (ratios, extra info)."""
    n_blocks = len(blocks)
    if isinstance(cfg.sparsity, list):
        if len(cfg.sparsity) != n_blocks:
            raise PrunekitError(f"sparsity list has {len(cfg.sparsity)} entries, the model has {n_blocks} blocks")
        if cfg.allocation != "uniform":
            raise PrunekitError("a per-block sparsity list and an allocation method exclude each other")
        return {n: float(cfg.sparsity[b]) for b, d in enumerate(block_layers) for n in d}, {}
    alloc = get_allocator(cfg.allocation)
    summary = model_summary(model, block_layers, alloc.needs)
    if "outliers" in alloc.needs:
        summary.outliers = outlier_profile(model, blocks, block_layers, calib_ids, device, cfg.batch_size)
    if "engine" in alloc.needs:
        summary.extra["engine"] = {"model": model, "config": cfg, "calib_ids": calib_ids, "device": device}
    params = dict(cfg.allocation_params)
    ratios = allocate(cfg.allocation, summary, cfg.target(), granularity=cfg.granularity,
                      max_ratio=cfg.max_ratio, **params)
    extra = {k: v for k, v in summary.extra.items() if k != "engine"}
    if summary.outliers is not None:
        extra["outliers"] = summary.outliers
    return ratios, extra


class Report(dict):
    """The JSON-able report; ``.masks`` holds the bit-packed prune masks (name -> uint8 tensor)."""

    def __init__(self, data: dict, masks: dict | None = None):
        super().__init__(data)
        self.masks = masks or {}


class _Pruner:
    """The per-layer handler the engine calls: score or solve, mask, bias update, zero, record."""

    def __init__(self, metric, ratios: dict, nm):
        self.metric, self.ratios, self.nm = metric, ratios, nm
        self.masks: dict[str, torch.Tensor] = {}
        self.records: dict[str, dict] = {}

    @torch.no_grad()
    def __call__(self, name, module, stats):
        W = weight_view(module)
        r = self.ratios[name]
        if r == 0 and self.nm is None:
            mask = torch.zeros(W.shape, dtype=torch.bool, device=W.device)
        else:
            Wf = W.float()  # may alias W (fp32 models): solvers work on their own copy
            Wn = None
            if self.metric.solver is not None:
                Wn, mask = self.metric.solver(Wf, stats, r, self.nm, None)
            else:
                mask = make_mask(self.metric.score(Wf, stats), r, self.nm, self.metric.group)
            if self.metric.bias_update is not None:  # from the dense weights, before any zeroing
                add_bias(module, self.metric.bias_update(Wf, mask, stats))
            if Wn is not None:
                W.copy_(Wn.to(W.dtype))
            W[mask] = 0
        self.masks[name] = pack_mask(mask)
        self.records[name] = {"shape": list(W.shape), "target": r, "pruned": int(mask.sum()), "numel": mask.numel()}


def add_bias(module, delta: torch.Tensor | None) -> None:
    """Add a per-output correction to the layer's bias, creating a zero bias if it has none."""
    if delta is None:
        return
    if module.bias is None:
        out = weight_view(module).shape[0]
        module.bias = torch.nn.Parameter(torch.zeros(out, dtype=module.weight.dtype, device=module.weight.device))
    module.bias.data += delta.to(module.bias.dtype).to(module.bias.device)


def prune(model, tokenizer, config: PruneConfig | dict, calib_ids: torch.Tensor | None = None) -> dict:
    """Prune ``model`` in place and return the report (a JSON-able dict)."""
    cfg = config if isinstance(config, PruneConfig) else make_config(**config)
    t0 = time.time()
    fam = family_of(model)
    blocks = get_blocks(model)
    block_layers = block_linears(model, cfg.ignore)
    metric = get_metric(cfg.metric)
    nm = cfg.nm
    if nm is not None:
        for d in block_layers:
            for name, m in d.items():
                check_nm_shape(nm, weight_view(m).shape[1], name)
    seqlen = resolve_seqlen(model, cfg.seqlen)
    device = resolve_device(cfg.device)
    alloc_needs = get_allocator(cfg.allocation).needs
    needs_data = bool(metric.needs) or bool(alloc_needs & {"outliers", "scores", "engine"})
    if calib_ids is None and needs_data:
        calib_ids = calibration_windows(tokenizer, cfg.calib, cfg.nsamples, seqlen, cfg.seed)
    t_data = time.time()
    ratios, alloc_extra = layer_ratios(cfg, model, blocks, block_layers, calib_ids, device)
    t_alloc = time.time()
    pruner = _Pruner(metric, ratios, nm)
    if metric.needs:
        iterate_blocks(model, blocks, block_layers, calib_ids, metric.needs, pruner, device,
                       batch_size=cfg.batch_size, sequential=cfg.sequential)
    else:  # weight-only metric: no forward pass needed
        for d in block_layers:
            for name, m in d.items():
                pruner(name, m, None)
    t_prune = time.time()
    return build_report(cfg, model, fam.name, block_layers, pruner, seqlen, calib_ids, alloc_extra, {
        "data_s": round(t_data - t0, 2), "allocation_s": round(t_alloc - t_data, 2),
        "prune_s": round(t_prune - t_alloc, 2), "total_s": round(t_prune - t0, 2)}, device)


def build_report(cfg, model, family, block_layers, pruner, seqlen, calib_ids, alloc_extra, timing, device) -> dict:
    layers = []
    for b, d in enumerate(block_layers):
        for name in d:
            rec = pruner.records[name]
            layers.append({"name": name, "block": b, "shape": rec["shape"], "target": round(rec["target"], 6),
                           "sparsity": rec["pruned"] / rec["numel"], "numel": rec["numel"]})
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
                   "allocation_params": cfg.allocation_params, "granularity": cfg.granularity,
                   "sequential": cfg.sequential, "rowwise": cfg.rowwise},
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
    }, masks=pruner.masks)
