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


def _reference_support(W, Hd, s, rho, iters, update_every=3):
    """ALPS's ADMM as the paper writes it, on whole float64 matrices: B from the normal equations with the
    Wn Hn target, D the layer-wide projection of B + V / rho (stable order), V the dual; rho follows the support
    change every ``update_every`` iterations; the final B is the B-step after the last dual step."""
    d = Hd.diagonal().sqrt()
    Hn = Hd / d[:, None] / d[None, :]
    Wn = W.double() * d
    k = int(W.numel() * s)

    def proj(X):
        m = torch.zeros(X.numel(), dtype=torch.bool)
        m[torch.from_numpy(X.abs().flatten().numpy().argsort(kind="stable"))[:k]] = True
        return m.view(X.shape)

    def b_step(D, V, rho):
        return (Wn @ Hn - V + rho * D) @ torch.linalg.inv(Hn + rho * torch.eye(Hn.shape[0], dtype=Hn.dtype))

    pruned = proj(Wn)
    D, V, keep = Wn.masked_fill(pruned, 0.0), torch.zeros_like(Wn), W.numel() - k
    warmed = False
    for t in range(iters):
        B = b_step(D, V, rho)
        M = proj(B + V / rho)
        D = (B + V / rho).masked_fill(M, 0.0)
        V = V + rho * (B - D)
        if (t + 1) % update_every:
            continue
        change, pruned = int((M != pruned).sum()), M
        if change / keep > 0.1:
            rho, warmed = rho * 1.3, True
        elif change / keep > 0.005:
            rho, warmed = rho * 1.2, True
        elif change and warmed:
            rho *= 1.1
        assert warmed, "the reference leaves out restarts"
    return proj(b_step(D, V, rho)), rho


def test_support_search_equals_the_papers_iteration_on_whole_matrices():
    """The support search runs on slices of rows with one state matrix (R = B + V / rho and its mask) and takes
    Wn from W instead of Wn Hn: the same iteration as the paper's on whole matrices (float64 reference above),
    for a layer of four row slices: the same support and the same final rho after three penalty updates."""
    from conftest import correlated_inputs, generator, stats_of

    X = correlated_inputs(n=512, d=32, seed=5)
    W = torch.randn(100, 32, generator=generator(6))
    H = stats_of(X).hessian_mean()
    info = {}
    got, mask = alps_solve(W, H, 0.6, max_iters=9, min_iters=30, pcg_iters=500, pcg_rtol=1e-10, info=info)
    want_mask, want_rho = _reference_support(W, damped(H, 0.01), 0.6, 0.1, 9)
    assert info["iters"] == 9 and info["restarts"] == 0 and info["rho"] == pytest.approx(want_rho, rel=1e-12)
    assert torch.equal(mask, want_mask)
    Hd = damped(H, 0.01)
    assert torch.allclose(got.double(), brute_force_optimum(W, Hd, mask), atol=2e-4, rtol=1e-3)


def test_keep_b_returns_the_last_iterations_b():
    """``keep_b``: the support is the projection of the last iteration's B (the paper's reference above, without
    its extra B-step), not of one more B-step."""
    from conftest import correlated_inputs, generator, stats_of
    import prunekit.methods.alps as alps

    X = correlated_inputs(n=512, d=32, seed=5)
    W = torch.randn(100, 32, generator=generator(6))
    H = stats_of(X).hessian_mean()
    got, mask = alps_solve(W, H, 0.6, max_iters=9, min_iters=30, pcg_iters=500, pcg_rtol=1e-10, keep_b=True)
    P = alps.solver_problem(W, H, None, 0.01, "ALPS")
    B, m, _ = alps.admm_support(W, P, 0.6, None, max_iters=8, min_iters=30)  # its final B-step is the 9th B
    assert torch.equal(mask, m)
