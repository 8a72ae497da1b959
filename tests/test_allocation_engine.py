"""Allocators that need the engine (global, MRP), 'auto' parameters, and `prunekit analyze`."""
import json

import pytest
import torch

import prunekit
from prunekit.cli import main
from prunekit.core.families import block_linears, weight_view

from conftest import STORIES_HF, TINY_TEXT, check_exact_row_counts, tiny_model


def weighted_sparsity(model):
    z = n = 0
    for d in block_linears(model):
        for m in d.values():
            W = weight_view(m)
            z += int((W == 0).sum())
            n += W.numel()
    return z / n


def test_global_magnitude_matches_brute_force_threshold():
    model = tiny_model("llama", layers=3)
    layers = {n: weight_view(m).abs().clone() for d in block_linears(model) for n, m in d.items()}
    report = prunekit.prune(model, None, {"metric": "magnitude", "sparsity": 0.6, "allocation": "global",
                                          "granularity": "layer"})
    allw = torch.cat([w.flatten() for w in layers.values()]).sort().values
    t = allw[int(0.6 * allw.numel()) - 1]
    for l in report["layers"]:
        expected = float((layers[l["name"]] <= t).double().mean())
        assert l["target"] == pytest.approx(expected, abs=2e-3), l["name"]
    assert weighted_sparsity(model) == pytest.approx(0.6, abs=2e-3)


@pytest.mark.parametrize("alloc", ["global", "mrp", "owl", "alphapruning", "farms", "er", "er-plus"])
def test_allocators_hit_target_through_engine(alloc, calib_ids):
    model = tiny_model("qwen2", layers=4, hidden=64)
    report = prunekit.prune(model, None, {"metric": "wanda", "sparsity": 0.7, "allocation": alloc},
                            calib_ids=calib_ids)
    targets = torch.tensor([l["target"] for l in report["layers"]], dtype=torch.float64)
    numels = torch.tensor([l["numel"] for l in report["layers"]], dtype=torch.float64)
    assert float((targets * numels).sum() / numels.sum()) == pytest.approx(0.7, abs=1e-9)
    # every layer prunes exactly floor(numel * target), each row floor(d_in * target) or one more
    check_exact_row_counts({n: weight_view(m) for d in block_linears(model) for n, m in d.items()},
                           {l["name"]: l["target"] for l in report["layers"]})
    assert weighted_sparsity(model) == pytest.approx(0.7, abs=len(report["layers"]) / float(numels.sum()))


def test_mrp_history_and_self_correction(calib_ids):
    model = tiny_model("llama", layers=4)
    report = prunekit.prune(model, None, {"metric": "wanda", "sparsity": 0.6, "allocation": "mrp",
                                          "allocation_params": {"steps": 3}}, calib_ids=calib_ids)
    hist = report["allocation"]["mrp_history"]
    assert [h["step"] for h in hist] == [1, 2, 3]
    assert all(len(h["chosen"]) == 2 for h in hist)


def test_auto_picks_a_grid_value_and_restores_weights(calib_ids):
    a = tiny_model("llama", layers=4)
    ra = prunekit.prune(a, None, {"metric": "wanda", "sparsity": 0.7, "allocation": "alphapruning",
                                  "allocation_params": {"eps": "auto"}}, calib_ids=calib_ids)
    auto = ra["allocation"]["auto"]
    eps = auto["chosen"]["eps"]
    assert eps in (0.1, 0.2, 0.3, 0.4, 0.5) and len(auto["trials"]) == 5
    best = min(auto["trials"], key=lambda t: t["heldout_nll"])
    assert best["params"]["eps"] == eps
    # the final model equals a direct run with the chosen value: trials left no trace
    b = tiny_model("llama", layers=4)
    rb = prunekit.prune(b, None, {"metric": "wanda", "sparsity": 0.7, "allocation": "alphapruning",
                                  "allocation_params": {"eps": eps}}, calib_ids=calib_ids)
    for n in ra.masks:
        assert torch.equal(ra.masks[n], rb.masks[n])


def test_auto_unknown_parameter_is_refused(calib_ids):
    with pytest.raises(prunekit.PrunekitError, match="alphapruning xmin_mode must be 'all' or 'peak', got 'auto'"):
        prunekit.prune(tiny_model("llama"), None, {"metric": "wanda", "allocation": "alphapruning",
                                                   "allocation_params": {"xmin_mode": "auto"}}, calib_ids=calib_ids)
    with pytest.raises(prunekit.PrunekitError, match="has no parameter"):  # a name the allocator lacks: config
        prunekit.prune(tiny_model("llama"), None, {"metric": "wanda", "allocation": "er",
                                                   "allocation_params": {"x": "auto"}}, calib_ids=calib_ids)


def test_analyze_cli_writes_report(tmp_path):
    out = tmp_path / "an"
    assert main(["analyze", "--model", str(STORIES_HF), "--calib", str(TINY_TEXT), "--nsamples", "4",
                 "--seqlen", "64", "--target", "0.6", "--out", str(out)]) == 0
    for f in ("analysis.json", "analysis.md", "layers.csv", "alpha_per_block.png", "esd_fits.png", "allocations.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    r = json.loads((out / "analysis.json").read_text())
    assert len(r["layers"]) == 35 and all(x["alpha"] > 1 for x in r["layers"])
    block_numel = {}
    for x in r["layers"]:
        block_numel[x["block"]] = block_numel.get(x["block"], 0) + x["out"] * x["in"]
    total = sum(block_numel.values())
    for name, per_block in r["allocations"].items():
        mean = sum(s * block_numel[b] for b, s in enumerate(per_block)) / total
        assert mean == pytest.approx(0.6, abs=1e-6), name


def test_default_granularity_is_the_methods_own(calib_ids):
    """ER is a per-layer rule (block averaging would make it uniform on identical blocks); OWL is per block."""
    model = tiny_model("llama", layers=3, hidden=64)
    er = prunekit.prune(model, None, {"metric": "magnitude", "sparsity": 0.6, "allocation": "er"})
    assert er["method"]["granularity"] == "layer"
    in_block0 = {round(l["target"], 6) for l in er["layers"] if l["block"] == 0}
    assert len(in_block0) > 1
    owl = prunekit.prune(tiny_model("llama", layers=3, hidden=64), None,
                         {"metric": "wanda", "sparsity": 0.6, "allocation": "owl"}, calib_ids=calib_ids)
    assert owl["method"]["granularity"] == "block"
    assert len({round(l["target"], 9) for l in owl["layers"] if l["block"] == 0}) == 1


def test_mrp_schedule_bounds_mean_and_most_redundant_first():
    """MRP with a fake engine whose outlier ratios are fixed: blocks stay in [S - lam, S + lam], the
    weighted mean is exactly S after the schedule, and the most redundant blocks get the most sparsity."""
    from prunekit.core.allocation import LayerInfo, ModelSummary
    from prunekit.methods.mrp import mrp

    layers = [LayerInfo(f"b{b}.l{i}", b, (16 * (i + 1), 32)) for b in range(6) for i in range(2)]
    outliers = [0.05, 0.01, 0.03, 0.02, 0.06, 0.04]  # block 1 is the most redundant, block 4 the least
    seen = []

    def prune_to(ratios, M):
        seen.append(dict(ratios))
        return outliers

    summary = ModelSummary(layers=layers, prune_to=prune_to)
    ratios = mrp(summary, 0.7, steps=4, frac=0.5, lam=0.08)
    numel = {l.name: l.numel for l in layers}
    mean = sum(ratios[n] * numel[n] for n in ratios) / sum(numel.values())
    assert mean == pytest.approx(0.7, abs=1e-12)
    assert all(0.62 - 1e-12 <= r <= 0.78 + 1e-12 for r in ratios.values())
    per_block = [ratios[f"b{b}.l0"] for b in range(6)]
    assert per_block[1] == pytest.approx(0.78) and per_block[4] == pytest.approx(0.62)
    order = sorted(range(6), key=lambda b: outliers[b])
    assert all(per_block[a] >= per_block[b] - 1e-12 for a, b in zip(order, order[1:]))
    assert len(seen) == 5 and all(v == pytest.approx(0.62) for v in seen[0].values())
    # one block per step: its increment would overshoot S + lam, so the cap binds and the rest flows on
    capped = mrp(ModelSummary(layers=layers, prune_to=prune_to), 0.7, steps=4, frac=1 / 6, lam=0.08)
    mean = sum(capped[n] * numel[n] for n in capped) / sum(numel.values())
    assert mean == pytest.approx(0.7, abs=1e-12)
    assert all(0.62 - 1e-12 <= r <= 0.78 + 1e-12 for r in capped.values())
    assert capped["b1.l0"] == pytest.approx(0.78) and capped["b3.l0"] == pytest.approx(0.78)
