"""ALPS (prunekit.methods.alps): exact weights on its support and on a fixed mask (brute force), exact counts and
N:M patterns, a lower layer error than SparseGPT, robustness."""
from __future__ import annotations

import logging

import pytest
import torch

from prunekit.core.masks import make_mask
from prunekit.methods.alps import alps_solve
from prunekit.methods.sparsegpt import sparsegpt_solve

from conftest import brute_force_optimum, damped, objective


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_weights_are_the_optimum_on_the_chosen_support(lsq_small, pattern):
    W, X, st = lsq_small
    H = st.hessian_mean()
    info = {}
    got, mask = alps_solve(W, H, 0.6 if pattern is None else 0.5, pattern=pattern, pcg_iters=500, pcg_rtol=1e-10,
                           info=info)
    assert info["iters"] >= 1
    if pattern is None:
        assert int(mask.sum()) == int(0.6 * W.numel())
    else:
        assert torch.equal(mask.reshape(12, -1, 4).sum(2), torch.full((12, 8), 2))
    Hd = damped(H, 0.01)
    want = brute_force_optimum(W, Hd, mask)
    assert torch.allclose(got.double(), want, atol=2e-4, rtol=1e-3)


def test_fixed_mask_is_the_least_squares_optimum(lsq_small):
    W, X, st = lsq_small
    H = st.hessian_mean()
    mask = make_mask(W.abs() * X.norm(dim=0), 0.6, None, "layer")
    got, m = alps_solve(W, H, mask=mask, pcg_iters=500, pcg_rtol=1e-10)
    assert torch.equal(m, mask)
    Hd = damped(H, 0.01)
    assert objective(W, got, Hd) == pytest.approx(objective(W, brute_force_optimum(W, Hd, mask), Hd), rel=1e-6)


def test_fixed_mask_on_slices_of_rows():
    """With a fixed mask the conjugate gradients run on slices of max(32, in / 8) rows (memory): a 100-row layer
    takes four, and every row still reaches its brute-force optimum."""
    from conftest import correlated_inputs, generator, stats_of

    X = correlated_inputs(n=512, d=32, seed=5)
    W = torch.randn(100, 32, generator=generator(6))
    H = stats_of(X).hessian_mean()
    mask = make_mask(W.abs() * X.norm(dim=0), 0.6, None, "layer")
    got, m = alps_solve(W, H, mask=mask, pcg_iters=500, pcg_rtol=1e-10)
    assert torch.equal(m, mask) and not got[mask].any()
    Hd = damped(H, 0.01)
    want = brute_force_optimum(W, Hd, mask)
    assert torch.allclose(got.double(), want, atol=2e-4, rtol=1e-3)


def test_lower_layer_error_than_sparsegpt(lsq_layer):
    W, X, st = lsq_layer
    H = st.hessian_mean()
    Hd = damped(H, 0.01)
    for s, pattern in ((0.5, None), (0.7, None), (0.5, (2, 4))):
        got, _ = alps_solve(W, H, s, pattern=pattern)
        sg, _ = sparsegpt_solve(W, H, s, pattern=pattern)
        assert objective(W, got, Hd) < objective(W, sg, Hd), (s, pattern)


def test_row_ratios(lsq_layer):
    W, X, st = lsq_layer
    ratios = torch.linspace(0.3, 0.8, 64)
    _, mask = alps_solve(W, st.hessian_mean(), ratios, max_iters=30)
    assert torch.equal(mask.sum(1), torch.floor(ratios.double() * 128).long())


def test_never_nan_on_bad_hessians(lsq_small, caplog):
    W, X, st = lsq_small
    H = st.hessian_mean()
    nanH = H.clone()
    nanH[1, 2] = float("nan")
    with caplog.at_level(logging.WARNING):
        for h in (nanH, torch.zeros(32, 32), H - 10 * float(H.diagonal().max()) * torch.eye(32)):
            got, mask = alps_solve(W, h, 0.5)
            assert torch.isfinite(got).all() and int(mask.sum()) == W.numel() // 2


def test_failed_factorisations_fall_back_to_the_diagonal(lsq_small, monkeypatch, caplog):
    W, X, st = lsq_small

    def broken(A, out=None):
        out[1].fill_(1)  # "not positive definite"
        return out

    monkeypatch.setattr(torch.linalg, "cholesky_ex", broken)
    with caplog.at_level(logging.WARNING):
        got, mask = alps_solve(W, st.hessian_mean(), 0.5, max_damp_tries=2)
    assert torch.isfinite(got).all() and int(mask.sum()) == W.numel() // 2 and "diagonal" in caplog.text
