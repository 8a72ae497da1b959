"""TRIM and SparseGPT reconstruction wired through the engine."""
import pytest
import torch

import prunekit
from prunekit.core.masks import unpack_mask
from prunekit.core.families import block_linears, weight_view

from conftest import tiny_model


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


@pytest.mark.parametrize("bad,msg", [({"rowwise": "trim", "pattern": "2:4"}, "cannot be combined with an N:M"),
                                     ({"rowwise": "trim", "metric": "sparsegpt"}, "chooses its own masks"),
                                     ({"rowwise": "nope"}, "unknown rowwise method"),
                                     ({"rowwise": "trim", "rowwise_params": {"tokens_per_sample": 0}},
                                      "tokens_per_sample must be >= 1, got 0"),
                                     ({"rowwise": "trim", "rowwise_params": {"tokens_per_sample": "4"}},
                                      "tokens_per_sample must be an integer, got '4'"),
                                     ({"rowwise": "trim", "rowwise_params": {"foo": 1}},
                                      "trim has no parameter 'foo'; valid: tokens_per_sample, inputs, lrs"),
                                     ({"rowwise": "trim", "rowwise_params": {"uniform_counts": [1]}}, "no parameter"),
                                     ({"rowwise": "trim", "rowwise_params": {"iters": 2.5}}, "iters must be an integer"),
                                     ({"rowwise": "trim", "rowwise_params": {"max_row": 1.5}}, r"max_row must be <= 1.0, got 1.5"),
                                     ({"rowwise": "trim", "rowwise_params": {"total": "all"}}, "total must be 'uniform' or 'layer', got 'all'"),
                                     ({"rowwise": "trim", "rowwise_params": {"lrs": [0.1, "x"]}}, "lrs must be a finite number, got 'x'"),
                                     ({"rowwise_skip": ["*.mlp.up_proj"]}, "set rowwise too"),
                                     ({"reconstruct": "obs"}, "unknown reconstruct"),
                                     ({"pattern": "2:4", "allocation": "owl"}, "has nothing to move")])
def test_rowwise_config_errors(bad, msg):
    with pytest.raises(prunekit.PrunekitError, match=msg):
        prunekit.make_config(**bad)


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


def test_misspelt_rowwise_skip_fails_before_any_work():
    from prunekit.core.families import name_matches

    assert name_matches("model.layers.0.mlp.down_proj", ["down_proj"])
    assert name_matches("model.layers.0.mlp.down_proj", ["layers.0.*"])
    assert not name_matches("model.layers.0.mlp.down_proj", ["layers.1.*", "up_proj", "mlp"])
    model = tiny_model("llama", hidden=64)
    before = {n: p.clone() for n, p in model.named_parameters()}
    # no calibration data given: the misspelling must be reported, not the missing data
    with pytest.raises(prunekit.PrunekitError, match="'\\*.mlp.upproj' match no prunable layer"):
        prunekit.prune(model, None, {"metric": "wanda", "sparsity": 0.5, "rowwise": "trim",
                                     "rowwise_skip": ["o_proj", "*.mlp.upproj"]})
    with pytest.raises(prunekit.PrunekitError, match="ignore pattern\\(s\\) 'down-proj' match no prunable layer"):
        prunekit.prune(model, None, {"metric": "magnitude", "sparsity": 0.5, "ignore": ["down-proj"]})
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


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
