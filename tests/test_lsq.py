"""The layer least-squares problem (prunekit.core.lsq): the normalised objective is the damped one, dead inputs,
the guarded (Hn + rho I)^-1, and conjugate gradients on a fixed support against a brute-force solve per row."""
from __future__ import annotations

import logging

import pytest
import torch

from prunekit.core.errors import PrunekitError
from prunekit.core.lsq import check_solver_inputs, damped_inverse, layer_problem, make_problem, masked_cg
from prunekit.core.masks import make_mask

from conftest import correlated_inputs, generator, stats_of


def damped(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """H with the dead diagonal set to 1 and the damping added, in float64 (the objective's matrix)."""
    Hd = H.double().clone()
    dead = ~(Hd.diagonal() > 0)
    Hd[dead, :] = 0
    Hd[:, dead] = 0
    Hd.diagonal()[dead] = 1.0
    Hd.diagonal().add_(percdamp * float(Hd.diagonal().mean()))
    return Hd


def brute_force_optimum(W: torch.Tensor, Hd: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row by row, the exact least-squares weights on the kept columns (float64 solve)."""
    out = torch.zeros_like(W, dtype=torch.float64)
    for r in range(W.shape[0]):
        K = (~mask[r]).nonzero().flatten()
        if K.numel():
            rhs = (Hd @ W[r].double())[K]
            out[r, K] = torch.linalg.solve(Hd[K][:, K], rhs)
    return out


def objective(W: torch.Tensor, V: torch.Tensor, Hd: torch.Tensor) -> float:
    R = (W.double() - V.double())
    return float(((R @ Hd) * R).sum())


@pytest.fixture(scope="module")
def small():
    X = correlated_inputs(n=512, d=32, seed=3)
    W = torch.randn(12, 32, generator=generator(4))
    return W, X, stats_of(X)


def test_normalised_objective_is_the_damped_one(small):
    W, X, st = small
    H = st.hessian_mean()
    P = make_problem(H, percdamp=0.05)
    assert torch.allclose(P.Hn.diagonal(), torch.ones(32))
    V = torch.randn(12, 32, generator=generator(5))
    got = float(P.error(P.normalise(W), P.normalise(V)).sum())
    assert got == pytest.approx(objective(W, V, damped(H, 0.05)), rel=1e-5)
    assert torch.allclose(P.restore(P.normalise(W)), W, atol=1e-5)


def test_dead_inputs_are_zero_in_every_solution(small):
    W, X, _ = small
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
def test_masked_cg_reaches_the_brute_force_optimum(small, pattern):
    W, X, st = small
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


def test_a_non_finite_hessian_becomes_its_diagonal(small, caplog):
    W, X, st = small
    H = st.hessian_mean()
    H[0, 1] = float("inf")
    with caplog.at_level(logging.WARNING):
        P = make_problem(H)
    assert torch.isfinite(P.Hn).all() and torch.equal(P.Hn, torch.eye(32))
    assert "NaN/inf" in caplog.text


def test_layer_problem_is_made_once_per_statistics(small):
    W, X, _ = small
    st = stats_of(X)
    P1 = layer_problem(st, "cpu")
    assert layer_problem(st, "cpu") is P1
    assert layer_problem(st, "cpu", percdamp=0.1) is not P1


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
