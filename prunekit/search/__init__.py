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

import inspect
import logging
import math
from pathlib import Path

from ..errors import PrunekitError

from .program import InvalidProgram, Program, as_program, crossover, mutate, random_program  # noqa: F401

log = logging.getLogger(__name__)

METHODS = ("dsa", "random", "tpe", "optishear")
HELDOUT_SEED_OFFSET = 7919  # held-out windows: same source as calibration, another seed


SEARCH_FILES = ("{method}_state.json", "{method}_result.json", "tpe.db", "optishear_state.pkl", "optishear_evals.json",
                "recipe.yaml", "recipe_extras.yaml")
MARKER = ".prunekit-search"
_NOT_PARAMS = {"space", "fitness", "summary", "target", "budget", "out_dir", "seed", "resume", "progress",
               "fingerprint", "self"}


def _method_fn(method: str):
    from .dsa import ProgramSearch
    from .optishear import search_optishear
    from .random_search import search_random
    from .tpe import search_tpe

    return {"dsa": ProgramSearch.__init__, "random": search_random, "tpe": search_tpe,
            "optishear": search_optishear}[method]


def method_defaults(method: str) -> dict:
    """The parameters a search method takes (``--param KEY=VALUE``) with their defaults."""
    if method not in METHODS:
        raise PrunekitError(f"unknown search method {method!r}; valid: {', '.join(METHODS)}")
    sig = inspect.signature(_method_fn(method))
    return {p.name: p.default for p in sig.parameters.values()
            if p.name not in _NOT_PARAMS and p.default is not inspect.Parameter.empty}


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _kind_ok(name: str, default, v) -> bool:
    if name == "kv_budget":
        return v in ("auto", None) or _finite(v)
    if isinstance(default, bool):
        return isinstance(v, bool)
    if isinstance(default, int):
        return _finite(v) and float(v).is_integer()
    if isinstance(default, float):
        return _finite(v)
    if isinstance(default, str):
        return isinstance(v, str)
    if default is None:
        return v is None or _finite(v)
    return isinstance(v, (list, tuple))


def check_search_params(method: str, params: dict) -> dict:
    """``--param`` values checked before any work: known names, each of its default's kind (numbers finite,
    integers whole); returns them with integers as ``int``."""
    defaults = method_defaults(method)
    out = {}
    for k, v in params.items():
        if k not in defaults:
            raise PrunekitError(f"search method {method} has no parameter {k!r}; valid: {', '.join(sorted(defaults))}")
        d = defaults[k]
        if not _kind_ok(k, d, v):
            raise PrunekitError(f"search parameter {k}={v!r} is not of the expected kind (default {d!r})")
        out[k] = int(v) if isinstance(d, int) and not isinstance(d, bool) and k != "kv_budget" else v
    return out


def prepare_search_dir(out, inputs=()) -> Path:
    """The search's checkpoint folder, checked before any work: not an input (or inside or around one), and
    either new, empty, or a folder a prunekit search made (it holds a ``.prunekit-search`` marker, or only
    search files): never a model or prune output folder, whose files a search would overwrite."""
    from ..outputs import _relation, _resolve

    if out is None or not str(out).strip():
        raise PrunekitError("search --out is empty: give a folder for the checkpoints")
    p = Path(str(out)).expanduser()
    for inp in inputs:
        if inp is not None and Path(inp).expanduser().exists() and _relation(_resolve(p), _resolve(inp)):
            raise PrunekitError(f"search --out {out} {_relation(_resolve(p), _resolve(inp))} the input {inp}: "
                                "choose another folder")
    if p.exists() and not p.is_dir():
        raise PrunekitError(f"search --out {out} exists and is not a folder")
    if p.is_dir() and not (p / MARKER).exists():
        known = {f.format(method=m) for f in SEARCH_FILES for m in METHODS}
        foreign = [f.name for f in p.iterdir() if f.name not in known and not f.name.startswith(".")]
        if foreign:
            raise PrunekitError(f"search --out {out} is not a search folder (it holds {foreign[0]!r}, not made by a "
                                "search); choose a new or empty folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
        (p / MARKER).touch()
    except OSError as e:
        raise PrunekitError(f"cannot write search folder {out} ({e.strerror})") from None
    return p


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
    from ..metrics import get_metric
    from ..models.families import model_context_length
    from ..profiles import score_profile, score_profile_from_stats, stats_cover_scores
    from ..pruning.run import model_summary, resolve_seqlen
    from .dsa import ProgramSpace, atomic_write_json
    from .fitness import Fitness, ids_digest

    if method not in METHODS:
        raise PrunekitError(f"unknown search method {method!r}; valid: {', '.join(METHODS)}")
    if out_dir is not None:
        prepare_search_dir(out_dir)
    if not 0.0 < float(target) < 1.0:
        raise PrunekitError(f"target sparsity must be in (0, 1), got {target}")
    if not (isinstance(lam, (int, float)) and 0.0 <= lam < 1.0):
        raise PrunekitError(f"lam must be in [0, 1), got {lam!r}")
    method_params = check_search_params(method, method_params)
    if method == "tpe":  # the KV-cache settings depend on the model only: check them before any statistics
        from .tpe import check_kv_setup

        check_kv_setup(model, method_params.get("kv", True), method_params.get("kv_bits", (2, 8)),
                       method_params.get("kv_budget", "auto"))
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
