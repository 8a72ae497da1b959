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


def _outlier_ratios(scores: list[torch.Tensor], ms) -> dict[float, float]:
    a = torch.cat(scores)
    mean = a.mean()
    return {float(m): float((a > m * mean).double().mean()) for m in ms}


def outlier_profile(model, blocks, block_layers, calib_ids, device, batch_size, ms=(3.0, 5.0, 7.0, 10.0)):
    """OWL statistics of the *dense* model: per block, the share of Wanda scores above M x block mean."""
    out = {float(m): [] for m in ms}
    current: list[torch.Tensor] = []

    def handle(name, module, stats):
        current.append(wanda(weight_view(module).float(), stats).flatten())

    def done(b):
        for m, v in _outlier_ratios(current, ms).items():
            out[m].append(v)
        current.clear()

    iterate_blocks(model, blocks, block_layers, calib_ids, frozenset({"sq_sum"}), handle, device,
                   batch_size=batch_size, sequential=True, desc="OWL profile", on_block_done=done)
    return out


def score_profile(model, blocks, block_layers, calib_ids, metric, device, batch_size, seed=0, keep=65536):
    """Per layer, a sorted random subsample of the metric's scores on the dense model (for 'global').
    Solvers have no score: Wanda's score stands in for them."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    score = metric.score or wanda

    def handle(name, module, stats):
        sc = score(weight_view(module).float(), stats).flatten().cpu()
        if sc.numel() > keep:
            sc = sc[torch.randperm(sc.numel(), generator=g)[:keep]]
        out[name] = sc.sort().values

    needs = metric.needs if metric.score else frozenset({"sq_sum"})
    if needs:
        iterate_blocks(model, blocks, block_layers, calib_ids, needs, handle, device, batch_size=batch_size,
                       desc="score profile")
    else:
        for d in block_layers:
            for name, m in d.items():
                handle(name, m, None)
    return out


def engine_callable(cfg, model, blocks, block_layers, calib_ids, device, metric, nm):
    """For iterative allocators (MRP): prune in place to given ratios (on at most 32 calibration
    windows), return per-block outlier ratios of the Wanda scores of the pruned blocks (zeros included)."""
    sub = calib_ids[: min(len(calib_ids), 32)]

    def prune_to(ratios: dict, M: float) -> list[float]:
        pruner = _Pruner.from_config(cfg, metric, ratios)
        current: list[torch.Tensor] = []
        result: list[float] = []

        def handle(name, module, stats):
            pruner(name, module, stats)
            # zeros count: pruning lowers the block mean, more survivors become outliers, and the
            # block looks less redundant next time (the schedule corrects itself)
            current.append(wanda(weight_view(module).float(), stats).flatten())

        def done(b):
            result.append(_outlier_ratios(current, (M,))[float(M)])
            current.clear()

        iterate_blocks(model, blocks, block_layers, sub, stats_needs(metric, cfg) | {"sq_sum"}, handle, device,
                       batch_size=cfg.batch_size, sequential=cfg.sequential, desc="MRP step", on_block_done=done)
        return result

    return prune_to


AUTO_GRIDS = {
    "owl": {"lam": [0.02, 0.05, 0.08, 0.12, 0.16, 0.2], "M": [3.0, 5.0, 7.0, 10.0]},
    "alphapruning": {"eps": [0.1, 0.2, 0.3, 0.4, 0.5]},
    "farms": {"eps": [0.1, 0.2, 0.3, 0.4, 0.5]},
}
AUTO_DEFAULTS = {"owl": {"lam": 0.08, "M": 5.0}, "alphapruning": {"eps": 0.3}, "farms": {"eps": 0.3}}


def _prune_all(pruner, metric, model, blocks, block_layers, ids, device, cfg, desc):
    needs = stats_needs(metric, cfg)
    if needs:
        iterate_blocks(model, blocks, block_layers, ids, needs, pruner, device,
                       batch_size=cfg.batch_size, sequential=cfg.sequential, desc=desc)
    else:  # weight-only metric: no forward pass needed
        for d in block_layers:
            for name, m in d.items():
                pruner(name, m, None)


def auto_params(cfg, model, tokenizer, summary, blocks, block_layers, calib_ids, device, metric, nm, params):
    """Resolve parameters given as 'auto' by a cheap proxy: for each candidate, prune with 16
    calibration windows and measure the mean NLL on 8 held-out windows (drawn from the calibration
    source with another seed); one parameter at a time (coordinate search), the dense weights restored
    after each trial."""
    auto = [k for k, v in params.items() if v == "auto"]
    if not auto:
        return params, None
    grids = AUTO_GRIDS.get(cfg.allocation, {})
    unknown = [k for k in auto if k not in grids]
    if unknown:
        raise PrunekitError(f"no 'auto' grid for {cfg.allocation} parameter(s) {unknown}; grids: {grids}")
    from .evaluate.perplexity import nll_of_windows

    if tokenizer is not None:
        held = calibration_windows(tokenizer, cfg.calib, 8, calib_ids.shape[1], cfg.seed + 1000)
    else:  # API use with pre-tokenised windows only: hold out the last ones
        held = calib_ids[-min(4, len(calib_ids)):]
    sub = calib_ids[: min(len(calib_ids), 16)]
    layers = {n: m for d in block_layers for n, m in d.items()}
    snapshot = {n: weight_view(m).detach().clone() for n, m in layers.items()}
    biases = {n: (None if m.bias is None else m.bias.detach().clone()) for n, m in layers.items()}
    resolved = {k: (AUTO_DEFAULTS[cfg.allocation][k] if v == "auto" else v) for k, v in params.items()}
    trials = []
    for key in auto:
        best = None
        for value in grids[key]:
            trial = dict(resolved, **{key: value})
            ratios = allocate(cfg.allocation, summary, cfg.target(), granularity=cfg.granularity,
                              max_ratio=cfg.max_ratio, **trial)
            _prune_all(_Pruner.from_config(cfg, metric, ratios), metric, model, blocks, block_layers, sub, device, cfg,
                       "auto trial")
            loss = float(nll_of_windows(model, held, device, batch_size=4, desc="auto proxy").mean())
            trials.append({"params": trial, "heldout_nll": loss})
            if best is None or loss < best[0]:
                best = (loss, value)
            with torch.no_grad():  # restore the dense layers
                for n, m in layers.items():
                    weight_view(m).copy_(snapshot[n])
                    if biases[n] is None:
                        m.bias = None
                    else:
                        m.bias.data.copy_(biases[n])
        resolved[key] = best[1]
    return resolved, {"proxy": "mean NLL on 8 held-out windows of the calibration source after pruning with "
                               "16 calibration windows", "trials": trials, "chosen": {k: resolved[k] for k in auto}}


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
    metric, nm = get_metric(cfg.metric), cfg.nm
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
    """The JSON-able report; ``.masks`` holds the bit-packed prune masks (name -> uint8 tensor)."""

    def __init__(self, data: dict, masks: dict | None = None):
        super().__init__(data)
        self.masks = masks or {}


def stats_needs(metric, cfg) -> frozenset[str]:
    """Every statistic the chosen metric, row-wise method and reconstruction read, gathered in one pass."""
    needs = set(metric.needs)
    if cfg.rowwise:
        from .rowwise import ROWWISE_NEEDS

        needs |= ROWWISE_NEEDS[cfg.rowwise]
    if cfg.reconstruct == "sparsegpt":
        needs.add("hessian")
    return frozenset(needs)


class _Pruner:
    """The per-layer handler the engine calls: score or solve, mask (row-wise allocation), weight
    reconstruction, bias update, zero, record."""

    def __init__(self, metric, ratios: dict, nm, rowwise: str | None = None, rowwise_params: dict | None = None,
                 reconstruct: str | None = None):
        self.metric, self.ratios, self.nm = metric, ratios, nm
        self.rowwise, self.rowwise_params, self.reconstruct = rowwise, rowwise_params or {}, reconstruct
        self.masks: dict[str, torch.Tensor] = {}
        self.records: dict[str, dict] = {}

    @classmethod
    def from_config(cls, cfg, metric, ratios):
        return cls(metric, ratios, cfg.nm, cfg.rowwise, cfg.rowwise_params, cfg.reconstruct)

    @torch.no_grad()
    def __call__(self, name, module, stats):
        W = weight_view(module)
        r = self.ratios[name]
        if r == 0 and self.nm is None:
            mask = torch.zeros(W.shape, dtype=torch.bool, device=W.device)
        else:
            Wf = W.float()  # may alias W (fp32 models): solvers work on their own copy
            Wn = None
            info = {}
            if self.metric.solver is not None:
                Wn, mask = self.metric.solver(Wf, stats, r, self.nm, None)
            else:
                scores = self.metric.score(Wf, stats)
                if self.rowwise:
                    from .rowwise import apply_rowwise

                    rows = apply_rowwise(self.rowwise, Wf, scores, stats, r, info=info, **self.rowwise_params)
                    mask = make_mask(scores, rows)
                else:
                    mask = make_mask(scores, r, self.nm, self.metric.group)
                if self.reconstruct == "sparsegpt":
                    from .metrics.sparsegpt import sparsegpt_solver

                    Wn, mask = sparsegpt_solver(Wf, stats, r, self.nm, mask)
            if self.metric.bias_update is not None:  # from the dense weights, before any zeroing
                add_bias(module, self.metric.bias_update(Wf, mask, stats))
            if Wn is not None:
                W.copy_(Wn.to(W.dtype))
            W[mask] = 0
        self.masks[name] = pack_mask(mask)
        self.records[name] = {"shape": list(W.shape), "target": r, "pruned": int(mask.sum()), "numel": mask.numel()}
        if self.rowwise and info:
            self.records[name]["rowwise"] = {k: info[k] for k in ("lr", "score", "score_uniform") if k in info}


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
    check_attention_layout(model)
    metric = get_metric(cfg.metric)
    nm = cfg.nm
    if nm is not None:
        for d in block_linears(model, cfg.ignore):
            for name, m in d.items():
                check_nm_shape(nm, weight_view(m).shape[1], name)
    seqlen = resolve_seqlen(model, cfg.seqlen)
    device = resolve_device(cfg.device)
    alloc_needs = get_allocator(cfg.allocation).needs
    extra_report = {}
    if calib_ids is None and (cfg.calib_select or cfg.remove_blocks):
        if tokenizer is None:
            raise PrunekitError("calibration selection and block removal need a tokenizer or calib_ids")
        calib_ids, extra_report = select_and_remove(cfg, model, tokenizer, seqlen, device)
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
    pruner = _Pruner.from_config(cfg, metric, ratios)
    if nm is None and all(r == 0 for r in ratios.values()):  # nothing to prune (e.g. block removal only)
        for d in block_layers:
            for name, m in d.items():
                pruner(name, m, None)
    else:
        _prune_all(pruner, metric, model, blocks, block_layers, calib_ids, device, cfg, "pruning")
    t_prune = time.time()
    alloc_extra.update(extra_report)
    return build_report(cfg, model, fam.name, block_layers, pruner, seqlen, calib_ids, alloc_extra, {
        "data_s": round(t_data - t0, 2), "allocation_s": round(t_alloc - t_data, 2),
        "prune_s": round(t_prune - t_alloc, 2), "total_s": round(t_prune - t0, 2)}, device)


def check_attention_layout(model) -> None:
    """Block 0's captured arguments (its attention mask) are reused for every block: refuse models whose
    blocks use different attention layouts (sliding-window and full layers mixed) instead of pruning them
    with a wrong mask."""
    types = getattr(model.config, "layer_types", None)
    if types and len(set(types)) > 1:
        raise PrunekitError(f"{model.config.model_type}: blocks mix attention types {sorted(set(types))}; "
                            "block-by-block calibration with per-block masks is not supported yet")


def remove_blocks_step(cfg, model, calib_ids, device) -> dict:
    from .layer_removal import prune_and_comp, remove_one_shot

    if calib_ids is None:
        raise PrunekitError("block removal needs calibration data")
    fn = prune_and_comp if cfg.removal == "prune-comp" else remove_one_shot
    return fn(model, calib_ids, cfg.remove_blocks, score=cfg.removal_score, device=device, batch_size=cfg.batch_size)


def select_and_remove(cfg, model, tokenizer, seqlen, device):
    """Calibration windows (optionally chosen by prototype scores from a larger pool), then block removal."""
    info = {}
    if cfg.calib_select:
        from .data.select import parse_select, select_windows

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
                   "sequential": cfg.sequential, "rowwise": cfg.rowwise,
                   "reconstruct": cfg.reconstruct},
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
