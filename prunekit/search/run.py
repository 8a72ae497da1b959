"""Running a search: the set-up every method shares, then the method (:mod:`prunekit.search.registry`).

The dense statistics are computed once (:class:`~prunekit.search.fitness.Fitness`), a candidate re-prunes only
the layers whose ratio changed, candidates are scored on short held-out windows, and the state is checkpointed
to ``out_dir`` after every evaluation (:mod:`prunekit.search.checkpoint`), so a run killed at any point resumes
without losing a finished candidate and ends with the same result as an uninterrupted one. The model is left
dense (and where it was) when the search returns.
"""
from __future__ import annotations

import logging
from pathlib import Path

from ..core.data import calibration_windows
from ..core.errors import PrunekitError
from ..core.families import model_context_length, resolve_seqlen
from ..core.metric import get_metric
from ..core.outputs import atomic_write_json, relation, resolved_path
from ..pruning.allocator_inputs import model_summary
from . import dsa, optishear, random_search, tpe  # noqa: F401  (each registers its search method)
from .fitness import Fitness, ids_digest
from .registry import SEARCHES, SearchSetup
from .tpe import check_kv_setup

log = logging.getLogger(__name__)

METHODS = tuple(SEARCHES)
HELDOUT_SEED_OFFSET = 7919  # held-out windows: same source as calibration, another seed


SEARCH_FILES = ("{method}_state.json", "{method}_result.json", "tpe.db", "optishear_state.pkl", "optishear_evals.json",
                "recipe.yaml", "recipe_extras.yaml")
MARKER = ".prunekit-search"


def check_search_params(method: str, params: dict) -> dict:
    """``--param`` values checked before any work (names, kinds, ranges: the method's parameter class); returns
    the given ones as validated values."""
    p = SEARCHES.get(method).params.check(params, "search --param", method)
    return {k: getattr(p, k) for k in params}


def prepare_search_dir(out, inputs=()) -> Path:
    """The search's checkpoint folder, checked before any work: not an input (or inside or around one), and
    either new, empty, or a folder a prunekit search made (it holds a ``.prunekit-search`` marker, or only
    search files): never a model or prune output folder, whose files a search would overwrite."""
    if out is None or not str(out).strip():
        raise PrunekitError("search --out is empty: give a folder for the checkpoints")
    p = Path(str(out)).expanduser()
    for inp in inputs:
        if inp is not None and Path(inp).expanduser().exists() and relation(resolved_path(p), resolved_path(inp)):
            raise PrunekitError(f"search --out {out} {relation(resolved_path(p), resolved_path(inp))} the input {inp}: "
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
    search = SEARCHES.get(method)
    if out_dir is not None:
        prepare_search_dir(out_dir)
    if not 0.0 < float(target) < 1.0:
        raise PrunekitError(f"target sparsity must be in (0, 1), got {target}")
    if not (isinstance(lam, (int, float)) and 0.0 <= lam < 1.0):
        raise PrunekitError(f"lam must be in [0, 1), got {lam!r}")
    params = search.params.check(method_params, "search --param", method)
    if method == "tpe":  # the KV-cache settings depend on the model only: check them before any statistics
        check_kv_setup(model, params.kv, params.kv_bits, params.kv_budget)
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
            hl = min(heldout_seqlen, model_context_length(model) or heldout_seqlen)
            heldout_ids = calibration_windows(tok, calib, n_heldout, hl, seed + HELDOUT_SEED_OFFSET)
        else:
            if len(calib_ids) < 2:
                raise PrunekitError("without a tokenizer, pass heldout_ids or at least 2 calibration windows")
            k = max(1, len(calib_ids) // 4)
            calib_ids, heldout_ids = calib_ids[:-k], calib_ids[-k:]
    fitness = Fitness(model, calib_ids, heldout_ids, metric, device, batch_size, mode=mode,
                      prune_kwargs=prune_kwargs, seed=seed,
                      extra_needs=search.extra_needs)
    fingerprint = {"metric": metric, "mode": mode, "calib": ids_digest(calib_ids), "heldout": ids_digest(heldout_ids),
                   "model": {"type": model.config.model_type, "params": int(sum(p.numel() for p in model.parameters()))},
                   "prune_kwargs": prune_kwargs or {}}
    try:
        setup = SearchSetup(model, fitness, model_summary(fitness.block_layers), float(target), lam, calib_ids,
                            batch_size, seed)
        res, recipe = search.run(setup, budget, out_dir, resume, progress, fingerprint,
                                 **{k: getattr(params, k) for k in params.model_fields_set})
    finally:
        fitness.close()
    recipe.update({"metric": metric, "seed": seed, **(prune_kwargs or {})})
    if seqlen_used is not None:  # the final prune must see the same calibration windows
        recipe.update({"calib": calib, "nsamples": nsamples, "seqlen": seqlen_used})
    res.update({
        "metric": metric,
        "metric_params": fitness.metric.values,  # the values used (defaults included)
        "recipe": recipe,
        "fitness": {"kind": "held-out token perplexity (calibration source, another seed)",
                    "windows": int(heldout_ids.shape[0]), "seqlen": int(heldout_ids.shape[1]), "mode": mode,
                    "fresh_evaluations": fitness.n_evaluations},
        "calibration": {"windows": int(calib_ids.shape[0]), "seqlen": int(calib_ids.shape[1]),
                        "source": calib if seqlen_used is not None else "given"},
    })
    if out_dir is not None:
        atomic_write_json(Path(out_dir) / f"{method}_result.json", res)
    return res
