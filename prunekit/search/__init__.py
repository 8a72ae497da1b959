"""Searched allocations: DSA (evolved allocation programs), a random-search baseline, TPE (Optuna) over
group sparsities and KV-cache bit-widths, OptiShear (NSGA-II over a meta metric and ratios).

    from prunekit.search import run_search
    res = run_search(model, tok, "dsa", budget=100, target=0.7, out_dir="runs/dsa")
    res["best"]["readable"]          # e.g. 'abslog -> var -> atan, asin'
    res["recipe"]                    # config keys that reproduce the allocation without searching:
    prunekit.prune(model, tok, res["recipe"])   # allocation: dsa, allocation_params: {program, lam}

Cost model (every method): the dense statistics are computed once (:class:`~prunekit.search.fitness.Fitness`),
a candidate re-prunes only the layers whose ratio changed, candidates are scored on short held-out
windows, and the search state is checkpointed to ``out_dir`` after every evaluation so that a run
killed at any point resumes without losing a finished candidate (and ends with the same result as an
uninterrupted run). The model is left dense (and on its original device) when the search returns.
"""
from __future__ import annotations

import logging
from pathlib import Path

from .program import InvalidProgram, Program, as_program, crossover, mutate, random_program  # noqa: F401

log = logging.getLogger(__name__)

METHODS = ("dsa", "random", "tpe", "optishear")
HELDOUT_SEED_OFFSET = 7919  # held-out windows: same source as calibration, another seed


def run_search(model, tok, method: str, budget: int, target: float, metric: str = "wanda", calib_ids=None,
               heldout_ids=None, out_dir=None, seed: int = 0, resume: bool = True, *, calib: str = "c4",
               nsamples: int = 128, seqlen: int | None = None, n_heldout: int = 16, heldout_seqlen: int = 256,
               device: str = "auto", batch_size: int | None = None, lam: float = 0.08, mode: str = "cached",
               progress: bool = True, prune_kwargs: dict | None = None, metric_params: dict | None = None,
               **method_params) -> dict:
    """Search an allocation for ``model`` at sparsity ``target`` with ``budget`` fitness evaluations.

    ``method``: ``dsa`` | ``random`` | ``tpe`` | ``optishear``. Calibration windows: ``calib_ids`` or
    ``nsamples`` x ``seqlen`` from ``calib`` with ``seed`` (as ``prunekit.prune`` draws them); held-out
    windows: ``heldout_ids`` or ``n_heldout`` x ``heldout_seqlen`` from the same source with seed
    ``seed + 7919`` (without a tokenizer: the last quarter of ``calib_ids``, removed from calibration).
    ``mode``: ``cached`` (dense statistics once, only changed layers re-pruned) or ``full``.
    ``metric_params``: the metric's parameters (as ``prunekit.prune``'s ``metric_params``, e.g. RIA
    ``alpha``); the candidates, the score profile and the final recipe all use them.
    ``prune_kwargs``: further prune config keys the candidates are pruned with (``ignore``, ``rowwise`` ...).
    ``method_params``: DSA/random: ``population``, ``elite``, ``tournament``, ``p_crossover``,
    ``p_mutation``, ``seed_programs``; TPE: ``n_groups``, ``delta``, ``step``, ``kv``, ``kv_bits``,
    ``kv_budget``, ``n_startup_trials``; OptiShear: ``population``, ``delta``, ``algorithm``, ``n_fitness_windows``.
    Returns a JSON-able dict (also written to ``out_dir/<method>_result.json``).
    """
    from ..data import calibration_windows
    from ..errors import PrunekitError
    from ..metrics import get_metric
    from ..models.families import model_context_length
    from ..profiles import score_profile, score_profile_from_stats, stats_cover_scores
    from ..prune import model_summary, resolve_seqlen
    from .dsa import ProgramSpace, atomic_write_json
    from .fitness import Fitness, ids_digest

    if method not in METHODS:
        raise PrunekitError(f"unknown search method {method!r}; valid: {', '.join(METHODS)}")
    if not 0.0 < float(target) < 1.0:
        raise PrunekitError(f"target sparsity must be in (0, 1), got {target}")
    get_metric(metric)
    if metric_params:
        given = (prune_kwargs or {}).get("metric_params")
        if given is not None and dict(given) != dict(metric_params):
            raise PrunekitError("metric_params given twice (argument and prune_kwargs) with different values")
        prune_kwargs = {**(prune_kwargs or {}), "metric_params": dict(metric_params)}
    seqlen_used = None
    if calib_ids is None:
        if tok is None:
            raise PrunekitError("run_search needs a tokenizer or calib_ids")
        seqlen_used = resolve_seqlen(model, seqlen)
        calib_ids = calibration_windows(tok, calib, nsamples, seqlen_used, seed)
    if heldout_ids is None:
        if tok is not None:
            ctx = model_context_length(model)
            hl = min(heldout_seqlen, ctx) if ctx else heldout_seqlen
            heldout_ids = calibration_windows(tok, calib, n_heldout, hl, seed + HELDOUT_SEED_OFFSET)
        else:
            if len(calib_ids) < 2:
                raise PrunekitError("without a tokenizer, pass heldout_ids or at least 2 calibration windows")
            k = max(1, len(calib_ids) // 4)
            calib_ids, heldout_ids = calib_ids[:-k], calib_ids[-k:]
    fitness = Fitness(model, calib_ids, heldout_ids, metric, device, batch_size, mode=mode,
                      prune_kwargs=prune_kwargs, seed=seed,
                      extra_needs=("sq_sum", "sum") if method == "optishear" else ())
    fingerprint = {"metric": metric, "mode": mode, "calib": ids_digest(calib_ids), "heldout": ids_digest(heldout_ids),
                   "model": {"type": model.config.model_type, "params": int(sum(p.numel() for p in model.parameters()))},
                   "prune_kwargs": prune_kwargs or {}}
    try:
        summary = model_summary(model, fitness.block_layers, frozenset({"scores"}))
        if method in ("dsa", "random"):
            if fitness.stats and all(stats_cover_scores(fitness.stats.get(n), fitness.metric) for n in fitness.layers):
                # the cached fitness already holds the dense statistics of these windows: no second pass
                summary.scores = score_profile_from_stats(fitness.block_layers, fitness.stats, fitness.metric, seed)
            else:
                summary.scores = score_profile(model, fitness.blocks, fitness.block_layers, calib_ids, fitness.metric,
                                               fitness.device, batch_size, seed)
            space = ProgramSpace(summary, target, lam)
            if method == "dsa":
                from .dsa import search_dsa

                res = search_dsa(space, fitness, budget, out_dir, seed, resume, fingerprint=fingerprint,
                                 progress=progress, **method_params)
            else:
                from .random_search import search_random

                res = search_random(space, fitness, budget, out_dir, seed, resume, fingerprint=fingerprint,
                                    progress=progress, **method_params)
            recipe = {"allocation": "dsa", "allocation_params": {"program": res["best"]["program"], "lam": lam},
                      "sparsity": float(target)}
            if res["best"]["program"]:
                log.info("best DSA program: %s   (%s)  held-out PPL %.4g", res["best"]["readable"],
                         res["best"]["program"], res["best"]["fitness"])
        elif method == "tpe":
            from .tpe import search_tpe

            res = search_tpe(fitness, summary, target, budget, out_dir, seed, resume, progress=progress,
                             fingerprint=fingerprint, **method_params)
            recipe = {"allocation": "uniform",
                      "sparsity": res["best"]["block_ratios"] if res["best"] else float(target)}
            if res["best"] and res["best"].get("kv_bits"):
                recipe["kv_cache_bits"] = res["best"]["kv_bits"]  # not a prune config key: applied at inference
        else:
            from .optishear import search_optishear

            res = search_optishear(fitness, summary, target, budget, out_dir, seed, resume, progress=progress,
                                   fingerprint=fingerprint, **method_params)
            recipe = res.pop("recipe")
    finally:
        fitness.close()
    recipe.update({"metric": metric, "seed": seed, **(prune_kwargs or {})})
    if seqlen_used is not None:  # the final prune must see the same calibration windows
        recipe.update({"calib": calib, "nsamples": nsamples, "seqlen": seqlen_used})
    res.update({
        "metric": metric,
        "metric_params": dict(fitness.metric.params),  # the values used (defaults included)
        "recipe": recipe,
        "fitness": {"kind": "held-out token perplexity (calibration source, another seed)",
                    "windows": int(heldout_ids.shape[0]), "seqlen": int(heldout_ids.shape[1]), "mode": mode,
                    "fresh_evaluations": fitness.n_evaluations},
        "calibration": {"windows": int(calib_ids.shape[0]), "seqlen": int(calib_ids.shape[1]),
                        "source": calib if seqlen_used is not None else "given"},
    })
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(out_dir) / f"{method}_result.json", res)
    return res
