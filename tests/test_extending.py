"""Adding a method or an architecture is one registration (README "How it works", ARCHITECTURE.md): a toy metric,
a toy allocator and a new family, each added here the way a new file under prunekit/methods/ (or one entry of the
family table) adds them, then used through the ordinary config and prune path."""
import inspect

import pytest
import torch
from pydantic import Field

import prunekit
from prunekit.core.allocation import ALLOCATORS, ModelSummary, register_allocator
from prunekit.core.errors import PrunekitError
from prunekit.core.families import FAMILIES, Family, block_linears, register_family, weight_view
from prunekit.core.metric import METRICS, register_metric
from prunekit.core.refine import REFINERS
from prunekit.core.registry import Params
from prunekit.core.rowwise import ROWWISE
from prunekit.search.registry import SEARCHES

from conftest import tiny_model


@pytest.fixture
def toy_metric():
    class ToyParams(Params):
        power: float = Field(1.0, gt=0)

    @register_metric("toy-abs-power", needs=(), group="row", params=ToyParams, description="|W|^power, per row")
    def toy(W, stats, power: float = 1.0):
        return W.abs().pow(power)

    yield "toy-abs-power"
    del METRICS["toy-abs-power"]


@pytest.fixture
def toy_allocator():
    @register_allocator("toy-first-dense", description="block 0 dense, the rest share the target")
    def toy(summary: ModelSummary, target: float):
        n0 = sum(l.numel for l in summary.layers if l.block == 0)
        rest = target * sum(l.numel for l in summary.layers) / (sum(l.numel for l in summary.layers) - n0)
        return {l.name: 0.0 if l.block == 0 else rest for l in summary.layers}

    yield "toy-first-dense"
    del ALLOCATORS["toy-first-dense"]


def test_a_new_metric_is_one_registration(toy_metric, calib_ids):
    model = tiny_model("llama")
    rep = prunekit.prune(model, None, {"metric": toy_metric, "sparsity": 0.5, "metric_params": {"power": 2.0}},
                         calib_ids=calib_ids)
    assert rep["method"]["metric_params"] == {"power": 2.0}
    ref = tiny_model("llama")  # |W|^2 ranks like |W|: the masks are magnitude's per-row masks
    for d_ref, d in zip(block_linears(ref), block_linears(model)):
        for name in d:
            W0, W = weight_view(d_ref[name]), weight_view(d[name])
            k = W0.shape[1] // 2
            kept = torch.zeros_like(W0, dtype=torch.bool).scatter_(1, W0.abs().argsort(1)[:, k:], True)
            assert torch.equal(W != 0, kept), name
    with pytest.raises(PrunekitError, match="power must be > 0"):
        prunekit.make_config(metric=toy_metric, metric_params={"power": 0})


def test_a_new_allocator_is_one_registration(toy_allocator, calib_ids):
    model = tiny_model("llama", layers=4)
    rep = prunekit.prune(model, None, {"metric": "magnitude", "sparsity": 0.6, "allocation": toy_allocator},
                         calib_ids=calib_ids)
    assert rep["blocks"][0]["sparsity"] == 0.0 and all(b["sparsity"] > 0.6 for b in rep["blocks"][1:])
    assert abs(rep["overall_sparsity"] - 0.6) < 1e-3
    with pytest.raises(PrunekitError, match="has no parameter 'eps'; valid: none"):
        prunekit.make_config(allocation=toy_allocator, allocation_params={"eps": 0.1})


def test_a_new_family_is_one_table_entry(calib_ids):
    """MPT keeps its blocks at transformer.blocks and its context length in max_seq_len: unknown until registered."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tf.MptConfig(vocab_size=128, d_model=32, n_heads=4, n_layers=2,
                                                             max_seq_len=64, expansion_ratio=2)).eval()
    with pytest.raises(PrunekitError, match="unsupported architecture 'mpt'"):
        prunekit.prune(model, None, {"metric": "wanda"}, calib_ids=calib_ids)
    register_family(Family("mpt-test", ("mpt",), "transformer.blocks", ("max_seq_len",)))
    try:
        rep = prunekit.prune(model, None, {"metric": "wanda", "sparsity": 0.5, "seqlen": 24}, calib_ids=calib_ids)
        names = [l["name"] for l in rep["layers"]]
        assert names[:4] == [f"transformer.blocks.0.{n}" for n in ("attn.Wqkv", "attn.out_proj", "ffn.up_proj",
                                                                   "ffn.down_proj")]
        assert rep["overall_sparsity"] == 0.5
        with pytest.raises(PrunekitError, match="longer than the model's context \\(64 tokens\\)"):
            prunekit.prune(model, None, {"metric": "wanda", "seqlen": 128}, calib_ids=calib_ids)
    finally:
        del FAMILIES["mpt-test"]


def _keyword_defaults(fn, skip: int) -> dict:
    params = list(inspect.signature(fn).parameters.values())[skip:]
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def _pairs(kind):
    """(parameter class, function holding the same defaults, positional arguments before the parameters)."""
    from prunekit.methods import admm, alps, sparsegpt
    from prunekit.search import dsa, optishear, random_search, tpe

    if kind == "metric":
        return [(m.params, m.score, 2) for m in METRICS.values() if m.score] + [
            (METRICS["sparsegpt"].params, sparsegpt.sparsegpt_solver, 5),
            (METRICS["sparsegpt"].params, sparsegpt.sparsegpt_solve, 3),
            (METRICS["admm"].params, admm.admm_solver, 5), (METRICS["admm"].params, admm.admm_solve, 3),
            (METRICS["alps"].params, alps.alps_solver, 5), (METRICS["alps"].params, alps.alps_solve, 3)]
    if kind == "allocator":
        return [(a.params, a.fn, 2) for a in ALLOCATORS.values()]
    if kind == "rowwise":
        return [(r.params, r.fn, 5) for r in ROWWISE.values()]
    if kind == "refine":
        return [(r.params, r.fn, 4) for r in REFINERS.values()]
    return [(SEARCHES["dsa"].params, dsa.ProgramSearch.__init__, 7),
            (SEARCHES["random"].params, random_search.search_random, 6),
            (SEARCHES["tpe"].params, tpe.search_tpe, 7), (SEARCHES["optishear"].params, optishear.search_optishear, 7)]


@pytest.mark.parametrize("kind", ["metric", "allocator", "rowwise", "refine", "search"])
def test_registered_defaults_agree_with_the_functions(kind):
    """A method's parameter class is where its defaults live; the function's own keyword defaults (used when it
    is called directly) must be the same values."""
    compared = 0
    for params, fn, skip in _pairs(kind):
        declared = params().kwargs()
        for name, default in _keyword_defaults(fn, skip).items():
            if name in declared:
                got = declared[name]
                same = got == default or (isinstance(got, list) and isinstance(default, (list, tuple))
                                          and list(got) == list(default))
                assert same, (fn.__qualname__, name, got, default)
                compared += 1
    assert compared >= {"metric": 27, "allocator": 21, "rowwise": 2, "refine": 6, "search": 15}[kind]
