"""The mask-refinement contract (prunekit.core.refine) and refiners through the engine: a refiner that changes a
row's or an N:M group's count is stopped, the statistics refiners need are gathered, every layer keeps its exact
counts under any metric, allocator, row-wise method, pattern and reconstruction, a solver metric re-solves on the
refined mask, and the report records it."""
from __future__ import annotations

import pytest
import torch

import prunekit
from prunekit.core.errors import PrunekitError
from prunekit.core.families import block_linears, name_matches, weight_view
from prunekit.core.masks import make_mask
from prunekit.core.refine import REFINERS, apply_refine, group_counts, refine_needs, register_refiner
from prunekit.pruning.config import make_config
from prunekit.pruning.plan import stats_needs
from prunekit.core.metric import configured_metric

from conftest import check_exact_row_counts, correlated_layer, tiny_model


def test_registered_refiners_and_their_statistics():
    assert {"dsnot", "swaps"} <= set(REFINERS)
    assert refine_needs("dsnot") == frozenset({"sum", "sq_sum"})
    assert refine_needs("swaps") == frozenset({"hessian"})
    cfg = make_config(metric="magnitude", refine="dsnot")
    assert stats_needs(configured_metric("magnitude"), cfg) == frozenset({"sum", "sq_sum"})


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_a_refiner_that_changes_counts_is_stopped(nm):
    W, X, st = correlated_layer()
    mask = make_mask(W.abs(), 0.5, nm, "row")

    def drops_one(W, mask, stats, nm=None):
        m = mask.clone()
        r = int(m[0].nonzero()[0])
        m[0, r] = False
        return m, {}

    def moves_across_groups(W, mask, stats, nm=None):  # row counts kept, group counts not
        m = mask.clone()
        row = m[0].clone()
        pruned, kept = row.nonzero().flatten(), (~row).nonzero().flatten()
        i = int(pruned[0])
        j = int(next(k for k in kept.tolist() if k // 4 != i // 4))
        m[0, i], m[0, j] = False, True
        return m, {}

    try:
        register_refiner("test-drop")(drops_one)
        register_refiner("test-move")(moves_across_groups)
        with pytest.raises(PrunekitError, match="changed the number of pruned weights of a "
                                                + ("row" if nm is None else "group")):
            apply_refine("test-drop", W, mask, st, nm)
        if nm is not None:
            with pytest.raises(PrunekitError, match="of a group"):
                apply_refine("test-move", W, mask, st, nm)
        else:
            assert torch.equal(apply_refine("test-move", W, mask, st, nm).sum(1), mask.sum(1))
    finally:
        del REFINERS["test-drop"], REFINERS["test-move"]


CASES = [
    ({"metric": "wanda", "refine": "swaps"}, True),
    ({"metric": "wanda", "refine": "dsnot", "refine_params": {"threshold": 0.0}, "allocation": "owl"}, True),
    ({"metric": "ria", "refine": "swaps", "reconstruct": "admm", "allocation": "atp"}, True),
    ({"metric": "wanda", "refine": "swaps", "rowwise": "trim"}, False),
    ({"metric": "magnitude", "refine": "dsnot", "refine_params": {"threshold": 0.0}, "reconstruct": "alps"}, False),
]


@pytest.mark.parametrize("cfg,per_row", CASES)
def test_exact_counts_through_the_engine(cfg, per_row, calib_ids):
    model = tiny_model("llama", layers=2, hidden=64)
    rep = prunekit.prune(model, None, {"sparsity": 0.6, **cfg}, calib_ids=calib_ids)
    weights = {n: weight_view(m) for d in block_linears(model) for n, m in d.items()}
    if per_row:
        check_exact_row_counts(weights, {l["name"]: l["target"] for l in rep["layers"]})
    else:  # per-layer masks (magnitude) and TRIM's row counts: the layer total is still exact
        for l in rep["layers"]:
            assert int((weights[l["name"]] == 0).sum()) == int(l["numel"] * l["target"]), l["name"]
    assert rep["method"]["refine"] == cfg["refine"] and rep["refine"]["swaps"] > 0
    assert rep["refine"]["error_after"] < rep["refine"]["error_before"]
    # every layer refined, except those the refiner's skip names (DSnoT's default: the MLP's, as its public code)
    skip = getattr(REFINERS.get(cfg["refine"]).check_params(cfg.get("refine_params")), "skip", [])
    assert all(("refine" in l) != name_matches(l["name"], skip) for l in rep["layers"])
    assert any(name_matches(l["name"], skip) for l in rep["layers"]) == (cfg["refine"] == "dsnot")


def test_skipped_layers_keep_the_metrics_mask(calib_ids):
    """DSnoT leaves the layers its ``skip`` names (default: the MLP's, ``mlp.*``) with the metric's mask: the MLP
    weights are plain Wanda's, bit for bit (one block, statistics from the dense block: the MLP sees the same
    inputs whatever attention's masks are); ``skip=[]`` refines them too."""
    base = {"sparsity": 0.6, "metric": "wanda", "sequential": False}
    plain = tiny_model("llama", layers=1, hidden=64)
    prunekit.prune(plain, None, base, calib_ids=calib_ids)
    runs = {}
    for skip in (None, []):
        model = tiny_model("llama", layers=1, hidden=64)
        params = {"threshold": 0.0, **({} if skip is None else {"skip": skip})}
        rep = prunekit.prune(model, None, {**base, "refine": "dsnot", "refine_params": params}, calib_ids=calib_ids)
        runs[str(skip)] = ({n: weight_view(m).clone() for d in block_linears(model) for n, m in d.items()}, rep)
    want = {n: weight_view(m) for d in block_linears(plain) for n, m in d.items()}
    default, every = runs["None"][0], runs["[]"][0]
    for n, w in want.items():
        if ".mlp." in n:
            assert torch.equal(default[n], w), n
            assert not torch.equal(every[n], w), n
        else:
            assert not torch.equal(default[n], w) and torch.equal(default[n], every[n]), n
    assert runs["[]"][1]["refine"]["swaps"] > runs["None"][1]["refine"]["swaps"]


def test_n_m_refinement_keeps_the_pattern(calib_ids):
    model = tiny_model("llama", layers=2, hidden=64)
    prunekit.prune(model, None, {"metric": "wanda", "pattern": "2:4", "refine": "swaps", "reconstruct": "admm"},
                   calib_ids=calib_ids)
    for d in block_linears(model):
        for n, m in d.items():
            z = weight_view(m) == 0
            assert bool((group_counts(z, (2, 4)) >= 2).all()), n  # (a kept weight may also be 0: dead inputs)


def test_a_solver_metric_solves_again_on_the_refined_mask(calib_ids, monkeypatch):
    from prunekit.core import metric as metric_mod

    calls = []
    real = metric_mod.METRICS["sparsegpt"]
    wrapped = lambda *a, **k: calls.append(a[4] is not None) or real.solver(*a, **k)  # noqa: E731
    monkeypatch.setitem(metric_mod.METRICS, "sparsegpt",
                        type(real)(**{**real.__dict__, "solver": wrapped}))
    model = tiny_model("llama", layers=1, hidden=64)
    rep = prunekit.prune(model, None, {"metric": "sparsegpt", "sparsity": 0.6, "refine": "swaps"},
                         calib_ids=calib_ids)
    assert calls[:2] == [False, True] and len(calls) == 2 * len(rep["layers"])
    assert rep["overall_sparsity"] == pytest.approx(0.6, abs=1e-3)


def test_report_markdown_names_the_refiner(calib_ids):
    from prunekit.pruning.report import report_markdown

    model = tiny_model("llama", layers=1, hidden=64)
    rep = prunekit.prune(model, None, {"metric": "wanda", "sparsity": 0.5, "refine": "swaps",
                                       "refine_params": {"max_swaps": 5}}, calib_ids=calib_ids)
    text = report_markdown(rep)
    assert "mask refined by swaps (max_swaps=5, candidates=32, percdamp=0.01)" in text and "refinement:" in text
    assert rep["method"]["refine_params"] == {"max_swaps": 5, "candidates": 32, "percdamp": 0.01}
