"""ADMM (prunekit.methods.admm): the fixed-mask update reaches the brute-force least-squares optimum (unstructured,
N:M, unequal row counts), the gradual mask's exact counts and patterns, the layer error against SparseGPT,
robustness, the engine adapter's cache, and --reconstruct admm through the engine."""
from __future__ import annotations

import logging

import pytest
import torch

import prunekit
from prunekit.core.errors import PrunekitError
from prunekit.core.families import block_linears, weight_view
from prunekit.core.masks import make_mask, unpack_mask
from prunekit.core.metric import get_metric
from prunekit.methods.admm import ADMMParams, admm_solve
from prunekit.methods.sparsegpt import sparsegpt_solve

from conftest import (brute_force_optimum, damped, generator, objective, stats_of,
                      tiny_model)


@pytest.mark.parametrize("kind", ["rows", "2:4", "unequal"])
def test_fixed_mask_update_is_the_least_squares_optimum(lsq_small, kind):
    W, X, st = lsq_small
    H = st.hessian_mean()
    score = W.abs() * X.norm(dim=0)
    if kind == "rows":
        mask = make_mask(score, 0.7, None, "row")
    elif kind == "2:4":
        mask = make_mask(score, 0.5, (2, 4), "row")
    else:  # a per-layer mask: every row a different count (TRIM, global comparison)
        mask = make_mask(score, 0.6, None, "layer")
        assert len(set(mask.sum(1).tolist())) > 1
    got, m = admm_solve(W, H, mask=mask, iters=2000, percdamp=0.01)
    assert torch.equal(m, mask) and torch.equal(got[mask], torch.zeros(int(mask.sum())))
    Hd = damped(H, 0.01)
    want = brute_force_optimum(W, Hd, mask)
    assert torch.allclose(got.double(), want, atol=2e-4, rtol=1e-3)
    assert objective(W, got, Hd) == pytest.approx(objective(W, want, Hd), rel=1e-6)


def test_fixed_mask_iterates_on_slices_of_rows():
    """On a fixed mask the rows are iterated on max(32, in / 8) at a time (memory): a 100-row layer takes four
    slices, the last of 4 rows, and every row still reaches its brute-force optimum; tol stops each slice."""
    from conftest import correlated_inputs

    X = correlated_inputs(n=512, d=32, seed=5)
    W = torch.randn(100, 32, generator=generator(6))
    H = stats_of(X).hessian_mean()
    mask = make_mask(W.abs() * X.norm(dim=0), 0.6, None, "layer")
    Hd = damped(H, 0.01)
    want = brute_force_optimum(W, Hd, mask)
    for tol in (0.0, 1e-9):
        got, m = admm_solve(W, H, mask=mask, iters=2000, tol=tol)
        assert torch.equal(m, mask) and not got[mask].any()
        assert torch.allclose(got.double(), want, atol=2e-4, rtol=1e-3)


def test_default_iterations_are_close_to_the_optimum(lsq_layer):
    W, X, st = lsq_layer
    H = st.hessian_mean()
    mask = make_mask(W.abs() * X.norm(dim=0), 0.7, None, "row")
    Hd = damped(H, 0.01)
    best = objective(W, brute_force_optimum(W, Hd, mask), Hd)
    got, _ = admm_solve(W, H, mask=mask)
    sg, _ = sparsegpt_solve(W, H, mask=mask)
    assert objective(W, got, Hd) < 1.01 * best < objective(W, sg, Hd)


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_gradual_mask_counts_and_pattern(lsq_layer, pattern):
    W, X, st = lsq_layer
    got, mask = admm_solve(W, st.hessian_mean(), 0.6, pattern=pattern)
    if pattern is None:
        assert int(mask.sum()) == int(0.6 * W.numel())
    else:
        assert torch.equal(mask.reshape(64, -1, 4).sum(2), torch.full((64, 32), 2))
    assert torch.equal(got[mask], torch.zeros(int(mask.sum())))


def test_gradual_mask_with_row_ratios(lsq_layer):
    W, X, st = lsq_layer
    ratios = torch.linspace(0.3, 0.8, 64)
    _, mask = admm_solve(W, st.hessian_mean(), ratios)
    assert torch.equal(mask.sum(1), torch.floor(ratios.double() * 128).long())


def test_gradual_beats_sparsegpt_on_the_layer_error(lsq_layer):
    W, X, st = lsq_layer
    H = st.hessian_mean()
    Hd = damped(H, 0.01)
    for s in (0.5, 0.7):
        got, _ = admm_solve(W, H, s)
        sg, _ = sparsegpt_solve(W, H, s)
        assert objective(W, got, Hd) < objective(W, sg, Hd)


def test_nothing_to_prune_returns_the_weight(lsq_small):
    W, X, st = lsq_small
    got, mask = admm_solve(W, st.hessian_mean(), 0.0)
    assert torch.equal(got, W) and not bool(mask.any())


def test_never_nan_on_bad_hessians(lsq_small, caplog):
    W, X, st = lsq_small
    H = st.hessian_mean()
    bad = H - 10 * float(H.diagonal().max()) * torch.eye(32)  # indefinite
    nanH = H.clone()
    nanH[1, 2] = float("nan")
    with caplog.at_level(logging.WARNING):
        for h in (bad, nanH, torch.zeros(32, 32)):
            got, mask = admm_solve(W, h, 0.5, max_damp_tries=2)
            assert torch.isfinite(got).all() and int(mask.sum()) == W.numel() // 2
    Wnan = W.clone()
    Wnan[0, 0] = float("nan")
    got, _ = admm_solve(Wnan, H, 0.5)
    assert torch.isfinite(got).all()


def test_parameters_are_checked(lsq_small):
    W, X, st = lsq_small
    with pytest.raises(PrunekitError, match="iters must be >= 1"):
        admm_solve(W, st.hessian_mean(), 0.5, iters=0)
    with pytest.raises(PrunekitError, match="rho must be > 0"):
        ADMMParams.check({"rho": 0}, "reconstruct_params", "admm")
    with pytest.raises(PrunekitError, match="needs the layer Hessian"):
        get_metric("admm").solver(W, stats_of(X, needs=("sq_sum",)), 0.5)


def test_reconstruct_admm_keeps_the_metric_mask_and_lowers_the_error():
    """Through the engine: Wanda's masks, the weights rewritten (not just zeroed), exact sparsity."""
    model = tiny_model("llama")
    dense = {n: weight_view(m).detach().clone() for d in block_linears(model) for n, m in d.items()}
    ids = torch.randint(0, 128, (6, 24), generator=generator(1))
    ref = tiny_model("llama")
    rep_w = prunekit.prune(ref, None, {"metric": "wanda", "sparsity": 0.6, "nsamples": 6, "seqlen": 24},
                           calib_ids=ids)
    rep = prunekit.prune(model, None, {"metric": "wanda", "sparsity": 0.6, "nsamples": 6, "seqlen": 24,
                                       "reconstruct": "admm"}, calib_ids=ids)
    assert rep["method"]["reconstruct"] == "admm" and rep["method"]["reconstruct_params"]["iters"] == 20
    first = "model.layers.0.self_attn.q_proj"  # the first layer sees the same inputs in both runs
    assert torch.equal(unpack_mask(rep.masks[first], dense[first].shape),
                       unpack_mask(rep_w.masks[first], dense[first].shape))
    Wq = weight_view(dict(model.named_modules())[first])
    kept = ~unpack_mask(rep.masks[first], dense[first].shape)
    assert not torch.equal(Wq[kept], dense[first][kept])
    assert rep["overall_sparsity"] == pytest.approx(rep_w["overall_sparsity"], abs=1e-12)


def test_gradual_mask_equals_the_papers_iteration_on_whole_matrices():
    """The gradual ADMM runs on slices of rows with one state matrix (T = V + U) and takes Wn from W instead of
    Wn Hn: the same iteration as the paper's on whole matrices (a float64 reference: V, U, Z and Wn Hn, the mask
    the lowest |V + U| of the layer on the cubic schedule), for a layer of four row slices."""
    from conftest import correlated_inputs

    X = correlated_inputs(n=512, d=32, seed=5)
    W = torch.randn(100, 32, generator=generator(6))
    H = stats_of(X).hessian_mean()
    s, rho, iters, steps = 0.6, 1.0, 12, 8
    got, mask = admm_solve(W, H, s, rho=rho, iters=iters, gradual=steps)

    Hd = damped(H, 0.01)
    d = Hd.diagonal().sqrt()
    Hn = Hd / d[:, None] / d[None, :]
    Wn = W.double() * d
    XY, Ainv = Wn @ Hn, torch.linalg.inv(Hn + rho * torch.eye(32, dtype=torch.float64))
    V, U = Wn.clone(), torch.zeros_like(Wn)
    for t in range(iters):
        if t < steps:
            k = int(W.numel() * (s * (1.0 - (1.0 - (t + 1) / steps) ** 3)))
            order = torch.from_numpy((V + U).abs().flatten().numpy().argsort(kind="stable"))
            m = torch.zeros(W.numel(), dtype=torch.bool)
            m[order[:k]] = True
            m = m.view(W.shape)
        Z = (V + U).masked_fill(m, 0.0)
        U = U + V - Z
        V = (XY + rho * (Z - U)) @ Ainv
    want = (V + U).masked_fill(m, 0.0) / d
    assert torch.equal(mask, m)
    assert torch.allclose(got.double(), want, atol=1e-4, rtol=1e-4)
