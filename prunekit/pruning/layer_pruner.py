"""The per-layer handler the engine calls: score or solve, choose the mask, refine it, reconstruct, zero, record.

A layer whose statistics saw no calibration token (an expert the router never chose on the calibration windows)
is pruned by magnitude, per matrix, at its ratio (no reconstruction, row-wise allocation or bias update: there is
no data to fit them on); its record says so. Expert records carry the expert's routed tokens and mean routing
weight."""
from __future__ import annotations

import torch

from ..core.blocks import iterate_blocks
from ..core.errors import PrunekitError
from ..core.families import is_expert, name_matches, weight_view
from ..core.masks import make_mask, pack_mask, row_counts
from ..core.metric import configured_metric
from ..core.refine import apply_refine
from ..core.rowwise import apply_rowwise
from .plan import stats_needs, stats_options


class LayerPruner:
    """The per-layer handler the engine calls: score or solve, mask (row-wise allocation), mask refinement, weight
    reconstruction, bias update, zero, record.

    Refinement (``refine``) comes after the mask and before the weights are rewritten: with a score metric the
    ``reconstruct`` solver (if any) then solves on the refined mask; with a solver metric (SparseGPT, ADMM, ALPS)
    the refiner starts from the solver's mask, judged on the dense weights, and the same solver is run again on
    the refined mask as a fixed-mask update (its first weights were made for the mask before refinement)."""

    def __init__(self, metric, ratios: dict, nm, rowwise: str | None = None, rowwise_params: dict | None = None,
                 reconstruct: str | None = None, rowwise_skip=(), reconstruct_params: dict | None = None,
                 row_rounding: str = "exact", refine: str | None = None, refine_params: dict | None = None):
        self.metric, self.ratios, self.nm = metric, ratios, nm
        # per-row masks: "exact" hits each layer's ratio to one weight (masks.row_counts), "floor" floors every row
        self.exact = row_rounding == "exact"
        self.rowwise, self.rowwise_params = rowwise, rowwise_params or {}
        # a solver metric (SparseGPT) that rewrites the weights on this metric's mask, its parameters bound in
        self.reconstructor = (configured_metric(reconstruct, reconstruct_params, "reconstruct_params")
                              if reconstruct else None)
        self.rowwise_skip = list(rowwise_skip)  # fnmatch patterns: these layers get the metric's plain mask
        self.refine, self.refine_params = refine, refine_params or {}
        self.masks: dict[str, torch.Tensor] = {}
        self.records: dict[str, dict] = {}
        self.fallback = configured_metric("magnitude", {})  # for layers no calibration token reached

    @classmethod
    def from_config(cls, cfg, metric, ratios):
        return cls(metric, ratios, cfg.nm, cfg.rowwise, cfg.rowwise_params, cfg.reconstruct, cfg.rowwise_skip,
                   cfg.reconstruct_params, cfg.row_rounding, cfg.refine, cfg.refine_params)

    @torch.no_grad()
    def __call__(self, name, module, stats):
        W = weight_view(module)
        r = self.ratios[name]
        unseen = stats is not None and stats.count == 0
        info, refined = {}, {}
        if r == 0 and self.nm is None:
            mask = torch.zeros(W.shape, dtype=torch.bool, device=W.device)
        elif unseen:
            mask = make_mask(self.fallback.score(W.float(), None), r, self.nm, self.fallback.group, self.exact)
            W.masked_fill_(mask, 0)
        else:
            Wf = W.float()  # may alias W (fp32 models): solvers work on their own copy
            Wn = None
            if self.metric.solver is not None:
                Wn, mask = self.metric.solver(Wf, stats, r, self.nm, None, name=name)
                if self.refine:
                    new = apply_refine(self.refine, Wf, mask, stats, self.nm, info=refined, layer=name,
                                       **self.refine_params)
                    if new is not mask:  # (the same object: a layer the refiner skips)
                        Wn, mask = self.metric.solver(Wf, stats, r, self.nm, new, name=name)
            else:
                scores = self.metric.score(Wf, stats)
                if self.rowwise and not name_matches(name, self.rowwise_skip):
                    # TRIM starts from (and never scores below) the plain mask's per-row counts
                    uniform = row_counts(scores, r) if self.exact else None
                    rows = apply_rowwise(self.rowwise, Wf, scores, stats, r, info=info, uniform_counts=uniform,
                                         **self.rowwise_params)
                    mask = make_mask(scores, rows)
                else:
                    mask = make_mask(scores, r, self.nm, self.metric.group, self.exact)
                if self.refine:
                    mask = apply_refine(self.refine, Wf, mask, stats, self.nm, info=refined, layer=name,
                                        **self.refine_params)
                if self.reconstructor is not None:
                    Wn, mask = self.reconstructor.solver(Wf, stats, r, self.nm, mask, name=name)
            if self.metric.bias_update is not None:  # from the dense weights, before any zeroing
                add_bias(module, self.metric.bias_update(Wf, mask, stats))
            if Wn is not None:
                W.copy_(Wn.to(W.dtype))
            W.masked_fill_(mask, 0)
        self.masks[name] = pack_mask(mask)
        self.records[name] = {"shape": list(W.shape), "target": r, "pruned": int(mask.sum()), "numel": mask.numel()}
        if self.rowwise and info:
            self.records[name]["rowwise"] = {k: info[k] for k in ("lr", "score", "score_uniform") if k in info}
        if unseen and (r > 0 or self.nm is not None):
            self.records[name]["fallback"] = "magnitude"
        if is_expert(module) and stats is not None:
            self.records[name]["tokens"] = stats.count
            self.records[name]["routing_weight"] = stats.gate_sum / stats.count if stats.count else 0.0
        if self.refine and refined:
            self.records[name]["refine"] = refined


def add_bias(module, delta: torch.Tensor | None) -> None:
    """Add a per-output correction to the layer's bias, creating a zero bias if it has none."""
    if delta is None:
        return
    if module.bias is None and is_expert(module):  # declare_biases refuses this before any work
        raise PrunekitError(f"{module!r} has no bias to correct")
    if module.bias is None:
        out = weight_view(module).shape[0]
        module.bias = torch.nn.Parameter(torch.zeros(out, dtype=module.weight.dtype, device=module.weight.device))
    module.bias.data += delta.to(module.bias.dtype).to(module.bias.device)


def prune_all(pruner, metric, model, blocks, block_layers, ids, device, cfg, desc):
    needs = stats_needs(metric, cfg)
    if needs:
        iterate_blocks(model, blocks, block_layers, ids, needs, pruner, device,
                       batch_size=cfg.batch_size, sequential=cfg.sequential, desc=desc, **stats_options(cfg))
    else:  # weight-only metric: no forward pass needed
        for d in block_layers:
            for name, m in d.items():
                pruner(name, m, None)
