"""OptiShear-style multi-objective search (pymoo NSGA-II, or NSGA-III as in OptiShear v1).

The paper leaves the search space open; prunekit's documented choice:

Meta metric (per layer, compared per output row or per matrix)::

    S_ij = N(|W|)_ij ^ a  *  act_j ^ b
    N     in {none, row: |W| / row sum, col: |W| / column sum, rowcol: |W|/row sum + |W|/column sum (RIA)}
    act_j in {l2: ||X_j||_2 (Wanda), std: standard deviation of X_j over calibration tokens (STADE-like)}
    a in [0.25, 2], b in [0, 1.5], group in {row, layer}

(Wanda = none/l2/a=1/b=1/row, RIA = rowcol/l2/a=1/b=0.5/row, magnitude = b=0/layer.)

Per-layer ratios: a sparsity level s = S + k * 0.01, k in 0..round(span / 0.01), and per-block offsets
o_b in [-delta, delta]; a repair operator centres the offsets (parameter-weighted mean 0) and
:func:`prunekit.allocate.finalize` makes the weighted mean exactly s. The sparsity target is the
constraint s >= S (declared to pymoo as ``S - achieved <= 0``; the encoding keeps it satisfied).

Objectives (both minimised, both cheap: one forward on a few calibration windows, no held-out data):
  f1 = mean token KL(dense || pruned) of the next-token distributions on ``n_fitness_windows``
       calibration windows (at most ``fitness_seqlen`` tokens): output divergence from the dense model;
  f2 = - achieved sparsity.
The result holds the Pareto set of every evaluated point, and the *chosen point*: the Pareto point
with the lowest divergence, its allocation re-targeted to exactly S (k = 0) and evaluated on the
held-out windows (perplexity), next to the uniform Wanda baseline.

Checkpoint/resume: the pymoo algorithm (with its random generator) is pickled after every generation
(``optishear_state.pkl``, atomic) and every evaluation is recorded in ``optishear_evals.json``
(atomic, after each one); a resumed run re-draws the interrupted generation from the pickled state
(identical candidates) and takes finished candidates from the record. ``budget`` is rounded up to
whole generations.
"""
from __future__ import annotations

import hashlib
import math
import pickle
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from tqdm.auto import tqdm

from ..core.allocation import finalize
from ..core.errors import PrunekitError
from ..core.metric import Metric
from ..core.registry import Int, Params
from . import checkpoint
from .registry import register_search

WNORMS = ("none", "row", "col", "rowcol")
ACTS = ("l2", "std")
GROUPS = ("row", "layer")
N_META = 5  # wnorm, a, act, b, group
A_RANGE = (0.25, 2.0)
B_RANGE = (0.0, 1.5)
LEVEL_STEP = 0.01


def _pick(x: float, options):
    return options[min(len(options) - 1, int(math.floor(float(x) * len(options))))]


def decode_meta(x) -> dict:
    return {"wnorm": _pick(x[0], WNORMS), "a": round(A_RANGE[0] + float(x[1]) * (A_RANGE[1] - A_RANGE[0]), 4),
            "act": _pick(x[2], ACTS), "b": round(B_RANGE[0] + float(x[3]) * (B_RANGE[1] - B_RANGE[0]), 4),
            "group": _pick(x[4], GROUPS)}


def meta_metric(p: dict):
    """A :class:`prunekit.core.metric.Metric` computing the meta score with parameters ``p``."""
    eps = 1e-12

    def score(W, stats):
        A = W.abs()
        if p["wnorm"] == "row":
            A = A / (A.sum(1, keepdim=True) + eps)
        elif p["wnorm"] == "col":
            A = A / (A.sum(0, keepdim=True) + eps)
        elif p["wnorm"] == "rowcol":
            A = A / (A.sum(1, keepdim=True) + eps) + A / (A.sum(0, keepdim=True) + eps)
        act = stats.col_norm() if p["act"] == "l2" else stats.var().sqrt()
        return A.pow(p["a"]) * act.to(W.device).clamp_min(0).pow(p["b"])[None, :]

    return Metric("optishear", frozenset({"sq_sum", "sum"}), p["group"], score=score,
                  description=f"OptiShear meta metric {p}")


def meta_key(p: dict) -> tuple:
    return tuple(sorted(p.items()))


def _pareto(F: np.ndarray) -> list[int]:
    idx = []
    for i in range(len(F)):
        dominated = np.any(np.all(F <= F[i], axis=1) & np.any(F < F[i], axis=1))
        if not dominated:
            idx.append(i)
    return idx


def _xkey(x) -> str:
    return hashlib.sha1(np.asarray(x, dtype=np.float64).tobytes()).hexdigest()


_CLASSES = None


def _pymoo_classes():
    """The pymoo problem and repair classes (module-level, so that the algorithm can be pickled)."""
    global _CLASSES, Space, CentreOffsets
    if _CLASSES is None:
        from pymoo.core.problem import Problem
        from pymoo.core.repair import Repair

        class Space(Problem):  # noqa: F811
            """x in [0, 1]^n: 5 meta-metric genes, the sparsity level, one offset per block."""

            def __init__(self, n_var):
                super().__init__(n_var=n_var, n_obj=2, n_ieq_constr=1, xl=0.0, xu=1.0)

        class CentreOffsets(Repair):  # noqa: F811
            """Offsets o = 2x - 1 (times delta) re-centred to a parameter-weighted mean of 0, clipped."""

            def __init__(self, w):
                super().__init__()
                self.w = np.asarray(w, dtype=np.float64)

            def _do(self, problem, X, **kwargs):
                X = np.array(X, dtype=np.float64, copy=True)
                for _ in range(5):
                    o = 2 * X[:, N_META + 1:] - 1
                    o = np.clip(o - (o @ self.w)[:, None], -1, 1)
                    X[:, N_META + 1:] = (o + 1) / 2
                return X

        for cls in (Space, CentreOffsets):  # pickled by reference to these module attributes
            cls.__qualname__ = cls.__name__
            cls.__module__ = __name__
        _CLASSES = (Space, CentreOffsets)
    return _CLASSES


class OptiShearParams(Params):
    population: Int = Field(12, ge=4)
    delta: float = Field(0.05, ge=0, description="per-block offsets in [-delta, delta]")
    span: float = Field(0.05, ge=0, description="sparsity levels S .. S + span")
    algorithm: Literal["nsga2", "nsga3"] = "nsga2"
    n_fitness_windows: Int = Field(8, ge=1)
    fitness_seqlen: Int = Field(128, ge=2)
    max_ratio: float = Field(0.99, gt=0, lt=1)


def search_optishear(fitness, summary, target: float, budget: int, out_dir=None, seed: int = 0, resume: bool = True,
                     population: int = 12, delta: float = 0.05, span: float = 0.05, algorithm: str = "nsga2",
                     n_fitness_windows: int = 8, fitness_seqlen: int = 128, max_ratio: float = 0.99,
                     progress: bool = True, fingerprint: dict | None = None) -> dict:
    try:
        from pymoo.algorithms.moo.nsga2 import NSGA2
        from pymoo.algorithms.moo.nsga3 import NSGA3
        from pymoo.core.evaluator import Evaluator
        from pymoo.problems.static import StaticProblem
        from pymoo.util.ref_dirs import get_reference_directions
    except ImportError:
        raise PrunekitError("OptiShear search needs pymoo: pip install 'prunekit[search]' (or pip install pymoo)") from None
    if budget < 1 or population < 4:
        raise PrunekitError("OptiShear needs budget >= 1 and population >= 4")
    if algorithm not in ("nsga2", "nsga3"):
        raise PrunekitError(f"algorithm must be nsga2 or nsga3, got {algorithm!r}")
    nb = summary.n_blocks
    n_levels = int(round(span / LEVEL_STEP))
    if target + span > max_ratio:
        raise PrunekitError(f"target {target} + span {span} exceeds max_ratio {max_ratio}")
    numels = summary.numels()
    block_numel = np.zeros(nb)
    for l in summary.layers:
        block_numel[l.block] += l.numel
    w = block_numel / block_numel.sum()
    n_var = N_META + 1 + nb
    Space, CentreOffsets = _pymoo_classes()

    def decode(x) -> tuple[dict, float, dict]:
        meta = decode_meta(x)
        level = float(target) + int(round(float(x[N_META]) * n_levels)) * LEVEL_STEP
        offs = (2 * np.asarray(x[N_META + 1:], dtype=np.float64) - 1) * delta
        return meta, level, layer_ratios(level, offs)

    def layer_ratios(level, offs) -> dict[str, float]:
        raw = torch.tensor([level + offs[l.block] for l in summary.layers], dtype=torch.float64)
        r = finalize(raw, numels, min(level, max_ratio), max_ratio)
        return {l.name: float(v) for l, v in zip(summary.layers, r)}

    div = fitness.calib_ids[:n_fitness_windows, :fitness_seqlen]
    fitness.set_divergence_windows(div)

    def objective(x) -> tuple[list[float], list[float], dict]:
        meta, level, ratios = decode(x)
        kl = fitness.evaluate(ratios, metric=meta_metric(meta), metric_key=meta_key(meta), objective="kl")
        achieved = float(sum(ratios[l.name] * l.numel for l in summary.layers) / float(numels.sum()))
        return [kl, -achieved], [float(target) - achieved - 1e-9], {"meta": meta, "level": level}

    params = {"population": population, "delta": delta, "span": span, "algorithm": algorithm,
              "n_fitness_windows": int(div.shape[0]), "fitness_seqlen": int(div.shape[1])}
    fp = checkpoint.normalized(dict(fingerprint or {}, method="optishear", seed=seed, target=float(target),
                                    n_blocks=nb, params=params))
    state_path = evals_path = None
    record = {"fingerprint": fp, "evals": {}, "history": []}
    algo = None
    resumed = None
    if out_dir is not None:
        state_path, evals_path = Path(out_dir) / "optishear_state.pkl", Path(out_dir) / "optishear_evals.json"
        checkpoint.start([state_path, evals_path], resume)
        stored = checkpoint.load_json(evals_path)
        if stored is not None:
            checkpoint.check_fingerprint(stored.get("fingerprint"), fp, evals_path)
            record = stored
            resumed = {"evaluations": len(record["history"])}
        if state_path.exists():
            algo = pickle.loads(state_path.read_bytes())
    if algo is None:
        if algorithm == "nsga2":
            algo = NSGA2(pop_size=population, repair=CentreOffsets(w), eliminate_duplicates=True)
        else:
            ref = get_reference_directions("das-dennis", 2, n_partitions=population - 1)
            algo = NSGA3(ref_dirs=ref, pop_size=population, repair=CentreOffsets(w), eliminate_duplicates=True)
        algo.setup(Space(n_var), termination=("n_gen", 1 << 30), seed=seed, verbose=False)

    def save_record():
        if evals_path is not None:
            checkpoint.save_json(evals_path, record)

    t0 = time.time()
    history = record["history"]
    bar = tqdm(total=budget, initial=min(len(history), budget), desc="OptiShear", unit="eval",
               disable=not progress, dynamic_ncols=True)
    try:
        while len(history) < budget:
            pop = algo.ask()
            X = pop.get("X")
            F, G = [], []
            for x in X:
                k = _xkey(x)
                if k not in record["evals"]:
                    f, g, info = objective(x)
                    record["evals"][k] = {"F": f, "G": g}
                    history.append({"eval": len(history) + 1, "generation": int(algo.n_iter or 1) - 1, "x": [float(v) for v in x],
                                    "kl": f[0], "sparsity": -f[1], **info})
                    save_record()
                    bar.update(1)
                    bar.set_postfix_str(f"gen {int(algo.n_iter or 1) - 1} best KL {min(h['kl'] for h in history):.4g}")
                F.append(record["evals"][k]["F"])
                G.append(record["evals"][k]["G"])
            Evaluator().eval(StaticProblem(algo.problem, F=np.array(F), G=np.array(G)), pop)
            algo.tell(infills=pop)
            if state_path is not None:
                checkpoint.save_bytes(state_path, pickle.dumps(algo))
    finally:
        bar.close()

    Fall = np.array([[h["kl"], -h["sparsity"]] for h in history])
    pareto = [history[i] for i in _pareto(Fall)]
    pareto.sort(key=lambda h: (h["sparsity"], h["kl"]))
    best = min(pareto, key=lambda h: (h["kl"], h["eval"]))
    x = np.asarray(best["x"])
    x_at_target = x.copy()
    x_at_target[N_META] = 0.0
    meta, level, ratios = decode(x_at_target)
    chosen = {"meta_metric": meta, "sparsity": level,
              "kl": fitness.evaluate(ratios, metric=meta_metric(meta), metric_key=meta_key(meta), objective="kl"),
              "heldout_ppl": fitness.evaluate(ratios, metric=meta_metric(meta), metric_key=meta_key(meta)),
              "from_eval": best["eval"]}
    first = {}
    for l in summary.layers:
        first.setdefault(l.block, ratios[l.name])
    chosen["block_ratios"] = [first[b] for b in range(nb)]
    uniform = {l.name: float(target) for l in summary.layers}
    baselines = {"dense": fitness.evaluate(None),
                 "uniform": fitness.evaluate(uniform),
                 "uniform_kl": fitness.evaluate(uniform, objective="kl")}
    return {"method": "optishear", "budget": budget, "evaluations": len(history),
            "generations": int(algo.n_iter or 1) - 1, "target": float(target), "params": params,
            "objectives": ["KL(dense || pruned) on calibration windows", "-sparsity"],
            "pareto": pareto, "best": chosen, "baselines": baselines, "history": history, "seed": seed,
            "checkpoint": str(state_path) if state_path else None, "resumed_from": resumed,
            "seconds": round(time.time() - t0, 2),
            # the meta metric is not a registered metric: the recipe carries the ratios (with Wanda) and
            # the meta metric's parameters for reference
            "recipe": {"allocation": "uniform", "sparsity": chosen["block_ratios"], "optishear_metric": meta}}


@register_search("optishear", params=OptiShearParams, extra_needs=("sq_sum", "sum"))
def run_optishear(setup, budget, out_dir, resume, progress, fingerprint, **params) -> tuple[dict, dict]:
    res = search_optishear(setup.fitness, setup.summary, setup.target, budget, out_dir, setup.seed, resume,
                           progress=progress, fingerprint=fingerprint, **params)
    return res, res.pop("recipe")
