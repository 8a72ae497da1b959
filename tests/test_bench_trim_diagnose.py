"""bench.trim_diagnose measures what it says: all-token output errors from X^T X, TRIM's own rows."""
import pytest
import torch

from bench import trim_diagnose as td
from conftest import tiny_model


def test_output_measures_equal_direct_computation():
    g = torch.Generator().manual_seed(0)
    W, X = torch.randn(12, 20, generator=g), torch.randn(300, 20, generator=g) * torch.linspace(0.1, 3, 20)
    Wp = W * (torch.rand(12, 20, generator=g) > 0.6)
    err, cos = td.output_measures(W, Wp, X.t() @ X)
    Y, Yp = (X @ W.t()).double(), (X @ Wp.t()).double()
    assert abs(err - float((Y - Yp).pow(2).sum() / Y.pow(2).sum())) < 1e-5
    assert abs(cos - float((Y * Yp).sum() / (Y.norm() * Yp.norm()))) < 1e-5
    assert abs(td.last_cos(W, Wp, X) - cos) < 1e-5


def test_diagnose_arms_prune_the_same_count_and_trim_wins_its_objective(calib_ids):
    model = tiny_model("llama", hidden=64)
    stats = td.gather(model, calib_ids, {"sq_sum", "hessian", "last_tokens"}, "cpu", tokens_per_sample=td.TOKENS)
    one = td.gather(model, calib_ids, {"last_tokens"}, "cpu", tokens_per_sample=1)
    for n, st in stats.items():  # the k = 1 rows the bench slices out are the engine's own k = 1 rows
        x8 = st.last_token_inputs()
        assert torch.equal(x8.view(-1, td.TOKENS, x8.shape[1])[:, -1], one[n].last_token_inputs())
    hess = {s: {n: st.hessian for n, st in stats.items()} for s in td.SETS}
    rows = td.diagnose(model, stats, hess, 0.6)
    for r in rows.values():
        assert len(set(r["pruned"].values())) == 1  # TRIM keeps the layer's total exact
        assert r["trim/cos_last"] >= r["uniform/cos_last"] - 1e-9  # never below uniform on its own objective
        assert abs(r["uniform/err_calib"] - r["uniform/err_wiki"]) < 1e-9  # same H -> same numbers
    summ = td.summarise(rows, "trim")
    assert summ["cos_last"]["trim_better"] == summ["cos_last"]["layers"] > 0


def test_ablation_arms_name_the_layer_kinds():
    kinds = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert td.arm_kinds("none", kinds) == set()
    assert td.arm_kinds("all", kinds) == set(kinds)
    assert td.arm_kinds("all-up_proj-gate_proj", kinds) == set(kinds) - {"up_proj", "gate_proj"}
    assert td.arm_kinds("down_proj+q_proj", kinds) == {"down_proj", "q_proj"}
    assert td.arm_kinds("v_proj", kinds) == {"v_proj"}
    for bad in ("all-up_prj", "down_proj+q_prj", "mlp"):  # a typo is an error, never a silent 'all'
        with pytest.raises(SystemExit, match="unknown layer kinds"):
            td.arm_kinds(bad, kinds)
