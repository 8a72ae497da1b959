"""The layer least-squares problem (prunekit.core.lsq): the normalised objective is the damped one, dead inputs,
the guarded (Hn + rho I)^-1, and conjugate gradients on a fixed support against a brute-force solve per row."""
from __future__ import annotations

import importlib
import logging

import pytest
import torch

from prunekit.core.errors import PrunekitError
from prunekit.core.lsq import check_solver_inputs, damped_inverse, layer_problem, make_problem, masked_cg
from prunekit.core.masks import make_mask
from prunekit.core.metric import get_metric

from conftest import brute_force_optimum, damped, generator, objective, stats_of


def test_normalised_objective_is_the_damped_one(lsq_small):
    W, X, st = lsq_small
    H = st.hessian_mean()
    P = make_problem(H, percdamp=0.05)
    assert torch.allclose(P.Hn.diagonal(), torch.ones(32))
    V = torch.randn(12, 32, generator=generator(5))
    got = float(P.error(P.normalise(W), P.normalise(V)).sum())
    assert got == pytest.approx(objective(W, V, damped(H, 0.05)), rel=1e-5)
    assert torch.allclose(P.restore(P.normalise(W)), W, atol=1e-5)


def test_dead_inputs_are_zero_in_every_solution(lsq_small):
    W, X, _ = lsq_small
    X = X.clone()
    X[:, 3] = 0.0
    st = stats_of(X)
    P = make_problem(st.hessian_mean())
    assert bool(P.dead[3]) and int(P.dead.sum()) == 1
    Wn = P.normalise(W)
    assert torch.equal(Wn[:, 3], torch.zeros(12))
    mask = make_mask(W.abs(), 0.5, None, "row")
    Xs = masked_cg(P.Hn, Wn @ P.Hn, ~mask, Wn, 200, 1e-10)
    assert torch.equal(Xs[:, 3], torch.zeros(12))


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_masked_cg_reaches_the_brute_force_optimum(lsq_small, pattern):
    W, X, st = lsq_small
    H = st.hessian_mean()
    P = make_problem(H, percdamp=0.01)
    mask = make_mask(W.abs() * X.norm(dim=0), 0.5 if pattern else 0.6, pattern, "row")
    Wn = P.normalise(W)
    got = P.restore(masked_cg(P.Hn, Wn @ P.Hn, ~mask, Wn, 500, 1e-12))
    want = brute_force_optimum(W, damped(H, 0.01), mask)
    assert torch.equal(got[mask], torch.zeros(int(mask.sum())))
    assert torch.allclose(got.double(), want, atol=1e-4, rtol=1e-4)


def test_damped_inverse_never_returns_nan(caplog):
    g = generator(7)
    B = torch.randn(16, 16, generator=g)
    good = B @ B.T / 16 + torch.eye(16)
    assert torch.allclose(damped_inverse(good, 0.5) @ (good + 0.5 * torch.eye(16)), torch.eye(16), atol=1e-4)
    indefinite = good - 50 * torch.eye(16)
    with caplog.at_level(logging.WARNING):
        inv = damped_inverse(indefinite, 0.1, max_damp_tries=3)
    assert torch.isfinite(inv).all() and "failed" in caplog.text
    nan = good.clone()
    nan[2, 3] = float("nan")
    assert torch.isfinite(damped_inverse(nan, 0.1)).all()


def test_a_non_finite_hessian_becomes_its_diagonal(lsq_small, caplog):
    W, X, st = lsq_small
    H = st.hessian_mean()
    H[0, 1] = float("inf")
    with caplog.at_level(logging.WARNING):
        P = make_problem(H)
    assert torch.isfinite(P.Hn).all() and torch.equal(P.Hn, torch.eye(32))
    assert "NaN/inf" in caplog.text


def test_layer_problem_is_made_once_per_statistics(lsq_small):
    W, X, _ = lsq_small
    st = stats_of(X)
    P1 = layer_problem(st, "cpu")
    assert layer_problem(st, "cpu") is P1
    assert layer_problem(st, "cpu", percdamp=0.1) is not P1


@pytest.mark.parametrize("method,factor", [("admm", "damped_inverse"), ("alps", "make_problem")])
def test_adapters_factor_once_per_statistics(lsq_small, monkeypatch, method, factor):
    """The layers that read one input (q/k/v, gate/up) share one normalised problem (and ADMM one inverse)."""
    module = importlib.import_module("prunekit.core.lsq" if factor == "make_problem" else f"prunekit.methods.{method}")
    W, X, _ = lsq_small
    st = stats_of(X)
    calls = []
    real = getattr(module, factor)
    monkeypatch.setattr(module, factor, lambda *a, **k: calls.append(1) or real(*a, **k))
    solver = get_metric(method).solver
    W1, m1 = solver(W, st, 0.5)
    solver(W * 2, st, 0.5)
    if method == "alps":
        solver(W, st, 0.5, mask=m1)
    assert len(calls) == 1
    ref, ref_m = getattr(importlib.import_module(f"prunekit.methods.{method}"), f"{method}_solve")(
        W, st.hessian_mean(), 0.5)
    assert torch.equal(m1, ref_m) and torch.allclose(W1, ref, atol=1e-5)


def test_solver_inputs_are_checked_in_one_line():
    W = torch.zeros(4, 8)
    with pytest.raises(PrunekitError, match="ADMM: Hessian shape"):
        check_solver_inputs(W, (4, 4), 0.5, None, None, "ADMM")
    with pytest.raises(PrunekitError, match="ALPS: mask shape"):
        check_solver_inputs(W, None, 0.5, None, torch.zeros(4, 4, dtype=torch.bool), "ALPS")
    with pytest.raises(PrunekitError, match="not divisible by M=3"):
        check_solver_inputs(W, None, 0.5, (1, 3), None, "ADMM")
    with pytest.raises(PrunekitError, match="ADMM: 3 row ratios for 4 rows"):
        check_solver_inputs(W, None, torch.tensor([0.1, 0.2, 0.3]), None, None, "ADMM")
    assert check_solver_inputs(W, None, 0.25, None, None, "ADMM") == 0.25
