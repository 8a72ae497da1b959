"""The score metrics on small random layers: RIA against a brute-force loop, STADE (and its bias
compensation) and ACE against their formulas and against Wanda on zero-mean inputs, and metric
parameters bound by prunekit.core.metric.configured_metric."""
from __future__ import annotations

import math

import pytest
import torch

from prunekit.core.masks import make_mask
from prunekit.core.metric import get_metric
from prunekit.methods.ace import ace, ace_terms
from prunekit.methods.ria import ria
from prunekit.methods.sparsegpt import sparsegpt_solve
from prunekit.methods.stade import stade, stade_bias_update

from conftest import correlated_inputs, correlated_layer, generator, stats_of


@pytest.fixture(scope="module")
def layer():
    return correlated_layer()


def test_ria_matches_brute_force():
    g = generator(6)
    W = torch.randn(4, 6, generator=g)
    X = torch.randn(50, 6, generator=g)
    st = stats_of(X, needs=("sq_sum",))
    got = ria(W, st)
    exp = torch.zeros(4, 6)
    for i in range(4):
        for j in range(6):
            col = sum(abs(float(W[k, j])) for k in range(4))
            row = sum(abs(float(W[i, k])) for k in range(6))
            norm = math.sqrt(sum(float(X[t, j]) ** 2 for t in range(50)))
            exp[i, j] = (abs(float(W[i, j])) / col + abs(float(W[i, j])) / row) * norm ** 0.5
    assert torch.allclose(got, exp, rtol=1e-5, atol=1e-7)
    m = get_metric("ria")
    assert m.group == "row" and m.needs == frozenset({"sq_sum"})


def test_ria_zero_column_no_nan():
    W = torch.randn(4, 6, generator=generator(7))
    W[:, 2] = 0
    W[1] = 0
    st = stats_of(torch.randn(20, 6, generator=generator(8)), needs=("sq_sum",))
    s = ria(W, st)
    assert torch.isfinite(s).all() and (s[:, 2] == 0).all() and (s[1] == 0).all()


def test_stade_ranks_like_wanda_on_zero_mean_inputs():
    Y = correlated_inputs(n=1024, d=128, seed=9, mean=1.5)
    X = torch.cat([Y, -Y])  # exactly zero-mean features
    W = torch.randn(64, 128, generator=generator(10))
    st = stats_of(X, needs=("sq_sum", "sum"))
    wanda = get_metric("wanda").score(W, st)
    for pattern, s in ((None, 0.5), (None, 0.7), ((2, 4), 0.5)):
        assert torch.equal(make_mask(stade(W, st), s, pattern, "row"), make_mask(wanda, s, pattern, "row"))
    # not a tautology: with the non-zero-mean half alone the rankings differ
    st_y = stats_of(Y, needs=("sq_sum", "sum"))
    assert not torch.equal(make_mask(stade(W, st_y), 0.5, None, "row"),
                           make_mask(get_metric("wanda").score(W, st_y), 0.5, None, "row"))


def test_stade_bias_compensation_keeps_mean_output():
    g = generator(11)
    X = correlated_inputs(n=2048, d=64, seed=12) + 3.0 * torch.rand(64, generator=g)  # non-zero means
    W = torch.randn(32, 64, generator=g)
    b = torch.randn(32, generator=g)
    st = stats_of(X, needs=("sq_sum", "sum"))
    m = get_metric("stade")
    assert m.bias_update is stade_bias_update
    mask = make_mask(m.score(W, st), 0.5, None, "row")
    delta = m.bias_update(W, mask, st)  # from the dense weights, before zeroing
    W_pruned = W * ~mask
    dense_mean = (X.double() @ W.double().T + b.double()).mean(0)
    comp_mean = (X.double() @ W_pruned.double().T + b.double() + delta.double()).mean(0)
    uncomp_mean = (X.double() @ W_pruned.double().T + b.double()).mean(0)
    scale = float(dense_mean.abs().max())
    assert float((comp_mean - dense_mean).abs().max()) < 1e-4 * scale
    assert float((uncomp_mean - dense_mean).abs().max()) > 0.1 * scale  # the correction matters here
    # the published code's order: zero first, then compute the correction -> it is zero, mean not kept
    delta_after = m.bias_update(W_pruned, mask, st)
    assert float(delta_after.abs().max()) == 0.0
    bug_mean = (X.double() @ W_pruned.double().T + b.double() + delta_after.double()).mean(0)
    assert float((bug_mean - dense_mean).abs().max()) > 0.1 * scale


def test_ace_formula_and_zero_mean_equivalence():
    Y = correlated_inputs(n=512, d=64, seed=13, mean=2.0)
    W = torch.randn(32, 64, generator=generator(14))
    st = stats_of(Y, needs=("sq_sum", "sum"))
    n = st.count
    e2 = (Y.double() ** 2).mean(0)
    var = Y.double().var(0)
    W2 = W.double() ** 2
    r = W2 @ e2
    R = r.sum()
    exp = W2 / R * ((1 - r / R)[:, None] / 2 * e2[None, :] + 0.5 * var[None, :])
    assert torch.allclose(ace(W, st).double(), exp, rtol=1e-4)
    assert n == 512 and get_metric("ace").needs == frozenset({"sq_sum", "sum"})
    # on zero-mean inputs ACE ranks exactly like Wanda; on shifted inputs it does not
    X = torch.cat([Y, -Y])
    st0 = stats_of(X, needs=("sq_sum", "sum"))
    assert torch.equal(make_mask(ace(W, st0), 0.5, None, "row"),
                       make_mask(get_metric("wanda").score(W, st0), 0.5, None, "row"))
    assert not torch.equal(make_mask(ace(W, st), 0.5, None, "row"),
                           make_mask(get_metric("wanda").score(W, st), 0.5, None, "row"))


def test_ace_cosine_term_tracks_measured_cosine_loss():
    """The cosine term C_ij predicts the measured mean 1 - cos(y, y') of removing single weights."""
    g = generator(15)
    X = torch.randn(512, 32, generator=g) * (0.2 + 2 * torch.rand(32, generator=g))  # independent features
    W = torch.randn(16, 32, generator=g)
    W[0] *= 4  # one dominant row: output directions far from isotropic
    st = stats_of(X, needs=("sq_sum", "sum"))
    C, _ = ace_terms(W, st)
    Xd, Wd = X.double(), W.double()
    Y = Xd @ Wd.T  # (t, i)
    yy = (Y * Y).sum(1)  # |y_t|^2
    dY = Wd[None, :, :] * Xd[:, None, :]  # removed contribution W_ij x_tj, (t, i, j)
    dot = yy[:, None, None] - dY * Y[:, :, None]
    n2 = yy[:, None, None] - 2 * dY * Y[:, :, None] + dY ** 2
    loss = (1 - dot / (yy.sqrt()[:, None, None] * n2.clamp_min(1e-30).sqrt())).mean(0)
    rank = lambda t: t.flatten().argsort().argsort().double()
    rc, rl = rank(C), rank(loss)
    spearman = float(((rc - rc.mean()) * (rl - rl.mean())).sum() / ((rc - rc.mean()).norm() * (rl - rl.mean()).norm()))
    assert spearman > 0.9, spearman


def test_configured_metric_binds_parameters(layer):
    from prunekit.core.metric import configured_metric

    W, X, st = layer
    assert torch.equal(configured_metric("ria", {"alpha": 2.0}).score(W, st), ria(W, st, alpha=2.0))
    assert not torch.equal(configured_metric("ria", {"alpha": 2.0}).score(W, st), ria(W, st))
    assert torch.equal(configured_metric("ace", {"lam": 3}).score(W, st), ace(W, st, lam=3.0))
    assert configured_metric("ria") is get_metric("ria")  # no parameters: the registered metric itself
    Wa, ma = configured_metric("sparsegpt", {"percdamp": 0.5}).solver(W, st, 0.5)
    Wb, mb = sparsegpt_solve(W, st.hessian_mean(), 0.5, percdamp=0.5)
    assert torch.equal(ma, mb) and torch.allclose(Wa, Wb, atol=1e-5)
