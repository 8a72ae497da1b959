"""The prune configuration (prunekit.pruning.config): bad values (metric, sparsity, pattern, allocation
parameters) are refused with a message that names the valid ones, before any calibration pass; YAML recipes
load with overrides."""
import pytest

import prunekit
from prunekit.core.errors import PrunekitError


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
