"""TPE search (Optuna) of per-group sparsity and per-layer KV-cache bit-widths.

Search space (the paper's defaults): the blocks are split into ``n_groups`` (8) contiguous groups; group
g's sparsity is in ``[S - delta, S + delta]`` on a grid of ``step`` (0.05, 0.025). The per-layer ratios
are then rescaled by :func:`prunekit.allocate.finalize` so that *every* trial is exactly at the target
S (our choice: the paper instead discards trials under the target, which wastes trials and lets the
result overshoot S). With ``kv=True`` every block's attention gets a KV-cache bit-width in
``kv_bits`` (2..8).

KV-cache fake quantisation and its memory: :mod:`prunekit.search.kvquant`. Memory: a quantised element costs ``b`` bits plus, per group of ``head_dim`` values, an fp16 scale and
an fp16 minimum (``32 / head_dim`` bits per element); the fp16 cache costs 16 bits. The memory budget
``kv_budget`` is the allowed fraction of the fp16 KV-cache memory (default ``auto``: what a uniform 4-bit cache
takes, :func:`check_kv_setup`; or a number such as 0.3); trials above it are
infeasible: they are not evaluated (value inf) and Optuna's ``constraints_func`` tells TPE so.
The objective is the held-out perplexity of the pruned model with the fake-quantised cache.

Checkpoint/resume: the study lives in ``sqlite:///<out_dir>/tpe.db`` (Optuna's RDB storage), every
finished trial is committed. On resume, trials left RUNNING by a ``kill -9`` are marked FAIL and
redone. The sampler is re-created before each trial with the seed ``seed * 100003 + (number of
completed trials)``, so a trial's parameters depend only on the seed and the completed trials: a
resumed search continues exactly like an uninterrupted one. ``budget`` counts evaluated (feasible)
trials; infeasible ones are free (at most ``20 * budget`` trials in all).
"""
from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Literal, Union

import torch
from pydantic import Field
from tqdm.auto import tqdm

from ..core.allocation import finalize
from ..core.errors import PrunekitError
from ..core.families import attention_dims, get_blocks, kv_modules
from ..core.registry import Int, Params
from . import checkpoint
from .kvquant import kv_cache_bytes_per_token, kv_memory_fraction
from .registry import register_search

STUDY = "prunekit-tpe"


# ----------------------------------------------------------------------------- search
KV_AUTO_BITS = 4


def check_kv_setup(model, kv: bool, kv_bits, kv_budget) -> float | None:
    """Validate TPE's KV-cache settings on ``model`` before any work; returns the budget as a number.

    ``kv_budget="auto"`` (default) is the memory of a uniform 4-bit cache (scales and minima included:
    ``(4 + 32 / head_dim) / 16`` of fp16, 0.28 at head_dim 64), so every model has feasible allocations
    whatever its head size; a fixed fraction such as 0.3 has none on a model with head_dim 8 (2 bits already
    cost 0.375 there)."""
    if not kv:
        return None if kv_budget == "auto" else kv_budget
    try:
        kmin, kmax = (int(b) for b in kv_bits)
    except (TypeError, ValueError):
        raise PrunekitError(f"kv_bits must be two integers [min, max], got {kv_bits!r}") from None
    if not 1 <= kmin <= kmax <= 16:
        raise PrunekitError(f"kv_bits must be 1 <= min <= max <= 16, got {kv_bits}")
    kv_modules(model)  # unsupported attention fails here
    nb = len(get_blocks(model))
    smallest = kv_memory_fraction(model, [kmin] * nb)
    if kv_budget == "auto":
        kv_budget = max(smallest, kv_memory_fraction(model, [min(max(KV_AUTO_BITS, kmin), kmax)] * nb))
    if kv_budget is not None and not (isinstance(kv_budget, (int, float)) and not isinstance(kv_budget, bool) and smallest <= kv_budget):
        raise PrunekitError(f"kv_budget {kv_budget!r} is below the smallest KV cache of this model ({kmin} bits: "
                            f"{smallest:.3f} of fp16 at head_dim {attention_dims(model)[0]}); use kv_budget=auto, a "
                            f"number >= {smallest:.3f}, or kv=false")
    return None if kv_budget is None else float(kv_budget)


def contiguous_groups(n_blocks: int, n_groups: int) -> list[list[int]]:
    n_groups = max(1, min(n_groups, n_blocks))
    base, extra = divmod(n_blocks, n_groups)
    out, s = [], 0
    for g in range(n_groups):
        k = base + (1 if g < extra else 0)
        out.append(list(range(s, s + k)))
        s += k
    return out


def _grid(target: float, delta: float, step: float, max_ratio: float) -> tuple[float, float]:
    lo = max(0.0, target - delta)
    hi = min(max_ratio, target + delta)
    n = int(math.floor((hi - lo) / step + 1e-9))
    return round(lo, 10), round(lo + n * step, 10)


class TPEParams(Params):
    n_groups: Int = Field(8, ge=1, description="contiguous groups of blocks, one sparsity each")
    delta: float = Field(0.05, ge=0, description="group sparsity in [S - delta, S + delta]")
    step: float = Field(0.025, gt=0, description="grid of the group sparsities")
    kv: bool = True
    kv_bits: list[Int] = [2, 8]
    kv_budget: Union[float, Literal["auto"], None] = "auto"
    n_startup_trials: Int = Field(10, ge=0)
    max_ratio: float = Field(0.99, gt=0, lt=1)


def search_tpe(fitness, summary, target: float, budget: int, out_dir=None, seed: int = 0, resume: bool = True,
               n_groups: int = 8, delta: float = 0.05, step: float = 0.025, kv: bool = True,
               kv_bits=(2, 8), kv_budget: float | str | None = "auto", n_startup_trials: int = 10,
               max_ratio: float = 0.99, progress: bool = True, fingerprint: dict | None = None) -> dict:
    try:
        import optuna
    except ImportError:
        raise PrunekitError("TPE search needs optuna: pip install 'prunekit[search]' (or pip install optuna)") from None
    if budget < 1:
        raise PrunekitError("search budget must be >= 1 evaluation")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from optuna.trial import TrialState

    model = fitness.model
    nb = summary.n_blocks
    groups = contiguous_groups(nb, n_groups)
    group_of = {b: g for g, bl in enumerate(groups) for b in bl}
    lo, hi = _grid(target, delta, step, max_ratio)
    kmin, kmax = int(kv_bits[0]), int(kv_bits[1])
    kv_budget = check_kv_setup(model, kv, kv_bits, kv_budget)
    numels = summary.numels()
    params = {"n_groups": len(groups), "delta": delta, "step": step, "kv": kv, "kv_bits": [kmin, kmax],
              "kv_budget": kv_budget, "n_startup_trials": n_startup_trials}
    fp = dict(fingerprint or {}, method="tpe", seed=seed, target=float(target), n_blocks=nb, params=params)

    def layer_ratios(gvals) -> dict[str, float]:
        raw = torch.tensor([gvals[group_of[l.block]] for l in summary.layers], dtype=torch.float64)
        r = finalize(raw, numels, target, max_ratio)
        return {l.name: float(v) for l, v in zip(summary.layers, r)}

    def objective(trial):
        gvals = [trial.suggest_float(f"g{g}", lo, hi, step=step) for g in range(len(groups))]
        bits = [trial.suggest_int(f"kv{b}", kmin, kmax) for b in range(nb)] if kv else None
        frac = kv_memory_fraction(model, bits) if kv else 1.0
        trial.set_user_attr("kv_fraction", frac)
        violation = (frac - kv_budget) if (kv and kv_budget is not None) else 0.0
        trial.set_user_attr("constraint", [violation])
        feasible = violation <= 1e-12
        trial.set_user_attr("feasible", feasible)
        if not feasible:
            return math.inf
        return float(fitness.evaluate(layer_ratios(gvals), bits))

    def constraints(frozen):
        return frozen.user_attrs.get("constraint", [0.0])

    storage = None
    path = None
    if out_dir is not None:
        path = Path(out_dir) / "tpe.db"
        checkpoint.start([path], resume)
        storage = optuna.storages.RDBStorage(f"sqlite:///{path}")
    study = optuna.create_study(storage=storage, study_name=STUDY, direction="minimize", load_if_exists=True)
    old = study.user_attrs.get("fingerprint")
    if old is None:
        study.set_user_attr("fingerprint", checkpoint.normalized(fp))
    else:
        checkpoint.check_fingerprint(old, fp, path)
    resumed = None
    if storage is not None:
        sid = storage.get_study_id_from_name(STUDY)
        stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        for t in stale:  # left RUNNING by a kill -9: redo it
            storage.set_trial_state_values(storage.get_trial_id_from_study_id_trial_number(sid, t.number),
                                           TrialState.FAIL)
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if done or stale:
            resumed = {"evaluations": sum(1 for t in done if t.user_attrs.get("feasible")), "stale_trials": len(stale)}

    def completed():
        return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))

    t0 = time.time()
    n_eval = lambda ts: sum(1 for t in ts if t.user_attrs.get("feasible"))  # noqa: E731
    baselines = {"dense": float(fitness.evaluate(None)),
                 "uniform": float(fitness.evaluate({l.name: float(target) for l in summary.layers}))}
    if kv:
        fits = [b for b in range(kmin, kmax + 1) if kv_budget is None or kv_memory_fraction(model, [b] * nb) <= kv_budget]
        b_uni = max(fits)
        baselines["uniform_kv"] = {"kv_bits": b_uni, "fitness": float(fitness.evaluate(
            {l.name: float(target) for l in summary.layers}, [b_uni] * nb))}
    ts = completed()
    bar = tqdm(total=budget, initial=min(n_eval(ts), budget), desc="TPE", unit="trial", disable=not progress,
               dynamic_ncols=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna's ExperimentalWarning for multivariate / constraints
            while n_eval(ts) < budget and len(ts) < 20 * budget:
                study.sampler = optuna.samplers.TPESampler(
                    seed=(seed * 100003 + len(ts)) % (2 ** 32), n_startup_trials=n_startup_trials,
                    multivariate=True, constant_liar=False,
                    constraints_func=constraints if (kv and kv_budget is not None) else None)
                study.optimize(objective, n_trials=1, catch=())
                before = n_eval(ts)
                ts = completed()
                if n_eval(ts) > before:
                    bar.update(1)
                    feas = [t.value for t in ts if t.user_attrs.get("feasible")]
                    bar.set_postfix_str(f"trial {len(ts)} best {min(feas):.4g}")
    finally:
        bar.close()

    history, best = [], None
    for i, t in enumerate(ts):
        gv = [t.params[f"g{g}"] for g in range(len(groups))]
        bits = [t.params[f"kv{b}"] for b in range(nb)] if kv else None
        feasible = bool(t.user_attrs.get("feasible"))
        h = {"eval": i + 1, "group_sparsity": gv, "kv_bits": bits, "kv_fraction": t.user_attrs.get("kv_fraction"),
             "feasible": feasible, "fitness": t.value if feasible else None}
        if feasible and (best is None or t.value < best["fitness"]):
            best = dict(h)
        h["best_fitness"] = best["fitness"] if best else None
        history.append(h)
    result = {"method": "tpe", "budget": budget, "evaluations": n_eval(ts), "trials": len(ts), "target": float(target),
              "groups": groups, "params": params, "baselines": baselines, "history": history, "seed": seed,
              "checkpoint": str(path) if path else None, "resumed_from": resumed,
              "seconds": round(time.time() - t0, 2)}
    if best is not None:
        ratios = layer_ratios(best["group_sparsity"])
        first = {}
        for l in summary.layers:
            first.setdefault(l.block, ratios[l.name])
        best["block_ratios"] = [first[b] for b in range(nb)]
        if kv:
            best["kv_memory_saved"] = 1.0 - best["kv_fraction"]
            best["kv_cache_bytes_per_token"] = kv_cache_bytes_per_token(model, best["kv_bits"])
            best["kv_cache_bytes_per_token_fp16"] = kv_cache_bytes_per_token(model, None)
    result["best"] = best
    return result


@register_search("tpe", params=TPEParams)
def run_tpe(setup, budget, out_dir, resume, progress, fingerprint, **params) -> tuple[dict, dict]:
    """(result, recipe): per-block ratios (and the KV-cache bit-widths, applied at inference, not by prune)."""
    res = search_tpe(setup.fitness, setup.summary, setup.target, budget, out_dir, setup.seed, resume,
                     progress=progress, fingerprint=fingerprint, **params)
    recipe = {"allocation": "uniform", "sparsity": res["best"]["block_ratios"] if res["best"] else float(setup.target)}
    if res["best"] and res["best"].get("kv_bits"):
        recipe["kv_cache_bits"] = res["best"]["kv_bits"]  # not a prune config key: applied at inference
    return res, recipe
