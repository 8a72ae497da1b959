"""The prune configuration (prunekit.pruning.config): bad values are refused with a message that names the
valid ones, and YAML recipes load with overrides."""
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
