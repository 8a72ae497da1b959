"""TRIM row-wise sparsity (prunekit.methods.trim): on small random layers, exact totals, bounds, never worse
than uniform, and the search against a naive reference; through the engine, exact layer totals under any
allocator, its parameters reaching the statistics (tokens_per_sample, inputs=all), and rowwise_skip."""
from __future__ import annotations

import math

import pytest
import torch

import prunekit
from prunekit.core.errors import PrunekitError
from prunekit.core.families import block_linears, weight_view
from prunekit.core.masks import make_mask, row_counts, rowwise_mask, unstructured_mask
from prunekit.core.metric import get_metric
from prunekit.core.stats import LayerStats
from prunekit.core.rowwise import ROWWISE, apply_rowwise, rowwise_needs
from prunekit.methods.trim import (counts_with_total, project_mean_box, ratios_from_counts, trim_row_sparsity,
                                   trim_update)

from conftest import tiny_model

OUT, D_IN, N = 64, 128, 256


def layer(seed=0, out=OUT, d_in=D_IN, n=N):
    """Weights with structured (log-spread, shuffled) row norms; inputs with uneven feature scales."""
    g = torch.Generator().manual_seed(seed)
    row_scale = torch.logspace(-1, 1, out)[torch.randperm(out, generator=g)]
    W = torch.randn(out, d_in, generator=g) * row_scale[:, None]
    latent = torch.randn(n, d_in // 4, generator=g)
    mix = torch.randn(d_in // 4, d_in, generator=g) / math.sqrt(d_in // 4)
    X = latent @ mix + 0.3 * torch.randn(n, d_in, generator=g)
    X = X * (0.2 + 2.0 * torch.rand(d_in, generator=g))
    return W, X


def stats_of(X, needs=("sq_sum", "last_tokens")):
    st = LayerStats(frozenset(needs), X.shape[-1])
    for part in X.chunk(4, 0):  # (batch, seq, d_in) chunks: the last token of each sample is X's row
        seq = torch.randn(part.shape[0], 3, X.shape[-1])
        seq[:, -1] = part
        st.update(seq)
    return st


def wanda_scores(W, X):
    st = LayerStats(frozenset({"sq_sum"}), X.shape[1])
    st.update(X)
    return get_metric("wanda").score(W, st)


def layer_cos(W, X, mask):
    """Cosine of the flattened outputs W X^T vs W_pruned X^T (naive, float64)."""
    Y = W.double() @ X.double().t()
    Yp = W.double().masked_fill(mask, 0) @ X.double().t()
    return float((Y * Yp).sum() / (Y.norm() * Yp.norm()))


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("target", [0.5, 0.6, 0.7])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_count_bounds_and_never_worse(seed, target, exact):
    """exact=False: TRIM on its own (total out * floor(d_in * s), the reference rule); exact=True: as the engine
    calls it under row_rounding exact, starting from the plain exact mask's counts (total floor(numel * s))."""
    W, X = layer(seed)
    S = wanda_scores(W, X)
    rows, info = trim_row_sparsity(W, S, X, target, uniform_counts=row_counts(S, target) if exact else None)
    uni_mask = unstructured_mask(S, target, "row", exact=exact)  # the engine's uniform per-row mask
    mask = rowwise_mask(S, rows)
    assert rows.shape == (OUT,) and rows.dtype == torch.float64
    # the layer's total is exactly uniform's
    total = int(OUT * D_IN * target) if exact else OUT * int(D_IN * target)
    assert int(mask.sum()) == int(uni_mask.sum()) == total == info["total"]
    assert torch.equal(mask.sum(1), info["counts"])
    assert torch.equal(make_mask(S, rows), mask)
    # row ratios within [0, max_row]
    assert float(rows.min()) >= 0.0 and float(rows.max()) <= 0.95 + 1e-12
    # scores reported are the real ones, and never below uniform
    assert info["score"] == pytest.approx(layer_cos(W, X, mask), abs=1e-6)
    assert info["score_uniform"] == pytest.approx(layer_cos(W, X, uni_mask), abs=1e-6)
    assert info["score"] >= info["score_uniform"]
    assert info["iters_run"] >= 10 and info["iters_run"] % 10 == 0


def test_search_actually_improves_and_reallocates():
    gains, moved = [], 0
    for seed in range(4):
        W, X = layer(seed)
        rows, info = trim_row_sparsity(W, wanda_scores(W, X), X, 0.6)
        gains.append(info["score"] - info["score_uniform"])
        moved += int((info["counts"] != int(D_IN * 0.6)).any()) and info["lr"] != 0.0
    assert max(gains) > 1e-4  # on structured layers TRIM finds a better allocation than uniform
    assert moved >= 2


def test_update_prunes_better_preserved_rows_more():
    x = torch.full((8,), 0.5, dtype=torch.float64)
    q = torch.linspace(0.90, 0.99, 8)
    up = trim_update(x, q, 0.04, 0.5, 0.95)
    assert torch.all(up[1:] > up[:-1])  # higher q -> more pruning
    assert float(up.mean()) == pytest.approx(0.5, abs=1e-12)
    assert float(up[-1] - up[0]) == pytest.approx(2 * 0.04, abs=1e-9)  # minmax * 2 * lr, centred
    down = trim_update(x, q, -0.04, 0.5, 0.95)
    assert torch.all(down[1:] < down[:-1])
    assert torch.equal(trim_update(x, torch.full((8,), 0.97), 0.08, 0.5, 0.95), x)  # flat q: no move


def test_projection_clip_and_mean_both_hold():
    x = torch.tensor([-0.5, 0.0, 0.2, 0.9, 1.4, 2.0, 0.6, 0.3], dtype=torch.float64)
    p = project_mean_box(x, 0.5, 0.95)
    assert float(p.min()) >= 0.0 and float(p.max()) <= 0.95
    assert float(p.mean()) == pytest.approx(0.5, abs=1e-12)
    assert torch.all(torch.diff(p[torch.argsort(x)]) >= 0)  # order preserved


def test_counts_with_total_and_ratios():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = project_mean_box(torch.rand(50, generator=g, dtype=torch.float64) * 2 - 0.3, 0.55, 0.9)
        c = counts_with_total(x, 100, 50 * 55, 90)
        assert int(c.sum()) == 50 * 55 and int(c.min()) >= 0 and int(c.max()) <= 90
        assert float((c.double() - 100 * x).abs().max()) < 1.0 + 1e-9
    for d in (1, 49, 100, 128, 4096, 11008):
        c = torch.arange(d + 1)
        assert torch.equal(torch.floor(ratios_from_counts(c, d) * d).long(), c)
    with pytest.raises(PrunekitError):
        counts_with_total(torch.full((4,), 0.5, dtype=torch.float64), 10, 41, 10)


@pytest.mark.parametrize("lrs,neg", [((), ()), ((0.0,), (0.0,))])
def test_no_learning_rate_is_uniform(lrs, neg):
    W, X = layer(3)
    S = wanda_scores(W, X)
    rows, info = trim_row_sparsity(W, S, X, 0.6, lrs=lrs, neg_lrs=neg)
    assert torch.equal(rowwise_mask(S, rows), unstructured_mask(S, 0.6, "row", exact=False))
    assert info["lr"] == 0.0 and info["score"] == info["score_uniform"]
    rows, info = trim_row_sparsity(W, S, X, 0.6, lrs=lrs, neg_lrs=neg, uniform_counts=row_counts(S, 0.6))
    assert torch.equal(rowwise_mask(S, rows), unstructured_mask(S, 0.6, "row"))  # the engine's exact mask
    assert info["iters_run"] == 10 * (len(lrs) + len(neg))


def test_magnitude_scores_and_small_max_row():
    W, X = layer(1)
    S = get_metric("magnitude").score(W, None)
    rows, info = trim_row_sparsity(W, S, X, 0.5, max_row=0.6)
    mask = rowwise_mask(S, rows)
    assert int(mask.sum()) == OUT * 64
    assert float(rows.max()) <= 0.6 + 1e-12 and int(mask.sum(1).max()) <= int(D_IN * 0.6)
    assert info["score"] >= info["score_uniform"]
    assert info["score"] == pytest.approx(layer_cos(W, X, mask), abs=1e-6)


def test_total_layer_mode():
    W, X = layer(2)
    S = wanda_scores(W, X)
    rows, info = trim_row_sparsity(W, S, X, 0.7, total="layer")
    assert int(rowwise_mask(S, rows).sum()) == int(OUT * D_IN * 0.7) == info["total"]
    assert int(OUT * D_IN * 0.7) > OUT * int(D_IN * 0.7)  # the two modes differ here


def test_deterministic():
    W, X = layer(5)
    S = wanda_scores(W, X)
    a, ia = trim_row_sparsity(W, S, X, 0.6)
    b, ib = trim_row_sparsity(W.clone(), S.clone(), X.clone(), 0.6)
    assert torch.equal(a, b) and ia["score"] == ib["score"] and ia["lr"] == ib["lr"]


def test_degenerate_inputs_stay_uniform():
    W, X = layer(0)
    S = W.abs()
    for rows, _ in (trim_row_sparsity(W, S, X[:0], 0.6),  # no calibration inputs
                    trim_row_sparsity(W, S, X, 0.0),       # nothing to prune
                    trim_row_sparsity(W, S, X, 0.97)):     # target above max_row: no room
        assert torch.equal(rowwise_mask(S, rows).sum(1), torch.floor(rows * D_IN).long())
        assert len(set(torch.floor(rows * D_IN).long().tolist())) == 1
    with pytest.raises(PrunekitError):
        trim_row_sparsity(W, S[:, :5], X, 0.5)


def test_registry_hook():
    W, X = layer(4)
    st = stats_of(X)
    assert torch.allclose(st.last_token_inputs(), X)
    assert "trim" in ROWWISE and rowwise_needs("trim") == {"last_tokens"}
    S = get_metric("wanda").score(W, st)
    info = {}
    rows = apply_rowwise("trim", W.half(), S, st, 0.5, info=info)
    assert int(rowwise_mask(S, rows).sum()) == OUT * 64
    assert info["score"] >= info["score_uniform"] and "lr" in info
    direct, _ = trim_row_sparsity(W.half().float(), S, X, 0.5)
    assert torch.equal(rows, direct)
    with pytest.raises(PrunekitError, match="trim"):
        apply_rowwise("nope", W, S, st, 0.5)
    with pytest.raises(PrunekitError, match="last_tokens"):
        apply_rowwise("trim", W, S, None, 0.5)
    with pytest.raises(PrunekitError, match="last_tokens"):
        apply_rowwise("trim", W, S, LayerStats(frozenset({"sq_sum"}), D_IN), 0.5)


def reference_trim(W, S, X, target, lrs=(0.01, 0.02, 0.04, 0.08, 0.12, 0.16), neg_lrs=(-0.01, -0.02, -0.04),
                   iters=10, max_row=0.95):
    """The search spelled out naively: rowwise_mask every time, float64 cosines."""
    out, d_in = W.shape
    K = out * int(d_in * target)
    Y = W.double() @ X.double().t()

    def evaluate(counts):
        Yp = W.double().masked_fill(rowwise_mask(S, ratios_from_counts(counts, d_in)), 0) @ X.double().t()
        q = (Y * Yp).sum(1) / (Y.norm(dim=1) * Yp.norm(dim=1))
        return q, float((Y * Yp).sum() / (Y.norm() * Yp.norm()))

    uni = torch.full((out,), target, dtype=torch.float64)
    u_counts = counts_with_total(uni, d_in, K, int(d_in * max_row))
    q0, s0 = evaluate(u_counts)
    best = [s0, u_counts, 0.0]
    n_iter = 0
    for rates in (lrs, neg_lrs):
        if rates is neg_lrs and best[2] != 0.0:
            break
        for lr in rates:
            x, q, top = uni.clone(), q0, None
            for _ in range(iters):
                x = trim_update(x, q, lr, target, max_row)
                c = counts_with_total(x, d_in, K, int(d_in * max_row))
                q, s = evaluate(c)
                n_iter += 1
                if top is None or s > top[0]:
                    top = (s, c)
            if not top[0] > best[0]:
                break
            best = [top[0], top[1], lr]
    return best, n_iter


@pytest.mark.parametrize("seed", range(5))
def test_matches_naive_reference_search(seed):
    W, X = layer(seed)
    S = wanda_scores(W, X) if seed % 2 else W.abs()
    rows, info = trim_row_sparsity(W, S, X, 0.6)
    (score, counts, lr), n_iter = reference_trim(W, S, X, 0.6)
    assert torch.equal(info["counts"], counts) and torch.equal(rowwise_mask(S, rows).sum(1), counts)
    assert info["lr"] == lr and info["iters_run"] == n_iter
    assert info["score"] == pytest.approx(score, abs=1e-6)


def test_gram_factor_reproduces_the_gram_matrix():
    _, X = layer(7, n=40)  # fewer tokens than features: X^T X is singular (rank 40)
    G = X.double().t() @ X.double()
    from prunekit.methods.trim import gram_factor

    F = gram_factor(G)
    assert F.shape == (40, D_IN)  # only the non-zero eigenvalues
    assert torch.allclose(F.double().t() @ F.double(), G, rtol=0, atol=1e-4 * float(G.abs().max()))
    assert gram_factor(torch.zeros(D_IN, D_IN)).shape == (0, D_IN)


@pytest.mark.parametrize("seed", range(3))
def test_inputs_all_scores_on_every_calibration_token(seed):
    """inputs=all: TRIM's objective is the cosine over ALL calibration tokens (from the 'hessian' statistic),
    checked against a naive float64 computation on the stacked tokens; the result is the same search as
    trim_row_sparsity on the stacked tokens and never below uniform on that objective."""

    W, X = layer(seed)
    seqs = X.reshape(16, 16, D_IN)  # 16 sequences of 16 tokens: the last token alone is 16 rows
    st = LayerStats(frozenset({"sq_sum", "hessian"}), D_IN)
    st.update(seqs)
    S = get_metric("wanda").score(W, st)
    info = {}
    rows = apply_rowwise("trim", W, S, st, 0.6, info=info, inputs="all")
    mask = rowwise_mask(S, rows)
    assert int(mask.sum()) == OUT * int(D_IN * 0.6)
    assert info["score"] == pytest.approx(layer_cos(W, X, mask), abs=1e-6)
    uni = layer_cos(W, X, unstructured_mask(S, 0.6, "row", exact=False))  # no uniform_counts: TRIM's own total
    assert info["score_uniform"] == pytest.approx(uni, abs=1e-6)
    assert info["score"] > uni and info["lr"] != 0
    (score, counts, lr), _ = reference_trim(W, S, X, 0.6)
    assert info["lr"] == lr and info["score"] == pytest.approx(score, abs=1e-6)
    assert int((info["counts"] - counts).abs().sum()) <= 2  # same search; float sums may flip a tie
    last = LayerStats(frozenset({"last_tokens"}), D_IN)
    last.update(seqs)
    assert rowwise_needs("trim", {"inputs": "all"}) == {"hessian"} and rowwise_needs("trim") == {"last_tokens"}
    with pytest.raises(PrunekitError, match="hessian"):
        apply_rowwise("trim", W, S, last, 0.6, inputs="all")
    # a layer that saw no tokens (never called by the forward) keeps the uniform allocation
    empty = LayerStats(frozenset({"sq_sum", "hessian"}), D_IN)
    rows0 = apply_rowwise("trim", W, S, empty, 0.6, inputs="all")
    assert torch.equal(rowwise_mask(S, rows0), unstructured_mask(S, 0.6, "row", exact=False))
    rows0 = apply_rowwise("trim", W, S, empty, 0.6, inputs="all", uniform_counts=row_counts(S, 0.6))
    assert torch.equal(rowwise_mask(S, rows0), unstructured_mask(S, 0.6, "row"))
    with pytest.raises(PrunekitError, match="inputs"):
        rowwise_needs("trim", {"inputs": "first"})


# ----------------------------------------------------------------------------- through the engine


@pytest.mark.parametrize("alloc", ["uniform", "owl"])
def test_trim_keeps_each_layer_total_exact(calib_ids, alloc):
    model = tiny_model("llama", hidden=64)
    report = prunekit.prune(model, None, {"metric": "wanda", "sparsity": 0.6, "rowwise": "trim", "allocation": alloc},
                            calib_ids=calib_ids)
    for l in report["layers"]:
        o, i = l["shape"]
        W = weight_view(dict(model.named_modules())[l["name"]])
        assert int((W == 0).sum()) == int(o * i * l["target"]), l["name"]
    rows = [weight_view(m).eq(0).sum(1) for d in block_linears(model) for m in d.values()]
    assert any(int(r.max()) != int(r.min()) for r in rows)  # rows got different sparsities somewhere
    # the report says why: TRIM's chosen lr and its objective with and without it, never below uniform
    assert all("rowwise" in l for l in report["layers"])
    rw = [l["rowwise"] for l in report["layers"]]
    assert all(r["score"] >= r["score_uniform"] for r in rw)
    assert any(r["score"] > r["score_uniform"] and r["lr"] != 0 for r in rw)


def test_trim_tokens_per_sample_reaches_the_statistics(calib_ids, monkeypatch):
    """rowwise_params tokens_per_sample=k gives TRIM k rows of X per calibration sequence (not a TRIM kwarg)."""
    import prunekit.methods.trim as rw

    seen = []
    orig = rw.trim_row_sparsity
    monkeypatch.setattr(rw, "trim_row_sparsity", lambda W, S, X, t, **kw: (seen.append(X.shape[0]), orig(W, S, X, t, **kw))[1])
    model = tiny_model("llama", hidden=64)
    prunekit.prune(model, None, {"metric": "wanda", "sparsity": 0.5, "rowwise": "trim",
                                 "rowwise_params": {"tokens_per_sample": 3}}, calib_ids=calib_ids)
    assert seen and all(n == 3 * calib_ids.shape[0] for n in seen)


def test_trim_inputs_all_gathers_the_gram_matrix_not_last_tokens(calib_ids, monkeypatch):
    """rowwise_params inputs=all: the engine gathers 'hessian' (not 'last_tokens') and TRIM gets a factor F
    with F^T F = the layer's X^T X over every calibration token; layer totals stay exact."""
    import prunekit.methods.trim as rw
    from prunekit.core.stats import LayerStats

    seen = []
    orig_upd = LayerStats.update
    monkeypatch.setattr(LayerStats, "update", lambda self, x: (seen.append(frozenset(self.needs)), orig_upd(self, x))[1])
    grams = []
    orig = rw.gram_factor
    monkeypatch.setattr(rw, "gram_factor", lambda G: (grams.append(G.clone()), orig(G))[1])
    model = tiny_model("llama", hidden=64)
    rep = prunekit.prune(model, None, {"metric": "wanda", "sparsity": 0.6, "rowwise": "trim",
                                       "rowwise_params": {"inputs": "all"}}, calib_ids=calib_ids)
    assert seen and all("hessian" in n and "last_tokens" not in n for n in seen)
    assert len(grams) == len(rep["layers"])
    for l in rep["layers"]:
        W = weight_view(dict(model.named_modules())[l["name"]])
        o, i = l["shape"]
        assert int((W == 0).sum()) == int(o * i * l["target"]), l["name"]
        assert l["rowwise"]["score"] >= l["rowwise"]["score_uniform"]
    # block 0's first layer (q_proj) sees the embeddings' RMS-normed tokens: its Gram matrix is X^T X of them
    emb = model.get_input_embeddings()(calib_ids)
    X = model.model.layers[0].input_layernorm(emb).reshape(-1, emb.shape[-1]).double()
    assert torch.allclose(grams[0].double(), X.t() @ X, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("params,msg", [({"inputs": "first"}, "inputs must be 'last' or 'all', got 'first'"),
                                        ({"inputs": "all", "tokens_per_sample": 4}, "set one of them")])
def test_trim_inputs_config_errors(params, msg):
    with pytest.raises(prunekit.PrunekitError, match=msg):
        prunekit.make_config(rowwise="trim", rowwise_params=params)


SKIP = ["*.mlp.up_proj", "mlp.gate_proj", "o_proj"]


def test_rowwise_skip_keeps_the_plain_mask_on_matched_layers(calib_ids):
    """Layers matched by rowwise_skip get exactly the metric's own mask (with statistics from the dense block,
    block 0's layers see identical inputs in both runs, so their masks must be bit-identical to a run without
    TRIM); every other layer still gets TRIM."""
    plain, skip = tiny_model("llama", hidden=64), tiny_model("llama", hidden=64)
    cfg = {"metric": "wanda", "sparsity": 0.6, "sequential": False}
    rp = prunekit.prune(plain, None, cfg, calib_ids=calib_ids)
    rs = prunekit.prune(skip, None, {**cfg, "rowwise": "trim", "rowwise_skip": SKIP}, calib_ids=calib_ids)
    kinds = ("mlp.up_proj", "mlp.gate_proj", "self_attn.o_proj")
    skipped = [l for l in rs["layers"] if l["name"].endswith(kinds)]
    assert len(skipped) == 3 * len(rs["blocks"])
    assert all("rowwise" not in l for l in skipped)
    assert all("rowwise" in l for l in rs["layers"] if not l["name"].endswith(kinds))
    moved = False
    for l in rs["layers"]:
        W = weight_view(dict(skip.named_modules())[l["name"]])
        o, i = l["shape"]
        assert int((W == 0).sum()) == int(o * i * l["target"]), l["name"]  # exact total either way
        rows = W.eq(0).sum(1)
        if l["name"].endswith(kinds):
            base = int(o * i * l["target"]) // o  # the plain exact mask: base or base + 1 per row
            assert base <= int(rows.min()) <= int(rows.max()) <= base + 1, l["name"]
            if ".0." in l["name"]:
                assert torch.equal(rs.masks[l["name"]], rp.masks[l["name"]])
        elif ".0." in l["name"] and not torch.equal(rs.masks[l["name"]], rp.masks[l["name"]]):
            moved = True
    assert moved  # TRIM still changed some non-skipped block-0 layer
