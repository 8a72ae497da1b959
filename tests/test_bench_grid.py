"""bench.grid's screening proxy is what it says: dense statistics, gathered once, reused per pipeline."""
import torch

import prunekit
from prunekit.core.blocks import iterate_blocks
from prunekit.core.families import block_linears, get_blocks, weight_view

from bench import grid
from bench.lib.dense_stats import DenseStats
from bench.lib.pipelines import describe, grid_confirm, key_of
from bench.lib.results import RESULTS, load_results
from conftest import tiny_model


def test_grid_cache_matches_the_engine_and_restores(calib_ids):
    model = tiny_model("llama", hidden=64)
    cache = DenseStats(model, calib_ids, "cpu", batch_size=3, tokens_per_sample=4)
    block0 = list(block_linears(model)[0])
    for metric, s in (("wanda", 0.5), ("sparsegpt", 0.5), ("wanda", 0.7)):  # 0.7: exact per-row rounding
        cache.prune({"metric": metric, "sparsity": s}, cache.ratios("uniform", s))
        ref = tiny_model("llama", hidden=64)
        prunekit.prune(ref, None, {"metric": metric, "sparsity": s, "sequential": False}, calib_ids=calib_ids)
        mods, ref_mods = dict(model.named_modules()), dict(ref.named_modules())
        for n in block0:  # block 0 sees the same (dense) inputs in both: same weights after pruning
            assert torch.allclose(weight_view(mods[n]), weight_view(ref_mods[n]), atol=1e-6), (metric, n)
    # TRIM's rows for k = 1 / 2 taken from the k = 4 gathering equal a direct gathering with that k
    cache.restore()
    for k in (1, 2):
        direct = {}
        iterate_blocks(model, get_blocks(model)[:1], block_linears(model)[:1], calib_ids, frozenset({"last_tokens"}),
                       lambda name, m, st: direct.__setitem__(name, st), "cpu", batch_size=3, sequential=False,
                       tokens_per_sample=k)
        for n in block0:
            got = cache.with_tokens(cache.stats[n], k).last_token_inputs()
            assert got.shape[0] == k * calib_ids.shape[0]
            assert torch.allclose(got, direct[n].last_token_inputs()), (n, k)
    # restore undoes weights and biases a metric added (STADE's bias compensation)
    dense = {n: weight_view(m).clone() for n, m in cache.layers.items()}
    cache.prune({"metric": "stade", "sparsity": 0.5}, cache.ratios("uniform", 0.5))
    assert any(m.bias is not None for m in cache.layers.values())
    cache.restore()
    assert all(torch.equal(weight_view(m), dense[n]) and m.bias is None for n, m in cache.layers.items())


def test_grid_report_renders_the_committed_results():
    data = load_results(RESULTS / "grid_G.json")
    md = grid.report_tables(data)
    S = load_results(RESULTS / "quality_S.json").get("runs", {})
    # every proxy top pipeline that was re-run under protocol S has a row in the confirm table, with its S number
    confirmed = [c for c in grid_confirm() if key_of(c) in S]
    assert confirmed and "## Proxy vs protocol S" in md
    for c in confirmed:
        row = f"| {describe(c)} | {data['runs'][key_of(c)]['ppl']:.1f} | {S[key_of(c)]['ppl']:.1f} |"
        assert row in md, row
