"""The inputs allocators declare, gathered: calibration passes over the dense model (OWL's outlier ratios,
score samples for a global threshold or DSA), the in-place engine of iterative allocators (MRP), and the
table that maps each kind of input to its gatherer (:data:`GATHERERS`, used by :func:`allocator_inputs`).
A new kind of allocator input is one gatherer here and one field of
:class:`prunekit.core.allocation.ModelSummary`."""
from __future__ import annotations

from typing import Callable

import torch

from ..core.allocation import LayerInfo, ModelSummary, get_allocator
from ..core.blocks import iterate_blocks
from ..core.errors import PrunekitError
from ..core.families import weight_view
from ..methods.owl import OUTLIER_MS
from ..methods.wanda import wanda
from .layer_pruner import LayerPruner
from .plan import stats_needs, stats_options


def outlier_ratios(scores: list[torch.Tensor], ms) -> dict[float, float]:
    """Per M, the share of ``scores`` (a block's, concatenated) above M x their mean."""
    a = torch.cat(scores)
    mean = a.mean()
    return {float(m): float((a > m * mean).double().mean()) for m in ms}


def add_wanda_scores(scores: list[torch.Tensor], module, stats) -> None:
    """Append the layer's Wanda scores to a block's ``scores``; an expert no calibration token reached has no
    activations, hence no outliers, and adds none."""
    if stats.count:
        scores.append(wanda(weight_view(module).float(), stats).flatten())


def outlier_profile(model, blocks, block_layers, calib_ids, device, batch_size, ms=OUTLIER_MS):
    """OWL statistics of the *dense* model: per block, the share of Wanda scores above M x block mean, for every M
    OWL may use (``methods.owl.OUTLIER_MS``: its grid for ``M=auto``)."""
    out = {float(m): [] for m in ms}
    current: list[torch.Tensor] = []

    def handle(name, module, stats):
        add_wanda_scores(current, module, stats)

    def done(b):
        for m, v in outlier_ratios(current, ms).items():
            out[m].append(v)
        current.clear()

    iterate_blocks(model, blocks, block_layers, calib_ids, frozenset({"sq_sum"}), handle, device,
                   batch_size=batch_size, sequential=True, desc="OWL profile", on_block_done=done)
    return out


def _score_sampler(metric, seed: int, keep: int):
    """handle(name, weight, stats) storing a sorted random subsample (at most ``keep``) of the layer's scores;
    returns (handle, out). Solvers have no score: Wanda's score stands in for them. A layer whose statistics saw no
    calibration token (an expert never routed to) is scored by magnitude, as the pruner then prunes it."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    score = metric.score or wanda

    def handle(name, W, stats):
        unseen = stats is not None and stats.count == 0
        sc = (W.float().abs() if unseen else score(W.float(), stats)).flatten().cpu()
        if sc.numel() > keep:
            sc = sc[torch.randperm(sc.numel(), generator=g)[:keep]]
        out[name] = sc.sort().values

    return handle, out


def score_needs(metric) -> frozenset:
    return metric.needs if metric.score else frozenset({"sq_sum"})


def score_profile(model, blocks, block_layers, calib_ids, metric, device, batch_size, seed=0, keep=65536):
    """Per layer, a sorted random subsample of the metric's scores on the dense model (for 'global' and
    DSA's layer scores). Solvers have no score: Wanda's score stands in for them."""
    handle, out = _score_sampler(metric, seed, keep)
    needs = score_needs(metric)
    if needs:
        iterate_blocks(model, blocks, block_layers, calib_ids, needs,
                       lambda name, module, stats: handle(name, weight_view(module), stats), device,
                       batch_size=batch_size, desc="score profile")
    else:
        for d in block_layers:
            for name, m in d.items():
                handle(name, weight_view(m), None)
    return out


def score_profile_from_stats(block_layers, stats: dict, metric, seed=0, keep=65536) -> dict[str, torch.Tensor]:
    """:func:`score_profile` from dense-model statistics already gathered (a search's cached fitness holds
    them for the same calibration windows): no calibration pass. ``stats`` must cover every layer with
    at least :func:`score_needs`; the dense weights must be in place."""
    missing = [n for d in block_layers for n in d if not stats_cover_scores(stats.get(n), metric)]
    if missing:
        raise PrunekitError(f"score profile: no {sorted(score_needs(metric))} statistics for {missing[0]}")
    handle, out = _score_sampler(metric, seed, keep)
    for d in block_layers:
        for name, m in d.items():
            handle(name, weight_view(m), stats.get(name))
    return out


def stats_cover_scores(st, metric) -> bool:
    """Whether one layer's statistics ``st`` (None: none gathered) are enough for the metric's score."""
    needs = score_needs(metric)
    return not needs or (st is not None and needs <= st.needs)


def engine_callable(cfg, model, blocks, block_layers, calib_ids, device, metric):
    """For iterative allocators (MRP): prune in place to given ratios (on at most 32 calibration
    windows), return per-block outlier ratios of the Wanda scores of the pruned blocks (zeros included)."""
    sub = calib_ids[: min(len(calib_ids), 32)]

    def prune_to(ratios: dict, M: float) -> list[float]:
        pruner = LayerPruner.from_config(cfg, metric, ratios)
        current: list[torch.Tensor] = []
        result: list[float] = []

        def handle(name, module, stats):
            pruner(name, module, stats)
            # zeros count: pruning lowers the block mean, more survivors become outliers, and the
            # block looks less redundant next time (the schedule corrects itself)
            add_wanda_scores(current, module, stats)

        def done(b):
            result.append(outlier_ratios(current, (M,))[float(M)])
            current.clear()

        iterate_blocks(model, blocks, block_layers, sub, stats_needs(metric, cfg) | {"sq_sum"}, handle, device,
                       batch_size=cfg.batch_size, sequential=cfg.sequential, desc="MRP step", on_block_done=done,
                       **stats_options(cfg))
        return result

    return prune_to


def model_summary(block_layers) -> ModelSummary:
    """The layers (name, block, shape) every allocator reads."""
    return ModelSummary([LayerInfo(name, b, tuple(weight_view(m).shape))
                         for b, d in enumerate(block_layers) for name, m in d.items()])


# gatherer(summary, cfg, model, blocks, block_layers, calib_ids, device, metric): fills one input of the summary
def _weights(summary, cfg, model, blocks, block_layers, calib_ids, device, metric):
    summary.weights = {name: weight_view(m) for d in block_layers for name, m in d.items()}


def _outliers(summary, cfg, model, blocks, block_layers, calib_ids, device, metric):
    summary.outliers = outlier_profile(model, blocks, block_layers, calib_ids, device, cfg.batch_size)


def _scores(summary, cfg, model, blocks, block_layers, calib_ids, device, metric):
    summary.scores = score_profile(model, blocks, block_layers, calib_ids, metric, device, cfg.batch_size, cfg.seed)


def _engine(summary, cfg, model, blocks, block_layers, calib_ids, device, metric):
    summary.prune_to = engine_callable(cfg, model, blocks, block_layers, calib_ids, device, metric)


GATHERERS: dict[str, Callable] = {"weights": _weights, "outliers": _outliers, "scores": _scores, "engine": _engine}


def allocator_inputs(cfg, model, blocks, block_layers, calib_ids, device, metric) -> ModelSummary:
    """The summary with exactly the inputs the configured allocator declares (in a fixed order)."""
    summary = model_summary(block_layers)
    needs = get_allocator(cfg.allocation).needs
    for need in GATHERERS:
        if need in needs:
            GATHERERS[need](summary, cfg, model, blocks, block_layers, calib_ids, device, metric)
    return summary
