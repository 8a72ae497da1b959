"""Searched allocations (prunekit.search): the fitness (cached vs full mode, ignore patterns, metric
parameters, score profiles from its statistics), the DSA / random / TPE / OptiShear searches (deterministic
for a seed, checkpoint and resume after a crash give the uninterrupted result), and KV-cache quantisation."""
import json

import pytest
import torch

import prunekit
from prunekit.methods.dsa import Program
from prunekit.search import run_search
from prunekit.search.fitness import Fitness

from conftest import calib_and_heldout, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- fitness
def test_fitness_cached_mode_matches_full_mode_for_weight_only_metric():
    model = tiny_model("opt", layers=3)
    calib, held = calib_and_heldout()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    names = None
    vals = {}
    for mode in ("cached", "full"):
        f = Fitness(model, calib, held, metric="magnitude", device="cpu", mode=mode)
        names = list(f.layers)
        a = {n: 0.3 + 0.1 * (i % 3) for i, n in enumerate(names)}
        b = {n: 0.5 for n in names}
        vals[mode] = [f.evaluate(a), f.evaluate(b), f.evaluate(dict(a, **{names[0]: 0.9})), f.evaluate(None)]
        f.close()
        for k, v in model.state_dict().items():  # left dense
            assert torch.equal(v, dense[k]), k
    assert vals["cached"] == pytest.approx(vals["full"], rel=1e-6)
    assert len(set(vals["cached"])) == 4


def test_fitness_rejects_a_misspelt_ignore_pattern():
    """The search honours ``ignore`` like prune does, so a pattern that matches no layer (which would silently
    prune a layer meant to stay dense) fails before the statistics pass, with the model left as it was."""
    import prunekit

    model = tiny_model("opt", layers=3)
    calib, held = calib_and_heldout()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(prunekit.PrunekitError, match="ignore pattern\\(s\\) 'fc3' match no prunable layer"):
        Fitness(model, calib, held, metric="wanda", device="cpu", prune_kwargs={"ignore": ["fc3"]})
    f = Fitness(model, calib, held, metric="wanda", device="cpu", prune_kwargs={"ignore": ["fc2"]})
    assert f.layers and not any(n.endswith(".fc2") for n in f.layers)
    f.close()
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- searches
def _run(method, out_dir, budget, seed=0, resume=True, family="llama", **kw):
    model = tiny_model(family, layers=4)
    calib, held = calib_and_heldout()
    return run_search(model, None, method, budget, 0.5, calib_ids=calib, heldout_ids=held, out_dir=out_dir,
                      seed=seed, resume=resume, device="cpu", progress=False, **kw)


def _strip(res):
    return {k: v for k, v in res.items() if k not in ("seconds", "checkpoint", "resumed_from", "fitness")}


def test_dsa_search_is_deterministic_for_a_seed(tmp_path):
    a = _run("dsa", tmp_path / "a", 14, population=5)
    b = _run("dsa", tmp_path / "b", 14, population=5)
    assert _strip(a) == _strip(b)
    assert a["evaluations"] == 14 and a["generations"] >= 3
    assert [h["eval"] for h in a["history"]] == list(range(1, 15))
    bests = [h["best_fitness"] for h in a["history"]]
    assert bests == [min(h["fitness"] for h in a["history"][:i + 1]) for i in range(14)]
    assert a["best"]["fitness"] == bests[-1] == a["history"][-1]["best_fitness"]
    assert len({h["program"] for h in a["history"]}) == 14  # de-duplicated
    assert Program.parse(a["best"]["program"]).readable() == a["best"]["readable"]
    assert a["recipe"]["allocation"] == "dsa" and a["recipe"]["allocation_params"]["program"] == a["best"]["program"]
    saved = json.loads((tmp_path / "a" / "dsa_result.json").read_text())
    assert saved["best"] == a["best"]
    c = _run("dsa", tmp_path / "c", 14, seed=1, population=5)
    assert [h["program"] for h in c["history"]] != [h["program"] for h in a["history"]]


def test_found_program_is_reused_without_searching(tmp_path):
    import prunekit

    res = _run("dsa", tmp_path, 6, population=3)
    model = tiny_model("llama", layers=4)
    calib, _ = calib_and_heldout()
    # run_search held out nothing from calib_ids here (heldout_ids given): the same windows reproduce the scores
    rep = prunekit.prune(model, None, dict(res["recipe"], device="cpu"), calib_ids=calib)
    blocks = {}
    for l in rep["layers"]:
        blocks.setdefault(l["block"], l["target"])
    assert [blocks[b] for b in range(4)] == pytest.approx(res["best"]["block_ratios"], abs=1e-6)


class _Crash(RuntimeError):
    pass


def _crash_after(monkeypatch, n):
    """Make the n-th fresh fitness evaluation (held-out forward) raise."""
    calls = {"n": 0}
    orig = Fitness.heldout_ppl

    def boom(self):
        calls["n"] += 1
        if calls["n"] == n:
            raise _Crash("simulated crash")
        return orig(self)

    monkeypatch.setattr(Fitness, "heldout_ppl", boom)
    return calls


@pytest.mark.parametrize("method", ["dsa", "random"])
def test_resume_after_crash_gives_the_uninterrupted_result(tmp_path, monkeypatch, method):
    full = _run(method, tmp_path / "full", 12, population=4)
    calls = _crash_after(monkeypatch, 2 + 7)  # dense + uniform baselines, then 6 candidates finish
    with pytest.raises(_Crash):
        _run(method, tmp_path / "crash", 12, population=4)
    state = json.loads((tmp_path / "crash" / f"{method}_state.json").read_text())
    assert len(state["history"]) == 6
    monkeypatch.undo()
    calls = _crash_after(monkeypatch, 10 ** 9)
    resumed = _run(method, tmp_path / "crash", 12, population=4)
    assert calls["n"] == 12 - 6  # finished candidates (and the baselines) are not evaluated again
    assert resumed["resumed_from"]["evaluations"] == 6
    assert _strip(resumed) == _strip(full)
    # a larger budget continues the same search
    more = _run(method, tmp_path / "crash", 15, population=4)
    assert more["history"][:12] == full["history"] and more["evaluations"] == 15
    with pytest.raises(Exception, match="different search"):
        _run(method, tmp_path / "crash", 15, seed=3, population=4)
    fresh = _run(method, tmp_path / "crash", 12, resume=False, population=4)
    assert _strip(fresh) == _strip(full)


# ----------------------------------------------------------------------------- TPE + KV cache
def test_kv_fake_quantisation():
    from prunekit.search.kvquant import fake_quant, kv_memory_fraction, kv_quant_hooks

    x = torch.randn(3, 5, 16)
    for bits, tol in ((8, 0.05), (4, 0.5)):
        q = fake_quant(x, bits, 8)
        assert float((q - x).abs().max()) < tol
        assert all(len(torch.unique(g)) <= 2 ** bits for g in q.reshape(-1, 8))
    model = tiny_model("llama", layers=2)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        dense = model(ids).logits
        hooks = kv_quant_hooks(model, [2, 8])
        quant = model(ids).logits
        for h in hooks:
            h.remove()
        again = model(ids).logits
    assert torch.equal(dense, again) and not torch.allclose(dense, quant)
    # head_dim 8: fp16 scale + minimum per 8 values = 4 extra bits per value
    assert kv_memory_fraction(model, [4, 4]) == pytest.approx(8 / 16)


@pytest.mark.slow  # four TPE runs, 26 trials in SQLite storage: 2.3-6.5 s here
def test_tpe_search_resume_is_identical(tmp_path, monkeypatch):
    pytest.importorskip("optuna")
    kw = dict(n_groups=2, n_startup_trials=3, kv_budget=0.5)
    full = _run("tpe", tmp_path / "full", 6, **kw)
    assert full["evaluations"] == 6 and full["best"]["kv_fraction"] <= 0.5 + 1e-12
    assert abs(sum(full["best"]["block_ratios"]) / 4 - 0.5) < 1e-9  # equal block sizes: exact target
    assert 0 < full["best"]["kv_memory_saved"] < 1
    assert full["recipe"]["sparsity"] == full["best"]["block_ratios"]
    # crash inside the 4th evaluated trial (3 baselines first), then resume
    _crash_after(monkeypatch, 3 + 4)
    with pytest.raises(_Crash):
        _run("tpe", tmp_path / "crash", 6, **kw)
    monkeypatch.undo()
    resumed = _run("tpe", tmp_path / "crash", 6, **kw)
    assert resumed["resumed_from"]["evaluations"] == 3
    assert resumed["history"] == full["history"] and resumed["best"] == full["best"]
    # a trial left RUNNING by a kill -9 is redone
    import optuna

    study = optuna.load_study(study_name="prunekit-tpe", storage=f"sqlite:///{tmp_path / 'crash' / 'tpe.db'}")
    study.ask()
    again = _run("tpe", tmp_path / "crash", 7, **kw)
    assert again["resumed_from"]["stale_trials"] == 1 and again["history"][:len(full["history"])] == full["history"]


# ----------------------------------------------------------------------------- OptiShear
def test_optishear_search_pareto_and_resume(tmp_path, monkeypatch):
    pytest.importorskip("pymoo")
    kw = dict(population=6, n_fitness_windows=4)
    full = _run("optishear", tmp_path / "full", 12, **kw)
    assert full["evaluations"] == 12 and full["generations"] == 2
    assert full["best"]["sparsity"] == 0.5 and abs(sum(full["best"]["block_ratios"]) / 4 - 0.5) < 1e-9
    assert all(h["sparsity"] >= 0.5 - 1e-9 for h in full["history"])  # the target is a constraint
    front = [(p["kl"], -p["sparsity"]) for p in full["pareto"]]
    for h in full["history"]:  # nothing evaluated dominates a Pareto point
        for f in front:
            assert not (h["kl"] <= f[0] and -h["sparsity"] <= f[1] and (h["kl"], -h["sparsity"]) != f)
    calls = {"n": 0}
    orig = Fitness.kl_to_dense

    def boom(self):
        calls["n"] += 1
        if calls["n"] == 9:  # 8 candidates finished (generation 0 and 2 of generation 1)
            raise _Crash("simulated crash")
        return orig(self)

    monkeypatch.setattr(Fitness, "kl_to_dense", boom)
    with pytest.raises(_Crash):
        _run("optishear", tmp_path / "crash", 12, **kw)
    monkeypatch.undo()
    resumed = _run("optishear", tmp_path / "crash", 12, **kw)
    assert resumed["resumed_from"]["evaluations"] == 8
    assert _strip(resumed) == _strip(full)


def test_search_prunes_with_the_metric_params():
    """metric_params reach the candidates: on a one-block model the cached fitness (dense inputs) prunes exactly
    like ``prunekit.prune`` with the same parameters, and differently from the metric's default; the
    result records the values and the recipe carries them."""
    import prunekit

    calib, held = calib_and_heldout()
    zeros = {}
    for alpha in (None, 1.0):
        model = tiny_model("llama", layers=1)
        kw = {} if alpha is None else {"prune_kwargs": {"metric_params": {"alpha": alpha}}}
        f = Fitness(model, calib, held, metric="ria", device="cpu", **kw)
        f.apply({n: 0.5 for n in f.layers})
        zeros[alpha] = {n: (m.weight == 0).clone() for n, m in f.layers.items()}
        f.close()
    ref = tiny_model("llama", layers=1)
    prunekit.prune(ref, None, {"metric": "ria", "metric_params": {"alpha": 1.0}, "sparsity": 0.5, "device": "cpu",
                               "sequential": False}, calib_ids=calib)
    got = {n: m.weight == 0 for n, m in ref.named_modules() if n in zeros[1.0]}
    assert got.keys() == zeros[1.0].keys()
    assert all(torch.equal(got[n], zeros[1.0][n]) for n in got)
    assert any(not torch.equal(zeros[None][n], zeros[1.0][n]) for n in got)  # the parameter changes masks

    res = _run("random", None, 3, population=3, metric="ria", metric_params={"alpha": 1.0})
    assert res["metric_params"]["alpha"] == 1.0
    assert res["recipe"]["metric"] == "ria" and res["recipe"]["metric_params"] == {"alpha": 1.0}
    with pytest.raises(prunekit.PrunekitError, match="ria has no parameter 'beta'; valid: alpha"):
        _run("random", None, 3, population=3, metric="ria", metric_params={"beta": 1.0})


@pytest.mark.parametrize("metric", ["wanda", "ria", "sparsegpt"])
def test_score_profile_from_the_fitness_statistics_equals_a_calibration_pass(metric):
    """The search takes DSA's score profile from the cached fitness's dense statistics instead of a second
    calibration pass; both are the metric's scores on the dense model for the same windows (SparseGPT's
    Hessian-only statistics do not cover Wanda's stand-in score, so it keeps the pass)."""
    from prunekit.core.metric import get_metric
    from prunekit.pruning.allocator_inputs import score_needs, score_profile, score_profile_from_stats

    model = tiny_model("llama", layers=3)
    calib, held = calib_and_heldout()
    f = Fitness(model, calib, held, metric=metric, device="cpu")
    m = get_metric(metric)
    ref = score_profile(model, f.blocks, f.block_layers, calib, m, torch.device("cpu"), None, seed=3, keep=500)
    covered = all(score_needs(m) <= f.stats[n].needs for n in f.layers)
    assert covered == (metric != "sparsegpt")
    if not covered:
        with pytest.raises(prunekit.PrunekitError, match="score profile: no"):
            score_profile_from_stats(f.block_layers, f.stats, m, seed=3, keep=500)
    else:
        got = score_profile_from_stats(f.block_layers, f.stats, m, seed=3, keep=500)
        assert got.keys() == ref.keys()
        for n in ref:
            assert torch.allclose(got[n], ref[n], rtol=1e-5, atol=0), n
    f.close()
