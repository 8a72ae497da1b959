"""SparseGPT (prunekit.methods.sparsegpt) on small random layers: the OBS solver against Wanda and against
a textbook column-by-column sweep, N:M and per-row ratios, fixed masks, singular and indefinite Hessians,
the upper factor of H^-1, the sweep methods; and through the engine: one factor per shared Hessian, the
triangular sweep, and reconstruction under another metric's mask."""
from __future__ import annotations

import logging
import math

import pytest
import torch

import prunekit
from prunekit.core.errors import PrunekitError
from prunekit.core.families import block_linears, weight_view
from prunekit.core.masks import make_mask, unpack_mask
from prunekit.core.metric import get_metric
from prunekit.methods.sparsegpt import sparsegpt_solve

from conftest import correlated_inputs, correlated_layer, generator, stats_of, tiny_model


def rel_err(W, Wp, X):
    Y = X @ W.T
    return float((Y - X @ Wp.T).norm() / Y.norm())


@pytest.fixture(scope="module")
def layer():
    return correlated_layer()


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_sparsegpt_beats_wanda_reconstruction(layer, pattern):
    W, X, st = layer
    wanda_mask = make_mask(get_metric("wanda").score(W, st), 0.5, pattern, "row")
    W_sg, mask = sparsegpt_solve(W, st.hessian_mean(), 0.5, pattern=pattern)
    e_wanda, e_sg = rel_err(W, W * ~wanda_mask, X), rel_err(W, W_sg, X)
    assert e_sg < 0.75 * e_wanda, (e_sg, e_wanda)
    # same density
    assert int((W_sg == 0).sum()) == int(wanda_mask.sum()) == W.numel() // 2


def test_sparsegpt_solver_adapter_and_registration(layer):
    W, X, st = layer
    m = get_metric("sparsegpt")
    assert m.score is None and m.solver is not None and m.needs == frozenset({"hessian"})
    W1, mask1 = m.solver(W, st, 0.5, None, None)
    W2, mask2 = sparsegpt_solve(W, st.hessian_mean(), 0.5)
    assert torch.equal(W1, W2) and torch.equal(mask1, mask2)
    with pytest.raises(PrunekitError):
        m.solver(W, stats_of(X, needs=("sq_sum",)), 0.5, None, None)


def test_sparsegpt_does_not_modify_inputs(layer):
    W, X, st = layer
    W0, H = W.clone(), st.hessian_mean()
    H0 = H.clone()
    sparsegpt_solve(W, H, 0.5)
    assert torch.equal(W, W0) and torch.equal(H, H0)


def test_sparsegpt_overwrite_h_gives_the_same_result(layer):
    """The engine's adapter lets the solver damp its fresh hessian_mean() in place (memory): same answer,
    also on the damping-retry and diagonal-fallback paths."""
    W, X, st = layer
    g = generator(6)
    B = torch.randn(W.shape[1], W.shape[1], generator=g)
    indefinite = B @ B.T / W.shape[1]
    indefinite -= (torch.linalg.eigvalsh(indefinite)[0] + 0.5) * torch.eye(W.shape[1])
    for H, kw in ((st.hessian_mean(), {}), (indefinite, {}), (indefinite, {"max_damp_tries": 1}),
                  (st.hessian_mean(), {"pattern": (2, 4)})):
        ref_W, ref_m = sparsegpt_solve(W, H, 0.5, **kw)
        H0 = H.clone()
        sparsegpt_solve(W, H, 0.5, **kw)
        assert torch.equal(H, H0)  # default: H untouched
        got_W, got_m = sparsegpt_solve(W, H.clone(), 0.5, overwrite_h=True, **kw)
        assert torch.equal(got_W, ref_W) and torch.equal(got_m, ref_m)


def test_sparsegpt_zero_sparsity_is_identity(layer):
    W, X, st = layer
    W_sg, mask = sparsegpt_solve(W, st.hessian_mean(), 0.0)
    assert torch.allclose(W_sg, W) and not mask.any()
    # the sweep itself is also the identity when nothing is pruned (fixed empty mask)
    W_sg, mask = sparsegpt_solve(W, st.hessian_mean(), 0.0, mask=torch.zeros_like(W, dtype=torch.bool))
    assert torch.allclose(W_sg, W, atol=1e-6) and not mask.any()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_sparsegpt_nm_pattern_holds(layer, n, m):
    W, X, st = layer
    W_sg, mask = sparsegpt_solve(W, st.hessian_mean(), 0.5, pattern=(n, m), blocksize=48)  # 48 % 8 != 0
    zeros = (W_sg == 0).reshape(W.shape[0], -1, m)
    assert (zeros.sum(-1) == n).all()  # exactly N zeros in every group of every row, after the updates
    assert torch.equal(mask, W_sg == 0)


@pytest.mark.parametrize("s", [0.3, 0.5, 0.7])
def test_sparsegpt_exact_layer_sparsity(layer, s):
    W, X, st = layer
    W_sg, mask = sparsegpt_solve(W, st.hessian_mean(), s, blocksize=32)
    assert int(mask.sum()) == int(W.numel() * s)
    assert int((W_sg == 0).sum()) == int(W.numel() * s)
    assert torch.equal(mask, W_sg == 0)


def test_sparsegpt_per_row_ratios(layer):
    W, X, st = layer
    ratios = torch.linspace(0.1, 0.8, W.shape[0])
    W_sg, mask = sparsegpt_solve(W, st.hessian_mean(), ratios, blocksize=40)
    expect = torch.floor(ratios.double() * W.shape[1]).long()
    assert torch.equal(mask.sum(1), expect)
    assert torch.equal((W_sg == 0).sum(1), expect)


def test_sparsegpt_fixed_mask_is_respected_and_helps(layer):
    W, X, st = layer
    fixed = make_mask(get_metric("wanda").score(W, st), 0.5, None, "row")
    W_sg, mask = sparsegpt_solve(W, st.hessian_mean(), 0.9, pattern=(2, 4), mask=fixed)  # mask wins
    assert torch.equal(mask, fixed)
    assert torch.equal(W_sg == 0, fixed)  # pruned exactly there, nowhere else
    assert rel_err(W, W_sg, X) < 0.8 * rel_err(W, W * ~fixed, X)  # OBS updates reduce the error
    # lazy batch updates are exact: with a fixed mask the block size does not change the result
    W_small, _ = sparsegpt_solve(W, st.hessian_mean(), 0.5, mask=fixed, blocksize=16)
    assert torch.allclose(W_small, W_sg, atol=1e-4, rtol=1e-4)


def _naive_obs(W, U, mask=None, nm=None, s=None, blocksize=128):
    """Textbook OBS sweep in float64, one column at a time with the full factor U (no lazy block updates,
    no transposed layout): the reference for ``_sweep``'s fast path."""
    W = W.clone()
    rows, cols = W.shape
    d = U.diagonal()
    M = torch.zeros(rows, cols, dtype=torch.bool) if mask is None else mask.clone()
    for j in range(cols):
        if mask is None and nm is not None and j % nm[1] == 0:
            sc = W[:, j:j + nm[1]] ** 2 / d[j:j + nm[1]] ** 2
            M[:, j:j + nm[1]].scatter_(1, sc.argsort(dim=1, stable=True)[:, :nm[0]], True)
        elif mask is None and nm is None and j % blocksize == 0 and isinstance(s, torch.Tensor):  # per-row ratios
            j2 = min(j + blocksize, cols)
            sc = W[:, j:j2] ** 2 / d[j:j2] ** 2
            for r in range(rows):
                k = int(math.floor(float(s[r]) * j2)) - int(math.floor(float(s[r]) * j))
                M[r, j:j2] = False
                M[r, j + sc[r].argsort(stable=True)[:k]] = True
        elif mask is None and nm is None and j % blocksize == 0:
            j2 = min(j + blocksize, cols)
            sc = (W[:, j:j2] ** 2 / d[j:j2] ** 2).reshape(-1)
            k = int(s * rows * j2) - int(s * rows * j)
            blk = torch.zeros(sc.numel(), dtype=torch.bool)
            blk[sc.argsort(stable=True)[:k]] = True
            M[:, j:j2] = blk.reshape(rows, j2 - j)
        err = torch.where(M[:, j], W[:, j], 0.0) / d[j]
        W[:, j:] -= err[:, None] * U[j, j:][None, :]
    W[M] = 0.0
    return W, M


@pytest.mark.parametrize("method", ["columns", "triangular"])
@pytest.mark.parametrize("mode", ["fixed", "nm", "unstructured", "rows"])
@pytest.mark.parametrize("blocksize", [16, 40, 128])  # 40: sub-blocks of 16 (32) that do not divide the block
def test_sparsegpt_sweep_matches_naive_column_by_column_obs(layer, mode, blocksize, method):
    """Both within-block methods (the column loop, and the per-row triangular solve that GPUs use)
    reproduce the textbook sweep: same mask, same weights to float64 rounding."""
    from prunekit.methods.sparsegpt import _sweep, inverse_cholesky_upper

    W, X, st = layer
    W, H = W.double(), st.hessian_mean().double()
    U = inverse_cholesky_upper(H.clone())
    fixed = make_mask(get_metric("wanda").score(W.float(), st), 0.5, None, "row") if mode == "fixed" else None
    nm = (2, 4) if mode == "nm" else None
    s = torch.linspace(0.1, 0.8, W.shape[0], dtype=torch.float64)[torch.randperm(W.shape[0], generator=generator(5))] if mode == "rows" else 0.5
    ref_W, ref_M = _naive_obs(W, U, fixed, nm, s, blocksize)
    got_W = W.clone()
    got_M = _sweep(got_W, U, s, nm, fixed, blocksize, method)
    assert torch.equal(got_M, ref_M)
    assert torch.equal(got_W == 0, ref_M)  # exact zeros where pruned, nowhere else
    assert torch.allclose(got_W, ref_W, atol=1e-10, rtol=1e-10)


def _assert_clean(W_sg, mask, W, s):
    assert torch.isfinite(W_sg).all()
    assert int(mask.sum()) == int(W.numel() * s)
    assert (W_sg[mask] == 0).all()


def test_sparsegpt_singular_hessian_dead_and_duplicated_features():
    g = generator(3)
    X = torch.randn(512, 8, generator=g) @ torch.randn(8, 64, generator=g)  # rank 8 in 64 features
    X[:, 5] = X[:, 6]  # duplicated feature
    X[:, 10:14] = 0  # dead features
    W = torch.randn(32, 64, generator=g)
    st = stats_of(X)
    for pattern in (None, (2, 4)):
        W_sg, mask = sparsegpt_solve(W, st.hessian_mean(), 0.5, pattern=pattern)
        _assert_clean(W_sg, mask, W, 0.5)
        assert (W_sg[:, 10:14] == 0).all()  # dead columns zeroed
        assert rel_err(W, W_sg, X) < rel_err(W, W * ~make_mask(W.abs(), 0.5, pattern, "row"), X)


def test_sparsegpt_cholesky_failure_raises_damping(caplog):
    g = generator(4)
    B = torch.randn(64, 64, generator=g)
    H = B @ B.T / 64
    H -= (torch.linalg.eigvalsh(H)[0] + 0.5) * torch.eye(64)  # indefinite: smallest eigenvalue -0.5
    assert float(torch.linalg.eigvalsh(H)[0]) < 0 and (H.diagonal() > 0).all()
    W = torch.randn(16, 64, generator=g)
    with caplog.at_level(logging.WARNING, logger="prunekit.methods.sparsegpt"):
        W_sg, mask = sparsegpt_solve(W, H, 0.5)
    _assert_clean(W_sg, mask, W, 0.5)
    assert "Cholesky failed" in caplog.text and "succeeded with damping" in caplog.text


def test_sparsegpt_diagonal_fallback(caplog):
    g = generator(5)
    X = torch.randn(256, 4, generator=g) @ torch.randn(4, 32, generator=g)
    H = stats_of(X).hessian_mean()
    H -= 10 * H.diagonal().mean() * torch.eye(32)  # hopeless for a single damping try
    H.diagonal().clamp_(min=1e-3)
    W = torch.randn(8, 32, generator=g)
    with caplog.at_level(logging.WARNING, logger="prunekit.methods.sparsegpt"):
        W_sg, mask = sparsegpt_solve(W, H, 0.5, pattern=(2, 4), max_damp_tries=1)
    assert "diagonal Hessian" in caplog.text
    assert torch.isfinite(W_sg).all() and ((W_sg == 0).reshape(8, -1, 4).sum(-1) == 2).all()
    # non-finite Hessian, and an all-zero one (every feature dead): no crash, no NaN
    Hbad = H.clone()
    Hbad[3, 7] = float("nan")
    for Hx in (Hbad, torch.zeros(32, 32)):
        W_sg, mask = sparsegpt_solve(W, Hx, 0.5)
        assert torch.isfinite(W_sg).all() and int(mask.sum()) == W.numel() // 2


def test_sparsegpt_rejects_bad_arguments(layer):
    W, X, st = layer
    H = st.hessian_mean()
    with pytest.raises(PrunekitError):
        sparsegpt_solve(W, H, 1.0)
    with pytest.raises(PrunekitError):
        sparsegpt_solve(W, H[:10, :10], 0.5)
    with pytest.raises(PrunekitError):
        sparsegpt_solve(W[:, :126], H[:126, :126], 0.5, pattern=(2, 4))
    with pytest.raises(PrunekitError, match="sweep"):
        sparsegpt_solve(W, H, 0.5, sweep="rows")


def test_all_finite_sees_nan_and_both_infinities():
    from prunekit.core.lsq import all_finite as _all_finite

    for bad in (float("nan"), float("inf"), float("-inf")):
        t = torch.randn(9, 7, generator=generator(2))
        t[4, 5] = bad
        assert not _all_finite(t), bad
    assert not _all_finite(torch.full((3, 3), float("nan")))
    assert _all_finite(torch.randn(9, 7, generator=generator(2))) and _all_finite(torch.empty(0, 4))


@pytest.mark.parametrize("n", [5, 16, 17, 100, 203])
def test_upper_factor_of_inverse_matches_the_textbook_chain(n, monkeypatch):
    """U = J L^-1 J (L: Cholesky factor of the reversed matrix, inverted by recursive halving) is the
    upper Cholesky factor of H^-1: equal in float64 to Cholesky -> inverse -> upper Cholesky."""
    from prunekit.methods import sparsegpt as sg

    monkeypatch.setattr(sg, "INVERSE_BASE", 4)  # deep recursion, odd halves and
    monkeypatch.setattr(sg, "INVERSE_CHUNK", 3)  # several column chunks at these small sizes
    X = torch.randn(3 * n, n, generator=generator(7), dtype=torch.float64) @ torch.randn(n, n, generator=generator(8),
                                                                                       dtype=torch.float64)
    H = X.t() @ X + 1e-3 * torch.eye(n, dtype=torch.float64)
    H0 = H.clone()
    prec = torch.get_float32_matmul_precision()
    U = sg._upper_factor_of_inverse(H)
    assert torch.equal(H, H0)  # not modified
    assert torch.get_float32_matmul_precision() == prec  # restored
    ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    assert torch.equal(U, U.triu()) and bool((U.diagonal() > 0).all())
    assert torch.allclose(U, ref, rtol=1e-8, atol=1e-10 * float(ref.abs().max()))
    assert torch.allclose(U.t() @ U @ H, torch.eye(n, dtype=torch.float64), atol=1e-6)
    H[0, 0] = -1.0  # not positive definite: None, not an error
    assert sg._upper_factor_of_inverse(H) is None


def test_sparsegpt_sweep_method_per_device_and_parameter(layer, monkeypatch):
    from prunekit.methods import sparsegpt as sg
    from prunekit.methods.sparsegpt import sweep_method

    calls = []
    real = sg._block_triangular
    monkeypatch.setattr(sg, "_block_triangular", lambda *a: calls.append(1) or real(*a))
    assert sweep_method("cpu") == "columns" and sweep_method("cuda") == "triangular"
    assert sweep_method(torch.device("cuda", 0)) == "triangular"
    W, X, st = layer  # the parameter reaches the solver (one triangular block per 128 columns)
    sparsegpt_solve(W, st.hessian_mean(), 0.5, sweep="triangular")
    assert len(calls) == 1
    sparsegpt_solve(W, st.hessian_mean(), 0.5)  # auto on the CPU: the column loop
    assert len(calls) == 1
    with pytest.raises(PrunekitError, match="sweep must be 'auto', 'columns' or 'triangular', got 'fast'"):
        sparsegpt_solve(W, st.hessian_mean(), 0.5, sweep="fast")


def test_sparsegpt_adapter_factors_only_when_something_is_pruned(monkeypatch):
    """The engine's adapter computes H's factor lazily: not at all when the ratio prunes no weight, once
    for several layers sharing the statistics; a factor of the wrong size is refused."""
    from prunekit.methods import sparsegpt as sg

    X = correlated_inputs(n=512, d=32)
    st = stats_of(X, needs={"hessian"})
    W = torch.randn(8, 32, generator=generator(1))
    calls = []
    real = sg.factor_hessian
    monkeypatch.setattr(sg, "factor_hessian", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    Wn, mask = sg.sparsegpt_solver(W, st, 0.001)  # int(0.001 * 256) == 0 weights
    assert not calls and not mask.any() and torch.equal(Wn, W)
    sg.sparsegpt_solver(W, st, 0.5)
    sg.sparsegpt_solver(W * 2, st, 0.5)
    assert len(calls) == 1
    with pytest.raises(PrunekitError, match="factor shape"):
        sg.sparsegpt_solve(torch.randn(8, 16), None, 0.5, factor=st.cache[next(iter(st.cache))])


@pytest.mark.parametrize("mode", [{}, {"batch_size": 2}], ids=["single-pass", "stages"])
def test_sparsegpt_factors_each_shared_hessian_once(calib_ids, mode, monkeypatch):
    """q/k/v and gate/up share one factor of H^-1 (4 factorisations per LLaMA block, not 7); the
    result is bit-identical to factoring every layer's Hessian itself (cache emptied before each)."""
    from prunekit.methods import sparsegpt as sg

    cfg = dict({"metric": "sparsegpt", "sparsity": 0.5}, **mode)
    a, b = tiny_model("llama"), tiny_model("llama")
    calls = []
    real = sg.factor_hessian
    monkeypatch.setattr(sg, "factor_hessian", lambda *args, **kw: (calls.append(1), real(*args, **kw))[1])
    import dataclasses

    from prunekit.core.metric import METRICS

    real_solver = sg.sparsegpt_solver
    seen = []

    def recorded(W, stats, *args, **kw):
        seen.append(stats)
        return real_solver(W, stats, *args, **kw)

    def uncached(W, stats, *args, **kw):
        stats.cache.clear()
        return real_solver(W, stats, *args, **kw)

    monkeypatch.setitem(METRICS, "sparsegpt", dataclasses.replace(METRICS["sparsegpt"], solver=recorded))
    ra = prunekit.prune(a, None, cfg, calib_ids=calib_ids)
    assert len(calls) == 4 * len(block_linears(a))
    assert len(seen) == 7 * len(block_linears(a)) and not any(st.cache for st in seen)  # factors released
    monkeypatch.setitem(METRICS, "sparsegpt", dataclasses.replace(METRICS["sparsegpt"], solver=uncached))
    rb = prunekit.prune(b, None, cfg, calib_ids=calib_ids)
    assert len(calls) == 4 * len(block_linears(a)) + 7 * len(block_linears(b))
    for n in ra.masks:
        assert torch.equal(ra.masks[n], rb.masks[n]), n
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


@pytest.mark.parametrize("cfg", [{"metric": "sparsegpt", "sparsity": 0.5},
                                 {"metric": "wanda", "sparsity": 0.6, "rowwise": "trim", "reconstruct": "sparsegpt"},
                                 {"metric": "sparsegpt", "sparsity": 0.5, "pattern": "2:4"}],
                         ids=["unstructured", "trim-mask-reconstructed", "2:4"])
def test_sparsegpt_triangular_sweep_prunes_like_the_column_loop(calib_ids, cfg):
    """The engine with the sweep GPUs use (per-row triangular solves; asked for here on the CPU) gives the
    CPU's column-loop result: the same masks, weights equal up to float32 rounding."""
    out = {}
    key = "reconstruct_params" if "reconstruct" in cfg else "metric_params"
    for method in ("columns", "triangular"):
        model = tiny_model("llama")
        rep = prunekit.prune(model, None, dict(cfg, **{key: {"sweep": method}}), calib_ids=calib_ids)
        out[method] = (rep.masks, model.state_dict())
    (ma, sa), (mb, sb) = out["columns"], out["triangular"]
    assert ma.keys() == mb.keys() and all(torch.equal(ma[n], mb[n]) for n in ma)
    for k in sa:
        assert torch.allclose(sa[k], sb[k], rtol=1e-4, atol=1e-6), k


def test_reconstruct_keeps_the_metric_mask_and_lowers_error(calib_ids):
    dense = tiny_model("llama", hidden=64)
    a, b = tiny_model("llama", hidden=64), tiny_model("llama", hidden=64)
    ra = prunekit.prune(a, None, {"metric": "wanda", "sparsity": 0.5, "sequential": False}, calib_ids=calib_ids)
    rb = prunekit.prune(b, None, {"metric": "wanda", "sparsity": 0.5, "sequential": False, "reconstruct": "sparsegpt"},
                        calib_ids=calib_ids)
    # block 0 sees identical inputs in both runs, so its masks must be identical
    for n in ra.masks:
        if ".0." in n:
            assert torch.equal(ra.masks[n], rb.masks[n])
    with torch.no_grad():
        ref = dense(calib_ids).logits
        err_a = (a(calib_ids).logits - ref).pow(2).mean()
        err_b = (b(calib_ids).logits - ref).pow(2).mean()
    assert err_b < err_a
    for n, packed in rb.masks.items():
        W = weight_view(dict(b.named_modules())[n])
        m = unpack_mask(packed, W.shape)
        assert bool((W[m] == 0).all())
