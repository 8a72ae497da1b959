"""Calibration passes over the dense model that allocators need (OWL outlier ratios, score samples for a
global threshold), the in-place engine for iterative allocators (MRP), and 'auto' parameter search."""
from __future__ import annotations

import torch

from .allocate import allocate
from .calibrate import iterate_blocks
from .data import calibration_windows
from .errors import PrunekitError
from .metrics import wanda
from .models.families import weight_view
from .pruner import LayerPruner, prune_all, stats_needs, stats_options


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


def _score_sampler(metric, seed: int, keep: int):
    """handle(name, weight, stats) storing a sorted random subsample (at most ``keep``) of the layer's scores;
    returns (handle, out). Solvers have no score: Wanda's score stands in for them."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    score = metric.score or wanda

    def handle(name, W, stats):
        sc = score(W.float(), stats).flatten().cpu()
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


def engine_callable(cfg, model, blocks, block_layers, calib_ids, device, metric, nm):
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
            current.append(wanda(weight_view(module).float(), stats).flatten())

        def done(b):
            result.append(_outlier_ratios(current, (M,))[float(M)])
            current.clear()

        iterate_blocks(model, blocks, block_layers, sub, stats_needs(metric, cfg) | {"sq_sum"}, handle, device,
                       batch_size=cfg.batch_size, sequential=cfg.sequential, desc="MRP step", on_block_done=done,
                       **stats_options(cfg))
        return result

    return prune_to


AUTO_GRIDS = {
    "owl": {"lam": [0.02, 0.05, 0.08, 0.12, 0.16, 0.2], "M": [3.0, 5.0, 7.0, 10.0]},
    "alphapruning": {"eps": [0.1, 0.2, 0.3, 0.4, 0.5]},
    "farms": {"eps": [0.1, 0.2, 0.3, 0.4, 0.5]},
}


AUTO_DEFAULTS = {"owl": {"lam": 0.08, "M": 5.0}, "alphapruning": {"eps": 0.3}, "farms": {"eps": 0.3}}


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
            prune_all(LayerPruner.from_config(cfg, metric, ratios), metric, model, blocks, block_layers, sub, device, cfg,
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
