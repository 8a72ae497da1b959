"""Mixture-of-experts methods: expert scores from the routing of calibration tokens, expert removal, and the
spread of a layer's sparsity over its experts.

Expert scores (``EXPERT_SCORES``; higher = more important), per MoE block, from one block-by-block pass over the
calibration windows (:func:`expert_profile`, the routing the model's own router gives on the current weights):

- ``reap``: REAP (Lasby et al., 2025, "REAP the Experts: Why Pruning Prevails for One-Shot MoE compression"),
  the mean over the tokens routed to expert e of g_e(x) * ||f_e(x)||_2: the routing weight (the router's
  top-k value as the experts module receives it, normalised where the family normalises) times the L2 norm of the
  expert's output. An expert that no calibration token reaches scores 0.
- ``frequency``: the number of calibration tokens routed to e.
- ``gate``: the sum of e's routing weights over all calibration tokens (frequency weighted by confidence).

Expert removal (:func:`remove_experts`, ``--remove-experts K``): in every MoE block the K experts of lowest score
(ties: the higher index goes) are dropped with their router rows; the config's expert count becomes E - K, so a
plain ``from_pretrained`` of the saved folder builds the smaller model (:func:`prunekit.core.families.drop_experts`).

Sparsity across experts (:func:`spread_over_experts`, ``expert_allocation``): by default each expert matrix
prunes at its layer's ratio. With a score, within each MoE block and projection (all experts' gate, up or down)
the ratios follow AlphaPruning's linear mapping of the scores (:func:`prunekit.core.allocation.linear_map_ratios`:
the highest-scoring expert at (1 - eps) x, the lowest at (1 + eps) x the layer's ratio, so rarely used experts prune
more), clipped to [0, max_ratio] with the projection's parameter-weighted mean kept exactly (``finalize``).
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
from pydantic import Field

from ..core.allocation import finalize, linear_map_ratios
from ..core.blocks import run_blocks
from ..core.errors import PrunekitError
from ..core.families import drop_experts, expert_groups, is_expert, weight_view
from ..core.registry import Params, Registry

log = logging.getLogger(__name__)

ExpertScore = Callable[[dict], torch.Tensor]
EXPERT_SCORES: Registry[ExpertScore] = Registry("expert score")


def register_expert_score(name: str):
    def deco(fn: ExpertScore) -> ExpertScore:
        return EXPERT_SCORES.add(name, fn)
    return deco


@register_expert_score("reap")
def reap(profile: dict) -> torch.Tensor:
    """Mean routing weight x expert output norm over the expert's routed tokens (0 without tokens)."""
    return profile["reap"] / profile["tokens"].clamp_min(1)


@register_expert_score("frequency")
def frequency(profile: dict) -> torch.Tensor:
    return profile["tokens"].double()


@register_expert_score("gate")
def gate(profile: dict) -> torch.Tensor:
    return profile["gate"].clone()


class ExpertAllocationParams(Params):
    eps: float = Field(0.2, ge=0.0, lt=1.0, description="experts' ratios span [1 - eps, 1 + eps] x the layer's "
                       "before clipping (best-scoring expert lowest)")


@torch.no_grad()
def expert_profile(model, input_ids: torch.Tensor, device="cpu", batch_size=None, outputs: bool = True) -> list:
    """Per block (None for a dense block), over the calibration windows: ``tokens`` routed to each expert (int64),
    the sum of their routing weights ``gate`` and (``outputs``) ``reap``, the sum of routing weight x L2 norm of
    the expert's output (float64), all of length E."""
    groups = expert_groups(model)
    prof = [None if g is None else {k: torch.zeros(g.num_experts, dtype=torch.int64 if k == "tokens" else torch.float64)
                                    for k in ("tokens", "gate", "reap")} for g in groups]

    def hooks(b, _block):
        g, p = groups[b], prof[b]
        if g is None:
            return []

        def observe(hidden, index, weights):
            for e, x, routed in g.split(hidden, index, weights):
                w = routed.weights.double().cpu()
                p["tokens"][e] += x.shape[0]
                p["gate"][e] += float(w.sum())
                if outputs:
                    p["reap"][e] += float((w * g.output(e, x).double().norm(dim=-1).cpu()).sum())
        return [g.observe(observe)]

    was = model.training
    model.eval()
    try:
        run_blocks(model, input_ids, None, device, batch_size, block_hooks=hooks, desc="expert profile")
    finally:
        model.train(was)
    return prof


def expert_scores(model, input_ids, score: str, device="cpu", batch_size=None) -> list[torch.Tensor | None]:
    """Per block, the named score of every expert (None for a dense block)."""
    fn = EXPERT_SCORES.get(score)
    return [None if p is None else fn(p) for p in expert_profile(model, input_ids, device, batch_size,
                                                                  outputs=score == "reap")]


def _require_experts(model, what: str) -> list:
    groups = expert_groups(model)
    if not any(g is not None for g in groups):
        raise PrunekitError(f"{what}: {model.config.model_type} has no fused experts prunekit knows")
    return groups


def remove_experts(model, input_ids: torch.Tensor, k: int, score: str = "reap", device="cpu",
                   batch_size=None) -> dict:
    """Drop the ``k`` lowest-scoring experts of every MoE block (see the module docstring). Returns what the report
    shows: the score, the experts left, per block the removed indices (original numbering) and every expert's
    score."""
    groups = _require_experts(model, "expert removal")
    n = next(g.num_experts for g in groups if g is not None)
    if not 0 < k < n:
        raise PrunekitError(f"remove_experts must be between 1 and {n - 1} (the model has {n} experts per layer)")
    scores = expert_scores(model, input_ids, score, device, batch_size)
    kept, removed = {}, {}
    for b, s in enumerate(scores):
        if s is None:
            continue
        order = sorted(range(len(s)), key=lambda e: (-float(s[e]), e))  # best first; ties keep the lower index
        kept[b] = sorted(order[: len(s) - k])
        removed[b] = sorted(order[len(s) - k:])
    drop_experts(model, kept)
    log.info("removed %d experts per MoE block by %s", k, score)
    return {"score": score, "removed_per_block": k, "experts_left": n - k,
            "removed": {str(b): v for b, v in removed.items()},
            "scores": {str(b): [float(f"{float(x):.6g}") for x in s] for b, s in enumerate(scores) if s is not None}}


def spread_over_experts(ratios: dict, block_layers, scores: list, eps: float, max_ratio: float = 0.99) -> dict:
    """Per MoE block and projection, the experts' ratios spread by ``scores`` (per block, one value per expert)
    around their parameter-weighted mean, which stays exactly what it was (see the module docstring). Returns the
    new ratios (a copy)."""
    out = dict(ratios)
    for b, layers in enumerate(block_layers):
        kinds: dict[str, list[tuple[int, str, int]]] = {}
        for name, m in layers.items():
            if is_expert(m):
                kinds.setdefault(m.proj, []).append((m.expert, name, weight_view(m).numel()))
        for members in kinds.values():
            if len(members) < 2 or scores[b] is None:
                continue
            numels = torch.tensor([n for _, _, n in members], dtype=torch.float64)
            r = torch.tensor([ratios[name] for _, name, _ in members], dtype=torch.float64)
            target = float((r * numels).sum() / numels.sum())
            values = -scores[b][[e for e, _, _ in members]].double()  # larger value -> more pruning
            spread = finalize(linear_map_ratios(values, numels, target, eps), numels, target, max_ratio)
            out.update({name: float(x) for (_, name, _), x in zip(members, spread)})
    return out


def expert_allocation(model, input_ids, block_layers, ratios: dict, score: str, eps: float, max_ratio: float,
                      device="cpu", batch_size=None) -> tuple[dict, dict]:
    """The ratios with each MoE projection's sparsity spread over its experts by ``score`` (a profile pass over the
    calibration windows on the current model), and what the report shows."""
    _require_experts(model, f"expert_allocation {score}")
    scores = expert_scores(model, input_ids, score, device, batch_size)
    new = spread_over_experts(ratios, block_layers, scores, eps, max_ratio)
    return new, {"score": score, "eps": eps,
                 "scores": {str(b): [float(f"{float(x):.6g}") for x in s] for b, s in enumerate(scores) if s is not None}}
