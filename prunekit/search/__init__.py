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
from .run import METHODS, check_search_params, prepare_search_dir, run_search  # noqa: F401,E402
