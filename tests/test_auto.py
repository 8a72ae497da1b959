"""``auto`` allocation parameters (prunekit.pruning.auto): a value is picked from the registered grid by the
held-out NLL of trial prunes, the trials leave no trace on the final model, and a parameter without a grid
is refused."""
import pytest
import torch

import prunekit

from conftest import tiny_model


def test_auto_picks_a_grid_value_and_restores_weights():
    calib_ids = torch.randint(0, 128, (20, 24), generator=torch.Generator().manual_seed(1))  # more than 16 windows
    a = tiny_model("llama", layers=4)
    ra = prunekit.prune(a, None, {"metric": "wanda", "sparsity": 0.7, "allocation": "alphapruning",
                                  "allocation_params": {"eps": "auto"}}, calib_ids=calib_ids)
    auto = ra["allocation"]["auto"]
    eps = auto["chosen"]["eps"]
    assert [t["params"]["eps"] for t in auto["trials"]] == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    best = min(auto["trials"], key=lambda t: t["heldout_nll"])
    assert best["params"]["eps"] == eps
    # the final model equals a direct run with the chosen value: trials left no trace
    b = tiny_model("llama", layers=4)
    rb = prunekit.prune(b, None, {"metric": "wanda", "sparsity": 0.7, "allocation": "alphapruning",
                                  "allocation_params": {"eps": eps}}, calib_ids=calib_ids)
    for n in ra.masks:
        assert torch.equal(ra.masks[n], rb.masks[n])
    # the trial of the chosen value is the real prune (every calibration window): the final model's NLL on the
    # held-out windows (without a tokenizer: the last calibration windows) is that trial's
    from prunekit.core.nll import nll_of_windows

    final = float(nll_of_windows(a, calib_ids[-4:], "cpu", batch_size=4).mean())
    assert final == pytest.approx(best["heldout_nll"], rel=1e-5)


def test_every_auto_grid_can_choose_uniform(calib_ids):
    """Every registered grid holds the value at which its allocator is uniform (AlphaPruning's and FARMS's eps,
    OWL's lam, ATP's beta = 0), so ``auto`` can decide that reallocating does not pay on the model at hand: that
    value's ratios are the target in every layer."""
    from prunekit.core.allocation import get_allocator

    plan = {"alphapruning": "eps", "farms": "eps", "owl": "lam", "atp": "beta"}
    for name, key in plan.items():
        assert 0.0 in get_allocator(name).auto[key], name
        r = prunekit.prune(tiny_model("llama", layers=4), None,
                           {"metric": "wanda", "sparsity": 0.6, "allocation": name, "allocation_params": {key: 0.0}},
                           calib_ids=calib_ids)
        sparsities = [b["sparsity"] for b in r["blocks"]]
        assert max(sparsities) - min(sparsities) < 1e-3, (name, sparsities)


def test_auto_unknown_parameter_is_refused(calib_ids):
    with pytest.raises(prunekit.PrunekitError, match="alphapruning xmin_mode must be 'all' or 'peak', got 'auto'"):
        prunekit.prune(tiny_model("llama"), None, {"metric": "wanda", "allocation": "alphapruning",
                                                   "allocation_params": {"xmin_mode": "auto"}}, calib_ids=calib_ids)
    with pytest.raises(prunekit.PrunekitError, match="has no parameter"):  # a name the allocator lacks: config
        prunekit.prune(tiny_model("llama"), None, {"metric": "wanda", "allocation": "er",
                                                   "allocation_params": {"x": "auto"}}, calib_ids=calib_ids)


def test_published_defaults_that_split_the_models_are_tuned_unless_given(calib_ids):
    """A prune run tunes AlphaPruning's and FARMS's eps and OWL's lam (``auto``) unless the user gives them: the
    published AlphaPruning eps 0.3 and OWL lam 0.08 improved Wanda 70% on SmolLM2 and made Qwen2.5-Coder-0.5B worse
    than uniform (README; FARMS shares AlphaPruning's eps, and its ``auto`` was better than 0.3 on Qwen, equal on
    SmolLM2). A given value is
    used as given, the user's parameters keep their order (the coordinate search follows it), and the pure
    function and ``published_params`` keep the published value."""
    from prunekit.core.allocation import get_allocator, published_params, register_allocator

    make = prunekit.make_config
    assert make(allocation="alphapruning").allocation_params == {"eps": "auto"}
    assert make(allocation="alphapruning", allocation_params={"eps": 0.3}).allocation_params == {"eps": 0.3}
    cfg = make(allocation="alphapruning", allocation_params={"level": "layer"}, granularity="layer")
    assert list(cfg.allocation_params.items()) == [("level", "layer"), ("eps", "auto")]
    assert make(allocation="farms").allocation_params == {"eps": "auto"}
    assert make(allocation="owl").allocation_params == {"lam": "auto"}
    assert make(allocation="owl", allocation_params={"M": 3}).allocation_params == {"M": 3.0, "lam": "auto"}
    assert make(allocation="er").allocation_params == {} and make().allocation_params == {}
    assert published_params("alphapruning", {"level": "layer"}) == {"level": "layer", "eps": 0.3}
    assert get_allocator("alphapruning").params().eps == 0.3
    with pytest.raises(ValueError, match="no 'auto' grid"):
        register_allocator("no-grid", default_auto=("eps",))
    run = {"metric": "wanda", "sparsity": 0.7, "allocation": "alphapruning"}
    ra = prunekit.prune(tiny_model("llama", layers=4), None, run, calib_ids=calib_ids)
    rb = prunekit.prune(tiny_model("llama", layers=4), None, {**run, "allocation_params": {"eps": "auto"}},
                        calib_ids=calib_ids)
    assert [t["params"]["eps"] for t in ra["allocation"]["auto"]["trials"]] == get_allocator("alphapruning").auto["eps"]
    assert ra["allocation"]["auto"] == rb["allocation"]["auto"]
    from prunekit.pruning.report import report_markdown

    chosen = ra["allocation"]["auto"]["chosen"]["eps"]
    assert f"- allocation parameters: eps={chosen}" in report_markdown(ra)
    assert f"- `auto` chose eps={chosen}; mean NLL" in report_markdown(ra)
    for n in ra.masks:
        assert torch.equal(ra.masks[n], rb.masks[n])


def test_auto_logs_each_trial_with_its_loss_and_memory(calib_ids, caplog):
    """Each value tried is logged with its held-out NLL and the process's resident and peak memory, and the choice;
    the peak is read from getrusage and is never below the resident memory."""
    import logging

    from prunekit.core.offload import peak_rss_bytes, rss_bytes

    with caplog.at_level(logging.INFO, logger="prunekit.pruning.auto"):
        r = prunekit.prune(tiny_model("llama", layers=4), None, {"metric": "wanda", "sparsity": 0.7,
                                                                 "allocation": "farms"}, calib_ids=calib_ids)
    text = caplog.text
    for t in r["allocation"]["auto"]["trials"]:
        assert f"eps={t['params']['eps']} held-out NLL {t['heldout_nll']:.4f} (resident memory" in text
    assert f"eps=auto chose {r['allocation']['auto']['chosen']['eps']}" in text
    x = torch.ones(16 << 20)  # 64 MB, touched
    rss, peak = rss_bytes(), peak_rss_bytes()
    assert peak >= rss >= x.numel() * 4
