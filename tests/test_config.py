"""The prune configuration (prunekit.pruning.config): bad values (metric, sparsity, pattern, allocation
parameters, row-wise and reconstruction settings) are refused with a message that names the valid ones,
before any calibration pass; layer patterns that match no prunable layer are refused before the model is
touched; YAML recipes load with overrides."""
import pytest
import torch

import prunekit
from prunekit.core.errors import PrunekitError

from conftest import tiny_model


def test_unknown_metric_lists_valid_ones():
    with pytest.raises(PrunekitError, match=r"unknown metric 'foo'; valid: .*magnitude.*wanda"):
        prunekit.make_config(metric="foo")


@pytest.mark.parametrize("s", [1.0, -0.1, 1.5])
def test_sparsity_out_of_range(s):
    with pytest.raises(PrunekitError, match=r"sparsity must be in \[0, 1\)"):
        prunekit.make_config(sparsity=s)


@pytest.mark.parametrize("pattern,msg", [("4:4", "0 < N < M"), ("5:4", "0 < N < M"), ("2-4", "unknown pattern")])
def test_bad_nm(pattern, msg):
    with pytest.raises(PrunekitError, match=msg):
        prunekit.make_config(pattern=pattern)


def test_recipe_yaml_and_overrides(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("metric: magnitude\nsparsity: 0.6\npattern: '2:4'\n")
    cfg = prunekit.load_recipe(f, sparsity=0.5)
    assert (cfg.metric, cfg.sparsity, cfg.pattern) == ("magnitude", 0.5, "2:4")
    f.write_text("metric: magnitude\nbogus: 1\n")
    with pytest.raises(PrunekitError, match="bogus"):
        prunekit.load_recipe(f)


@pytest.mark.parametrize("alloc,params,msg", [
    ("owl", {"foo": 1}, "allocation_params: owl has no parameter 'foo'; valid: M, lam"),
    ("uniform", {"eps": 0.2}, "allocation_params: uniform has no parameter 'eps'; valid: none"),
    ("alphapruning", {"lam": 0.1, "eps": 0.2}, "has no parameter 'lam'; valid: xmin_mode, .*eps, level"),
    ("mrp", {"step": 2}, "'step'; valid: steps, frac, lam, M")])
def test_unknown_allocation_parameters_are_refused_by_the_config(alloc, params, msg):
    """Before any calibration pass (OWL's profile, AlphaPruning's ESD fits): the allocator itself would refuse
    them only afterwards, and uniform would ignore them."""
    import prunekit

    with pytest.raises(prunekit.PrunekitError, match=msg):
        prunekit.make_config(allocation=alloc, allocation_params=params)
    from prunekit.core.allocation import ALLOCATORS

    assert list(ALLOCATORS["owl"].params.model_fields) == ["M", "lam"] and not ALLOCATORS["uniform"].params.model_fields
    prunekit.make_config(allocation="owl", allocation_params={"lam": "auto", "M": 5})  # valid names pass


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
                                     ({"reconstruct": "obs"}, "unknown reconstruct 'obs'; valid: admm, alps, sparsegpt"),
                                     ({"reconstruct": "admm", "reconstruct_params": {"iters": 0}},
                                      "reconstruct_params: admm iters must be >= 1, got 0"),
                                     ({"reconstruct": "admm", "reconstruct_params": {"rho": "big"}},
                                      "admm rho must be a finite number, got 'big'"),
                                     ({"metric": "alps", "metric_params": {"pcg_rtol": 0}}, "pcg_rtol must be > 0"),
                                     ({"metric": "alps", "reconstruct": "admm"}, "alps already reconstructs weights"),
                                     ({"refine": "swap"}, "unknown refine method 'swap'; valid: dsnot, swaps"),
                                     ({"refine": "swaps", "refine_params": {"max_swap": 3}},
                                      "swaps has no parameter 'max_swap'; valid: max_swaps, candidates, percdamp"),
                                     ({"refine": "dsnot", "refine_params": {"max_cycles": -1}},
                                      "dsnot max_cycles must be >= 0, got -1"),
                                     ({"refine_params": {"max_swaps": 3}}, "refine_params set without refine"),
                                     ({"allocation": "atp", "allocation_params": {"beta": -0.01}}, "beta must be >= 0.0"),
                                     ({"allocation": "atp", "allocation_params": {"gamma": 1}},
                                      "atp has no parameter 'gamma'; valid: beta"),
                                     ({"pattern": "2:4", "allocation": "owl"}, "has nothing to move")])
def test_rowwise_config_errors(bad, msg):
    with pytest.raises(prunekit.PrunekitError, match=msg):
        prunekit.make_config(**bad)


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
