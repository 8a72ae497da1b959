"""The engine against a naive, independent re-implementation on tiny random models of every family."""
import copy

import numpy as np
import pytest
import torch

import prunekit
from prunekit.masks import unpack_mask
from prunekit.models.families import block_linears, get_blocks, weight_view

from conftest import tiny_model


def brute_force_row_mask(scores: np.ndarray, sparsity: float) -> np.ndarray:
    """Per output row: prune the floor(d_in * s) lowest scores (plain loops, stable order)."""
    out = np.zeros(scores.shape, dtype=bool)
    k = int(scores.shape[1] * sparsity)
    for r in range(scores.shape[0]):
        order = sorted(range(scores.shape[1]), key=lambda j: (scores[r, j], j))
        for j in order[:k]:
            out[r, j] = True
    return out


def capture_layer_input(model, module, ids):
    """Input of ``module`` (flattened tokens x d_in) when the *whole model* runs on ids."""
    got = []
    h = module.register_forward_pre_hook(lambda m, a: got.append(a[0].detach().reshape(-1, a[0].shape[-1]).clone()))
    with torch.no_grad():
        model(ids, use_cache=False)
    h.remove()
    return torch.cat(got)


def execution_order(model, layers, ids):
    order = []
    hooks = [m.register_forward_pre_hook(lambda mod, a, _n=n: order.append(_n) if _n not in order else None)
             for n, m in layers.items()]
    with torch.no_grad():
        model(ids[:1], use_cache=False)
    for h in hooks:
        h.remove()
    return order


def naive_wanda(model, ids, sparsity, sequential):
    """Reference: full-model forward passes, one layer (sequential) or one block (dense-block) at a time."""
    masks = {}
    for layers in block_linears(model):
        order = execution_order(model, layers, ids)
        if sequential:
            groups = [[n] for n in order]
        else:
            groups = [order]
        for group in groups:
            xs = {n: capture_layer_input(model, layers[n], ids) for n in group}
            for n in group:
                W = weight_view(layers[n])
                norm = xs[n].double().pow(2).sum(0).sqrt()
                scores = (W.double().abs() * norm[None, :]).numpy()
                mask = brute_force_row_mask(scores, sparsity)
                masks[n] = torch.from_numpy(mask)
                with torch.no_grad():
                    W[masks[n]] = 0
    return masks


@pytest.mark.parametrize("sequential", [True, False])
def test_wanda_matches_naive_reference(family, calib_ids, sequential):
    model = tiny_model(family)
    ref = naive_wanda(copy.deepcopy(model), calib_ids, 0.5, sequential)
    report = prunekit.prune(model, None, {"model": family, "metric": "wanda", "sparsity": 0.5,
                                          "sequential": sequential, "device": "cpu"}, calib_ids=calib_ids)
    assert set(report.masks) == set(ref)
    for name, packed in report.masks.items():
        got = unpack_mask(packed, ref[name].shape)
        assert torch.equal(got, ref[name]), f"{family} {name}: {(got != ref[name]).sum()} differences"
        W = weight_view(dict(model.named_modules())[name])
        assert torch.equal(W == 0, got | (W == 0))  # pruned entries are exact zeros
        k = int(W.shape[1] * 0.5)
        assert (got.sum(1) == k).all()  # exactly floor(d_in * s) per row


def test_later_blocks_see_pruned_inputs(calib_ids):
    """The same engine without recomputation would give other masks in block 1+: show it matters."""
    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    report = prunekit.prune(model, None, {"metric": "wanda", "sparsity": 0.6, "sequential": False, "device": "cpu"},
                            calib_ids=calib_ids)
    # masks computed from the dense model's activations (no pruned inputs) differ in later blocks
    layers_dense = block_linears(dense)
    name = next(iter(layers_dense[2]))
    x_dense = capture_layer_input(dense, layers_dense[2][name], calib_ids)
    W = weight_view(layers_dense[2][name]).double()
    dense_mask = torch.from_numpy(brute_force_row_mask((W.abs() * x_dense.double().pow(2).sum(0).sqrt()).numpy(), 0.6))
    got = unpack_mask(report.masks[name], dense_mask.shape)
    assert not torch.equal(got, dense_mask)


def test_batched_stages_equal_single_pass(calib_ids):
    """sequential=True run in several batches (one pass per stage) picks the same masks as one batch."""
    # float64 so that the different batching cannot flip near-tied scores through rounding
    a, b = tiny_model("llama").double(), tiny_model("llama").double()
    ra = prunekit.prune(a, None, {"metric": "wanda", "sparsity": 0.5}, calib_ids=calib_ids)
    rb = prunekit.prune(b, None, {"metric": "wanda", "sparsity": 0.5, "batch_size": 2}, calib_ids=calib_ids)
    agree = [torch.equal(ra.masks[n], rb.masks[n]) for n in ra.masks]
    assert sum(agree) == len(agree)


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
@pytest.mark.parametrize("metric", ["magnitude", "wanda"])
def test_nm_pattern_holds_in_every_group(family, calib_ids, pattern, metric):
    n, m = map(int, pattern.split(":"))
    model = tiny_model(family)
    prunekit.prune(model, None, {"metric": metric, "sparsity": 0.5, "pattern": pattern}, calib_ids=calib_ids)
    for layers in block_linears(model):
        for name, mod in layers.items():
            W = weight_view(mod)
            zeros = (W == 0).reshape(W.shape[0], -1, m).sum(-1)
            assert (zeros == n).all(), name


def test_per_block_list_is_honoured(calib_ids):
    model = tiny_model("qwen2", layers=4)
    ratios = [0.1, 0.3, 0.55, 0.8]
    report = prunekit.prune(model, None, {"metric": "wanda", "sparsity": ratios}, calib_ids=calib_ids)
    for b, layers in enumerate(block_linears(model)):
        for name, mod in layers.items():
            W = weight_view(mod)
            assert ((W == 0).sum(1) == int(W.shape[1] * ratios[b])).all(), name
    for b, layers in enumerate(block_linears(model)):  # the report's block sparsity is the weighted count
        shapes = [weight_view(m).shape for m in layers.values()]
        expected = sum(int(i * ratios[b]) * o for o, i in shapes) / sum(o * i for o, i in shapes)
        assert report["blocks"][b]["sparsity"] == pytest.approx(expected, abs=1e-12)


def test_magnitude_is_per_matrix(calib_ids):
    model = tiny_model("llama")
    ref = {n: weight_view(m).abs().clone() for d in block_linears(model) for n, m in d.items()}
    prunekit.prune(model, None, {"metric": "magnitude", "sparsity": 0.7})
    for d in block_linears(model):
        for n, m in d.items():
            W = weight_view(m)
            k = int(W.numel() * 0.7)
            thresh = ref[n].flatten().sort().values[k - 1]
            assert int((W == 0).sum()) == k
            assert ((W == 0) == (ref[n] <= thresh)).all()


def test_ignore_patterns_keep_layers_dense(calib_ids):
    model = tiny_model("llama")
    report = prunekit.prune(model, None, {"metric": "wanda", "sparsity": 0.5, "ignore": ["*.mlp.down_proj"]},
                            calib_ids=calib_ids)
    assert not any(n.endswith("down_proj") for n in report.masks)
    downs = [m for n, m in model.named_modules() if n.endswith("down_proj")]
    assert all(int((m.weight == 0).sum()) == 0 for m in downs)


def test_embeddings_and_lm_head_untouched(calib_ids):
    model = tiny_model("llama")
    emb = model.get_input_embeddings().weight.clone()
    head = model.lm_head.weight.clone()
    prunekit.prune(model, None, {"metric": "wanda", "sparsity": 0.5}, calib_ids=calib_ids)
    assert torch.equal(emb, model.get_input_embeddings().weight)
    assert torch.equal(head, model.lm_head.weight)
    assert len(get_blocks(model)) == 3


def test_mixed_attention_types_get_their_own_masks():
    """Qwen2 with sliding-window layers after a full-attention one: blocks 1-2 need another mask than
    block 0; the engine must give it to them (compared with the naive full-model reference)."""
    import transformers as tf
    from transformers import AutoModelForCausalLM

    cfg = tf.Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         use_sliding_window=True, sliding_window=6, max_window_layers=1)
    assert len(set(cfg.layer_types)) == 2
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, 128, (6, 24), generator=torch.Generator().manual_seed(1))
    ref = naive_wanda(copy.deepcopy(model), ids, 0.5, sequential=False)
    rep = prunekit.prune(model, None, {"metric": "wanda", "sparsity": 0.5, "sequential": False}, calib_ids=ids)
    for name, packed in rep.masks.items():
        assert torch.equal(unpack_mask(packed, ref[name].shape), ref[name]), name
    # and block-by-block perplexity equals the whole-model one on this model
    flat = ids.flatten()
    a = prunekit.perplexity(model, None, "x", seqlen=24, ids=flat, batch_size=4, offload=False)
    b = prunekit.perplexity(model, None, "x", seqlen=24, ids=flat, batch_size=4, offload=True)
    assert b["ppl"] == pytest.approx(a["ppl"], rel=1e-5)
