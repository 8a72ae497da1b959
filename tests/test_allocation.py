"""Layer-wise sparsity allocation (prunekit.core.allocation and the allocators uniform, ER, ER-plus, OWL,
AlphaPruning, FARMS, global threshold, MRP): weighted means hit the target within the bounds, each
allocator's formula on small synthetic summaries, and, through the engine, exact per-layer counts for
every allocator, the global threshold against a brute-force one, and MRP's schedule."""
import pytest
import torch

import prunekit
from prunekit.core.allocation import ALLOCATORS, LayerInfo, ModelSummary, allocate, finalize
from prunekit.core.allocation import linear_map_ratios
from prunekit.core.esd import layer_alphas
from prunekit.core.errors import PrunekitError
from prunekit.core.families import block_linears, weight_view

from conftest import check_exact_row_counts, tiny_model

SHAPES = {"q": (32, 32), "k": (16, 32), "v": (16, 32), "o": (32, 32),
          "gate": (64, 32), "up": (64, 32), "down": (32, 64)}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_summary(n_blocks=6, identical=False, seed=0):
    """Blocks of 7 small linear layers; heavier-tailed weights (student-t, small df) in early blocks."""
    torch.manual_seed(seed)
    base = {k: torch.randn(s) for k, s in SHAPES.items()}
    layers, weights = [], {}
    for b in range(n_blocks):
        for k, s in SHAPES.items():
            name = f"layers.{b}.{k}"
            layers.append(LayerInfo(name, b, s))
            weights[name] = base[k].clone() if identical else torch.distributions.StudentT(1.5 + b).sample(s)
    g = torch.Generator().manual_seed(seed + 1)
    outliers = {5.0: torch.rand(n_blocks, generator=g).mul(0.05).tolist(),
                3.0: torch.rand(n_blocks, generator=g).mul(0.1).tolist()}
    return ModelSummary(layers, weights=weights, outliers=outliers)


def wmean(summary, ratios):
    n = summary.numels()
    r = torch.tensor([ratios[l.name] for l in summary.layers], dtype=torch.float64)
    return float((r * n).sum() / n.sum())


CASES = [
    ("uniform", {}), ("er", {}), ("er-plus", {}), ("er-plus", {"dense_last": "block"}),
    ("owl", {"lam": 0.3}), ("owl", {"M": 3, "lam": 0.08}),
    ("alphapruning", {"eps": 0.9}), ("alphapruning", {"eps": 0.9, "level": "layer", "xmin_mode": "peak"}),
    ("alphapruning", {"eps": 0.3, "xmin_mode": "peak", "compat": True}),
    ("farms", {"eps": 0.9}), ("farms", {"eps": 0.5, "max_side": 16, "grid": 3, "level": "layer"}),
    ("atp", {}), ("atp", {"beta": 0.1}),
]


@pytest.fixture(scope="module")
def summary():
    return make_summary()


@pytest.mark.parametrize("name,params", CASES)
@pytest.mark.parametrize("granularity", ["block", "layer"])
@pytest.mark.parametrize("target", [0.1, 0.5, 0.8])
def test_weighted_mean_is_target(summary, name, params, granularity, target):
    r = allocate(name, summary, target, granularity=granularity, max_ratio=0.95, **params)
    assert set(r) == {l.name for l in summary.layers}
    assert abs(wmean(summary, r) - target) < 1e-6
    assert all(0.0 <= v <= 0.95 for v in r.values())
    if granularity == "block":
        for b in range(summary.n_blocks):
            assert len({r[l.name] for l in summary.layers if l.block == b}) == 1


def test_clipping_is_active(summary):
    """The cases above do hit the bounds (so finalize's renormalisation is exercised)."""
    r = allocate("alphapruning", summary, 0.8, max_ratio=0.95, eps=0.9)
    assert max(r.values()) == 0.95
    r = allocate("owl", summary, 0.8, max_ratio=0.95, lam=0.3)
    assert max(r.values()) == 0.95
    r = allocate("er", summary, 0.1, granularity="layer")
    assert min(r.values()) == 0.0  # k/v would get density > 1


def test_all_registered():
    assert {"uniform", "er", "er-plus", "owl", "alphapruning", "farms"} <= set(ALLOCATORS)
    assert ALLOCATORS["owl"].needs == {"outliers"}
    assert ALLOCATORS["alphapruning"].needs == {"weights"} == ALLOCATORS["farms"].needs


def test_finalize_bounds_and_mean():
    g = torch.Generator().manual_seed(0)
    raw = torch.rand(50, generator=g, dtype=torch.float64) * 2 - 0.5  # in [-0.5, 1.5]
    n = torch.randint(1, 1000, (50,), generator=g).double()
    for target in (0.05, 0.5, 0.9):
        r = finalize(raw, n, target, max_ratio=0.95)
        assert float(r.min()) >= 0.0 and float(r.max()) <= 0.95
        assert abs(float((r * n).sum() / n.sum()) - target) < 1e-9
    with pytest.raises(PrunekitError):
        finalize(raw, n, 0.97, max_ratio=0.95)


# ----------------------------------------------------------------------------- ER / ER-plus


def test_er_formula(summary):
    r = allocate("er", summary, 0.5, granularity="layer")  # no clipping at 0.5 for these shapes
    e = {l.name: (l.shape[0] + l.shape[1]) / (l.shape[0] * l.shape[1]) for l in summary.layers}
    dens = {k: 1 - v for k, v in r.items()}
    ref = "layers.0.q"
    for k in r:
        assert dens[k] / dens[ref] == pytest.approx(e[k] / e[ref], rel=1e-9)
    assert r["layers.0.down"] > r["layers.0.q"] > r["layers.0.k"]


def test_er_plus_keeps_last_dense(summary):
    r = allocate("er-plus", summary, 0.5, granularity="layer")
    last = summary.layers[-1].name
    assert r[last] == 0.0 and abs(wmean(summary, r) - 0.5) < 1e-9
    er = allocate("er", summary, 0.5, granularity="layer")
    assert all(r[k] > er[k] for k in r if k != last)  # the others pay for the dense layer
    rb = allocate("er-plus", summary, 0.5, granularity="layer", dense_last="block")
    assert all(rb[l.name] == 0.0 for l in summary.layers if l.block == summary.n_blocks - 1)


# ----------------------------------------------------------------------------- OWL


@pytest.mark.parametrize("granularity", ["block", "layer"])
def test_owl_lam0_is_uniform(summary, granularity):
    for target in (0.3, 0.7):
        uniform = allocate("uniform", summary, target, granularity)
        assert allocate("owl", summary, target, granularity, lam=0.0) == uniform
        if granularity == "layer":  # (block averaging in allocate() may move "uniform" itself by 1 ulp)
            assert all(v == target for v in allocate("owl", summary, target, granularity, lam=0.0).values())


def test_owl_formula(summary):
    S, lam = 0.6, 0.08
    r = allocate("owl", summary, S, granularity="layer", M=5, lam=lam)
    D = torch.tensor(summary.outliers[5.0], dtype=torch.float64)
    Dt = (D - D.min()) / (D.max() - D.min()) * 2 * lam
    expect = 1 - (Dt - Dt.mean() + (1 - S))
    for l in summary.layers:
        assert r[l.name] == pytest.approx(float(expect[l.block]), abs=1e-12)
    blocks = [r[f"layers.{b}.q"] for b in range(summary.n_blocks)]
    assert max(blocks) - min(blocks) == pytest.approx(2 * lam)
    assert blocks[int(D.argmax())] == min(blocks)  # more outliers -> less pruning


def test_owl_errors(summary):
    with pytest.raises(PrunekitError, match="M=7"):
        allocate("owl", summary, 0.5, M=7)
    with pytest.raises(PrunekitError):
        allocate("owl", ModelSummary(summary.layers), 0.5)
    with pytest.raises(PrunekitError, match="owl has no parameter 'lamda'; valid: M, lam"):
        allocate("owl", summary, 0.5, lamda=0.1)


# ----------------------------------------------------------------------------- AlphaPruning / FARMS


def test_linear_map_ratios():
    s = linear_map_ratios([1.0, 2.0, 3.0], [1, 1, 1], 0.5, 0.3)
    assert torch.allclose(s, torch.tensor([0.35, 0.5, 0.65], dtype=torch.float64))
    s = linear_map_ratios([1.0, 3.0], [3, 1], 0.5, 0.3)  # r = [0.7, 1.3], rescaled to the weighted target
    assert torch.allclose(s, torch.tensor([0.7, 1.3], dtype=torch.float64) * 0.5 * 4 / (3 * 0.7 + 1.3))
    same = linear_map_ratios([2.0, 2.0, 2.0], [1, 5, 9], 0.7, 0.3)
    assert torch.equal(same, torch.full((3,), 0.7, dtype=torch.float64))
    with pytest.raises(PrunekitError):
        linear_map_ratios([1.0, float("nan")], [1, 1], 0.5, 0.3)


@pytest.mark.parametrize("name", ["alphapruning", "farms"])
@pytest.mark.parametrize("granularity", ["block", "layer"])
def test_equal_alphas_give_uniform(name, granularity):
    s = make_summary(n_blocks=4, identical=True)  # the same 7 matrices in every block
    for target in (0.5, 0.8):
        r = allocate(name, s, target, granularity, eps=0.5)
        assert r == allocate("uniform", s, target, granularity)


def test_alphapruning_formula_and_direction(summary):
    S, eps = 0.5, 0.3
    r = allocate("alphapruning", summary, S, granularity="block", eps=eps)
    alphas = r.info["alpha"]
    assert set(alphas) == {l.name for l in summary.layers}
    ab = torch.tensor([sum(alphas[f"layers.{b}.{k}"] for k in SHAPES) / len(SHAPES)
                       for b in range(summary.n_blocks)], dtype=torch.float64)
    assert torch.allclose(ab, torch.tensor(r.info["alpha_block"], dtype=torch.float64))
    rr = 1 - eps + (ab - ab.min()) / (ab.max() - ab.min()) * 2 * eps
    expect = rr * S / rr.mean()  # equal block sizes
    for l in summary.layers:
        assert r[l.name] == pytest.approx(float(expect[l.block]), abs=1e-12)
    assert r[f"layers.{int(ab.argmax())}.q"] == max(r.values())  # larger alpha -> more pruning
    # student-t(1.5 + b): heavier tails (smaller alpha) in early blocks -> the last block is pruned more than the first
    assert r[f"layers.{summary.n_blocks - 1}.q"] > r["layers.0.q"]


def test_layer_alphas_helper(summary):
    a, stats = layer_alphas(summary.layer_weights(), "alpha", device="cpu")
    f, none = layer_alphas(summary.layer_weights(), "farms", device="cpu", grid=3)
    assert set(a) == set(f) == {l.name for l in summary.layers} and none is None
    assert stats["layers.0.q"]["alpha"] == a["layers.0.q"]
    assert allocate("farms", summary, 0.5, grid=3, device="cpu").info["farms_alpha"] == f
    assert all(x > 1 for x in list(a.values()) + list(f.values()))
    with pytest.raises(PrunekitError):
        allocate("alphapruning", ModelSummary(summary.layers), 0.5)


# ----------------------------------------------------------------------------- through the engine


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


@pytest.mark.parametrize("alloc", ["global", "mrp", "owl", "alphapruning", "farms", "er", "er-plus", "atp"])
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
