"""The calibration engine (prunekit.core.blocks, run through prunekit.prune) against a naive, independent
re-implementation on tiny random models of every family: Wanda masks in sequential and dense-block mode,
later blocks fed pruned inputs, stages, N:M groups, per-block ratios, ignored layers, models mixing
attention types, statistics shared by layers reading one input, exact row rounding."""
import copy

import numpy as np
import pytest
import torch

import prunekit
from prunekit.core.masks import unpack_mask
from prunekit.core.families import block_linears, get_blocks, weight_view

from conftest import check_exact_row_counts, tiny_model


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


def wanda_matches(model, ref: dict, ids, sequential: bool, what: str):
    """prunekit's Wanda 50% masks of ``model`` equal the reference masks ``ref`` (name -> mask); the report."""
    report = prunekit.prune(model, None, {"model": what, "metric": "wanda", "sparsity": 0.5,
                                          "sequential": sequential, "device": "cpu"}, calib_ids=ids)
    assert set(report.masks) == set(ref)
    for name, packed in report.masks.items():
        got = unpack_mask(packed, ref[name].shape)
        assert torch.equal(got, ref[name]), f"{what} {name}: {int((got != ref[name]).sum())} differences"
    return report


@pytest.mark.parametrize("sequential", [True, False])
def test_wanda_matches_naive_reference(family, calib_ids, sequential):
    model = tiny_model(family)
    ref = naive_wanda(copy.deepcopy(model), calib_ids, 0.5, sequential)
    report = wanda_matches(model, ref, calib_ids, sequential, family)
    for name, packed in report.masks.items():
        got = unpack_mask(packed, ref[name].shape)
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
    ratios = [0.1, 0.3, 0.55, 0.8]
    model = tiny_model("qwen2", layers=4)
    prunekit.prune(model, None, {"metric": "wanda", "sparsity": ratios}, calib_ids=calib_ids)
    check_exact_row_counts({n: weight_view(m) for b, d in enumerate(block_linears(model)) for n, m in d.items()},
                           {n: ratios[b] for b, d in enumerate(block_linears(model)) for n in d})
    # row_rounding floor: every row floors d_in * s, as the reference codes do
    model = tiny_model("qwen2", layers=4)
    report = prunekit.prune(model, None, {"metric": "wanda", "sparsity": ratios, "row_rounding": "floor"},
                            calib_ids=calib_ids)
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


@pytest.mark.parametrize("mode", [{}, {"batch_size": 2}, {"batch_size": 2, "sequential": False}],
                         ids=["single-pass", "stages", "dense-block"])
def test_layers_reading_one_input_share_their_statistics(family, calib_ids, mode, monkeypatch):
    """Layers fed the same input tensor (q/k/v, gate/up) get one LayerStats, accumulated once; every
    layer's statistics still equal the sums over its own input captured from a full-model forward."""
    from prunekit.core.blocks import iterate_blocks
    from prunekit.core.stats import LayerStats

    model = tiny_model(family).double()
    blocks, layers = get_blocks(model), block_linears(model)
    updates = []
    real_update = LayerStats.update

    def counted(self, x):
        updates.append(id(self))
        real_update(self, x)

    monkeypatch.setattr(LayerStats, "update", counted)
    got = {}
    iterate_blocks(model, blocks, layers, calib_ids, frozenset({"sq_sum", "hessian"}),
                   lambda name, module, st: got.__setitem__(name, st), "cpu", **mode)  # no pruning: dense inputs
    for b, d in enumerate(layers):
        xs = {n: capture_layer_input(model, m, calib_ids).double() for n, m in d.items()}
        for n, x in xs.items():
            # float32 squares (LayerStats.update), float64 sums
            assert torch.allclose(got[n].sq_sum, x.pow(2).sum(0), rtol=1e-6), (n, float((got[n].sq_sum / x.pow(2).sum(0) - 1).abs().max()))
            h = x.T @ x
            assert float((got[n].hessian.double() - h).abs().max() / h.abs().max()) < 1e-5, n
        # independent grouping: consecutive layers (execution order) whose captured inputs are equal
        order = execution_order(model, d, calib_ids)
        groups = [[order[0]]]
        for prev, n in zip(order, order[1:]):
            (groups[-1].append(n) if torch.equal(xs[prev], xs[n]) else groups.append([n]))
        for g in groups:
            assert len({id(got[n]) for n in g}) == 1, (b, g)
        assert len({id(got[g[0]]) for g in groups}) == len(groups), b
    if family in ("llama", "mistral", "qwen2"):  # q/k/v and gate/up: 4 accumulations per block, not 7
        assert len(set(id(got[n]) for n in got)) == 4 * len(layers)
    batches = 1 if "batch_size" not in mode else -(-calib_ids.shape[0] // mode["batch_size"])
    assert len(updates) == len(set(id(got[n]) for n in got)) * batches


def test_row_rounding_reaches_the_layer_ratio_where_floor_falls_short(calib_ids):
    """Wanda 70% on a 3-block LLaMA whose widths are not multiples of 10: flooring every row loses up to one
    weight per row; exact rounding prunes floor(numel * 0.7) in every layer; a magnitude (per-matrix) run
    is the same either way."""
    zeros = {}
    for mode in ("exact", "floor"):
        model = tiny_model("llama", layers=3, hidden=48)
        rep = prunekit.prune(model, None, {"metric": "wanda", "sparsity": 0.7, "row_rounding": mode},
                             calib_ids=calib_ids)
        assert rep["method"]["row_rounding"] == mode
        W = {n: weight_view(m) for d in block_linears(model) for n, m in d.items()}
        zeros[mode] = sum(int((w == 0).sum()) for w in W.values())
        if mode == "exact":
            check_exact_row_counts(W, {n: 0.7 for n in W})
        else:
            assert all(bool(((w == 0).sum(1) == int(0.7 * w.shape[1])).all()) for w in W.values())
    assert zeros["floor"] < zeros["exact"]
    a, b = tiny_model("llama", layers=3, hidden=48), tiny_model("llama", layers=3, hidden=48)
    ra = prunekit.prune(a, None, {"metric": "magnitude", "sparsity": 0.7})
    rb = prunekit.prune(b, None, {"metric": "magnitude", "sparsity": 0.7, "row_rounding": "floor"})
    assert all(torch.equal(ra.masks[n], rb.masks[n]) for n in ra.masks)


def test_heap_keeper_trims_only_when_the_process_grew_past_its_allowance(monkeypatch):
    """After the first block the resident memory is the reference and half the free heap (at least ``slack``) the
    allowance; a trim happens exactly when a later block ends above reference + allowance."""
    import prunekit.core.blocks as B

    rss = iter([1000, 1100, 1600, 1601, 900, 1400])  # MB, one per block
    trims = []
    monkeypatch.setattr(B, "_LIBC", [object()])
    monkeypatch.setattr(B, "rss_bytes", lambda: next(rss) << 20)
    monkeypatch.setattr(B, "heap_free_bytes", lambda: 1000 << 20)  # allowance: max(500, 256) MB
    monkeypatch.setattr(B, "release_memory", lambda: trims.append(1))
    monkeypatch.setattr(B.HeapKeeper, "process_allowance", None)  # this process's first walk
    keeper = B.HeapKeeper(slack=256 << 20)
    grew = []
    for _ in range(6):
        before = len(trims)
        keeper.after_block()
        grew.append(len(trims) > before)
    assert grew == [False, False, True, True, False, False]  # 1600 and 1601 > 1000 + 500; 1100, 900, 1400 are not
    assert keeper.trims == 2


def test_a_later_walk_keeps_the_first_walks_allowance(monkeypatch):
    """The allowance is the process's first walk's: a later walk whose heap reports much more free memory (pages
    earlier trims returned to the OS) still trims once it grows past the first allowance."""
    import prunekit.core.blocks as B

    free = iter([1000, 1000, 20000, 20000])  # MB, read after every block: walk 1, then a later walk
    rss = iter([1000, 1400, 2700, 3300])  # MB: walk 1 blocks 0-1, walk 2 blocks 0-1
    trims = []
    monkeypatch.setattr(B, "_LIBC", [object()])
    monkeypatch.setattr(B, "rss_bytes", lambda: next(rss) << 20)
    monkeypatch.setattr(B, "heap_free_bytes", lambda: next(free) << 20)
    monkeypatch.setattr(B, "release_memory", lambda: trims.append(1))
    monkeypatch.setattr(B.HeapKeeper, "process_allowance", None)
    first = B.HeapKeeper(slack=256 << 20)
    first.after_block(), first.after_block()
    assert first.allowance == 500 << 20 and not trims  # 1400 <= 1000 + 500
    later = B.HeapKeeper(slack=256 << 20)
    later.after_block(), later.after_block()
    assert later.allowance == 500 << 20 and later.trims == 1  # 3300 > 2700 + 500 (half of 20000 would allow 10000)


def test_heap_keeper_trims_every_block_where_memory_cannot_be_read(monkeypatch):
    import prunekit.core.blocks as B

    trims = []
    monkeypatch.setattr(B, "_LIBC", [object()])
    monkeypatch.setattr(B, "rss_bytes", lambda: None)
    monkeypatch.setattr(B, "heap_free_bytes", lambda: None)
    monkeypatch.setattr(B, "release_memory", lambda: trims.append(1))
    keeper = B.HeapKeeper()
    for _ in range(3):
        keeper.after_block()
    assert len(trims) == 3


def test_store_copies_into_the_batch_buffer_and_replaces_on_a_new_shape():
    from prunekit.core.blocks import BlockInputs

    h = torch.zeros(2, 3, 4)
    inputs = BlockInputs([h], [()], [{}], False)
    out = torch.randn(2, 3, 4)
    inputs.store(0, out)
    assert inputs.hidden[0] is h and torch.equal(h, out)  # same buffer, new values
    wider = torch.randn(2, 3, 5)
    inputs.store(0, wider)
    assert torch.equal(inputs.hidden[0], wider) and inputs.hidden[0].shape == (2, 3, 5)
    half = torch.randn(2, 3, 5, dtype=torch.float16)
    inputs.store(0, half)
    assert inputs.hidden[0].dtype == torch.float16 and torch.equal(inputs.hidden[0], half)


def test_output_template_from_one_sample_and_fallback_to_the_whole_batch():
    """The probe learns a block's output structure from the first sample; a block that refuses the cut (here: an
    argument whose first dimension equals the batch size but must not be cut) is called on the whole batch."""
    from prunekit.core.blocks import BlockInputs, _output_template

    seen = []

    class Block(torch.nn.Module):
        def forward(self, h, table=None):
            seen.append(h.shape[0])
            if table is not None and table.shape[0] != 3:
                raise ValueError("table must keep its 3 rows")
            return (h * 2, None)

    h = torch.randn(3, 5, 4)
    out = _output_template(Block(), BlockInputs([h], [()], [{}], False), "cpu")
    assert isinstance(out, tuple) and len(out) == 2 and seen == [1]
    seen.clear()
    out = _output_template(Block(), BlockInputs([h], [()], [{"table": torch.zeros(3, 7)}], False), "cpu")
    assert seen == [1, 3] and out[0].shape == (3, 5, 4)


def test_off_heap_copy_is_equal_and_independent():
    from prunekit.core.masks import off_heap, pack_mask, unpack_mask

    t = torch.arange(100, dtype=torch.uint8)
    c = off_heap(t)
    assert torch.equal(c, t) and c.data_ptr() != t.data_ptr()
    t[0] = 7
    assert c[0] == 0
    m = torch.rand(33, 17, generator=torch.Generator().manual_seed(0)) < 0.5
    assert torch.equal(unpack_mask(pack_mask(m), m.shape), m)
    assert off_heap(torch.zeros(0)).numel() == 0
