"""``auto`` allocation parameters (prunekit.pruning.auto): a value is picked from the registered grid by the
held-out NLL of trial prunes, the trials leave no trace on the final model, and a parameter without a grid
is refused."""
import pytest
import torch

import prunekit

from conftest import tiny_model


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
