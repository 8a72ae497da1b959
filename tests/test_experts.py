"""Mixture-of-experts pruning (prunekit.core.experts, through prunekit.prune) on tiny random configs of every
supported MoE type: per-expert statistics and Wanda masks against a naive reference that routes the calibration
tokens by brute force, the statistics passes in several batches, experts without tokens, N:M and SparseGPT per
expert, the router staying dense, the prunable share and the refusal of a prune that would leave most weights
dense, the sparsity over all block weights counted from the saved tensors, reload and ``verify``."""
import copy
import dataclasses
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

import prunekit
from prunekit.cli import main
from prunekit.core import families
from prunekit.core.blocks import iterate_blocks
from prunekit.core.errors import PrunekitError
from prunekit.core.families import block_linears, get_blocks, weight_view
from prunekit.core.masks import unpack_mask
from prunekit.pruning.pipeline import save_pruned
from prunekit.pruning.verify import verify_saved

from conftest import MOE_TYPES, STORIES_HF, TINY_TEXT, tiny_moe
from test_blocks import brute_force_row_mask, capture_layer_input, execution_order, wanda_matches

ISSUE_TYPES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]


@pytest.fixture
def ids():
    return torch.randint(0, 128, (6, 24), generator=torch.Generator().manual_seed(1))


def capture_routing(model, experts, ids):
    """(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) the experts module receives in a full-model
    forward."""
    got = {}

    def pre(_m, args, kwargs):
        vals = list(args) + list(kwargs.values())
        got["h"], got["i"], got["w"] = (v.detach().clone() for v in vals[:3])

    h = experts.register_forward_pre_hook(pre, with_kwargs=True)
    with torch.no_grad():
        model(ids, use_cache=False)
    h.remove()
    return got["h"], got["i"], got["w"]


def routed(index, e):
    """Brute force: (token, slot) pairs routed to expert e, in token order."""
    return [(t, k) for t in range(index.shape[0]) for k in range(index.shape[1]) if int(index[t, k]) == e]


def expert_weights(experts, e):
    """Expert e's (gate, up, down) of the plain layout: gate_up [E, 2I, H] (gate rows first), down [E, H, I]."""
    gu = experts.gate_up_proj.data[e]
    half = gu.shape[0] // 2
    return gu[:half], gu[half:], experts.down_proj.data[e]


def naive_moe_wanda(model, ids, sparsity, sequential):
    """Reference Wanda masks: the dense layers as in test_blocks (full-model forwards), then each expert from the
    tokens routed to it (brute force), its down projection from the gate/up outputs it then has."""
    masks = {}
    for b, block in enumerate(model.model.layers):
        prefix = f"model.layers.{b}"
        linears = {f"{prefix}.{n}": m for n, m in block.named_modules()
                   if isinstance(m, nn.Linear) and not n.endswith("shared_expert_gate")}
        order = execution_order(model, linears, ids)
        experts = block.mlp.experts

        def prune(name, W, x):
            norm = x.double().pow(2).sum(0).sqrt()
            masks[name] = torch.from_numpy(brute_force_row_mask((W.double().abs() * norm[None, :]).numpy(), sparsity))
            W[masks[name]] = 0

        if sequential:
            for n in order:
                prune(n, linears[n].weight.data, capture_layer_input(model, linears[n], ids))
        else:
            xs = {n: capture_layer_input(model, linears[n], ids) for n in order}
        h, index, _ = capture_routing(model, experts, ids)
        if not sequential:
            for n in order:
                prune(n, linears[n].weight.data, xs[n])
        with torch.no_grad():
            for e in range(experts.num_experts):
                X = h[[t for t, _ in routed(index, e)]]
                G, U, D = expert_weights(experts, e)
                mid_dense = experts.act_fn(X @ G.t()) * (X @ U.t())
                prune(f"{prefix}.mlp.experts.{e}.gate_proj", G, X)
                prune(f"{prefix}.mlp.experts.{e}.up_proj", U, X)
                mid = experts.act_fn(X @ G.t()) * (X @ U.t()) if sequential else mid_dense
                prune(f"{prefix}.mlp.experts.{e}.down_proj", D, mid)
    return masks


@pytest.mark.parametrize("model_type", ISSUE_TYPES)
@pytest.mark.parametrize("sequential", [True, False])
def test_wanda_per_expert_matches_naive_reference(model_type, sequential, ids):
    model = tiny_moe(model_type, dtype=torch.float64)  # float64: no rounding tie decides a mask
    ref = naive_moe_wanda(copy.deepcopy(model), ids, 0.5, sequential)
    report = wanda_matches(model, ref, ids, sequential, model_type)
    assert report["experts"]["matrices"] == 2 * 4 * 3 and report["experts"]["without_tokens"] == 0


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_expert_statistics_are_those_of_the_routed_tokens(model_type, ids):
    """count, sums, X^T X and routing weights of every expert matrix: the routed tokens (and, for down, the
    expert's own intermediate activations), compared with a brute-force routing of a full-model forward."""
    model = tiny_moe(model_type, dtype=torch.float64)
    got = {}

    def handle(name, module, st):
        got[name] = (st.count, st.sq_sum.clone(), st.sum.clone(), st.hessian.clone(), st.gate_sum)

    iterate_blocks(model, get_blocks(model), block_linears(model), ids, frozenset({"sq_sum", "sum", "hessian"}),
                   handle, "cpu")
    for b, block in enumerate(model.model.layers):
        experts = block.mlp.experts
        h, index, w = capture_routing(model, experts, ids)
        for e in range(experts.num_experts):
            pairs = routed(index, e)
            X = h[[t for t, _ in pairs]]
            g = sum(float(w[t, k]) for t, k in pairs)
            if experts.is_transposed:  # gpt_oss: [E, H, 2I] interleaved gate/up, biases, its own gating
                mid = experts._apply_gate(X @ experts.gate_up_proj[e].detach() + experts.gate_up_proj_bias[e].detach())
            else:
                G, U, _ = expert_weights(experts, e)
                mid = experts.act_fn(X @ G.t()) * (X @ U.t())
            for proj, x in (("gate_proj", X), ("up_proj", X), ("down_proj", mid)):
                n, sq, s, H, gs = got[f"model.layers.{b}.mlp.experts.{e}.{proj}"]
                assert n == len(pairs)
                assert torch.allclose(sq, x.double().pow(2).sum(0), rtol=1e-6)  # sums of float32 inputs
                assert torch.allclose(s, x.double().sum(0), rtol=1e-6, atol=1e-6)
                assert float((H.double() - x.double().t() @ x.double()).abs().max()) < 1e-4 * float(H.abs().max())
                assert gs == pytest.approx(g, rel=1e-9)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_several_batches_give_the_single_pass_masks(model_type, ids):
    """One pass per stage (all experts' gate/up in one stage, all downs in the next) picks the single pass's masks."""
    a, b = tiny_moe(model_type, dtype=torch.float64), tiny_moe(model_type, dtype=torch.float64)
    ra = prunekit.prune(a, None, {"metric": "wanda", "sparsity": 0.5}, calib_ids=ids)
    rb = prunekit.prune(b, None, {"metric": "wanda", "sparsity": 0.5, "batch_size": 2}, calib_ids=ids)
    assert all(torch.equal(ra.masks[n], rb.masks[n]) for n in ra.masks)


def never_route(model, expert: int):
    """Make every router of ``model`` send no token to ``expert`` (the slot goes to the lowest free expert)."""
    def post(_m, _args, out):
        logits, weights, index = out
        index = index.clone()
        for t in range(index.shape[0]):
            for k in range(index.shape[1]):
                if int(index[t, k]) == expert:
                    index[t, k] = next(e for e in range(logits.shape[-1]) if e != expert and e not in index[t].tolist())
        return logits, weights, index

    return [blk.mlp.gate.register_forward_hook(post) for blk in model.model.layers]


def test_an_expert_without_tokens_is_pruned_by_magnitude(ids):
    model = tiny_moe("mixtral")
    hooks = never_route(model, 3)
    dense = {n: weight_view(m).clone() for d in block_linears(model) for n, m in d.items()}
    report = prunekit.prune(model, None, {"metric": "wanda", "sparsity": 0.5}, calib_ids=ids)
    for h in hooks:
        h.remove()
    x = report["experts"]
    assert x["without_tokens"] == 2 * 3 and x["fallback"].startswith("magnitude")
    for rec in report["layers"]:
        if rec.get("expert") == 3:
            assert rec["fallback"] == "magnitude" and rec["tokens"] == 0
            W = dense[rec["name"]]
            k = int(W.numel() * 0.5)
            want = torch.zeros(W.numel(), dtype=torch.bool)
            want[torch.sort(W.abs().flatten(), stable=True).indices[:k]] = True
            assert torch.equal(unpack_mask(report.masks[rec["name"]], W.shape), want.reshape(W.shape))
        elif "expert" in rec:
            assert "fallback" not in rec and rec["tokens"] > 0 and 0 < rec["routing_weight"] <= 1


@pytest.mark.parametrize("metric,pattern", [("sparsegpt", "unstructured"), ("wanda", "2:4"), ("sparsegpt", "2:4"),
                                            ("ria", "unstructured"), ("ace", "unstructured")])
def test_every_metric_and_nm_per_expert(metric, pattern, ids):
    model = tiny_moe("qwen3_moe")
    report = prunekit.prune(model, None, {"metric": metric, "pattern": pattern, "sparsity": 0.5},
                            calib_ids=ids)
    assert abs(report["overall_sparsity"] - 0.5) < 1e-12
    for d in block_linears(model):
        for name, m in d.items():
            W = weight_view(m)
            if pattern == "2:4":
                assert bool(((W.reshape(W.shape[0], -1, 4) == 0).sum(-1) >= 2).all()), name
            assert int((W == 0).sum()) >= W.numel() // 2, name


def test_reconstruct_per_expert_changes_only_kept_weights(ids):
    model = tiny_moe("olmoe")
    dense = copy.deepcopy(model)
    report = prunekit.prune(model, None, {"metric": "wanda", "sparsity": 0.5, "reconstruct": "sparsegpt"},
                            calib_ids=ids)
    before = {n: weight_view(m) for d in block_linears(dense) for n, m in d.items()}
    changed = 0
    for d in block_linears(model):
        for name, m in d.items():
            mask = unpack_mask(report.masks[name], before[name].shape)
            assert bool((weight_view(m)[mask] == 0).all())
            changed += int((weight_view(m)[~mask] != before[name][~mask]).sum())
    assert changed > 0


def test_router_and_shared_expert_gate_stay_dense_shared_expert_is_pruned(ids):
    model = tiny_moe("qwen2_moe")
    dense = copy.deepcopy(model)
    report = prunekit.prune(model, None, {"metric": "wanda", "sparsity": 0.5}, calib_ids=ids)
    names = {l["name"] for l in report["layers"]}
    assert "model.layers.0.mlp.shared_expert.down_proj" in names
    assert not any("shared_expert_gate" in n or n.endswith("mlp.gate") for n in names)
    for a, b in zip(model.model.layers, dense.model.layers):
        assert torch.equal(a.mlp.gate.weight, b.mlp.gate.weight)
        assert torch.equal(a.mlp.shared_expert_gate.weight, b.mlp.shared_expert_gate.weight)


def block_weight_sparsity_from_files(folder) -> float:
    """Zeros over every weight tensor of the blocks as saved (whatever checkpoint layout transformers writes),
    routers and norms left out: the issue's measure of what was pruned."""
    zeros = numel = 0
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            if ".layers." not in key or t.dim() < 2 or key.endswith(("_bias", "gate.weight", "router.weight",
                                                                       "router.layer.weight", "shared_expert_gate.weight")):
                continue
            zeros += int((t == 0).sum())
            numel += t.numel()
    return zeros / numel


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_every_moe_type_prunes_all_block_weights_reloads_and_verifies(model_type, ids, tmp_path):
    model = tiny_moe(model_type)
    cfg = prunekit.make_config(model=model_type, metric="wanda", sparsity=0.5, device="cpu")
    report = prunekit.prune(model, None, cfg, calib_ids=ids)
    assert report["params"]["prunable_share"] > 0.9
    assert report["overall_sparsity"] == pytest.approx(0.5, abs=1e-12)
    saved = save_pruned(model, None, report, cfg, tmp_path / "o")  # reloads with plain from_pretrained, probe NLL
    assert saved["overall_sparsity"] == pytest.approx(0.5, abs=1e-12)
    assert block_weight_sparsity_from_files(tmp_path / "o") == pytest.approx(0.5, abs=1e-3)
    v = verify_saved(tmp_path / "o")
    assert v["overall_sparsity"] == pytest.approx(0.5, abs=1e-12) and v["probe"] is not None


@pytest.mark.parametrize("model_type", ISSUE_TYPES)
def test_saved_tensors_hold_exactly_half_of_every_block_weight(model_type, ids, tmp_path):
    """Counted from the raw saved tensors (Mixtral's per-expert w1/w2/w3, the Qwen/OLMoE experts.N.*), routers out."""
    model = tiny_moe(model_type)
    cfg = prunekit.make_config(model=model_type, metric="sparsegpt", sparsity=0.5, device="cpu")
    report = prunekit.prune(model, None, cfg, calib_ids=ids)
    save_pruned(model, None, report, cfg, tmp_path / "o")
    assert block_weight_sparsity_from_files(tmp_path / "o") == 0.5


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_compressed_format_round_trips_experts(model_type, ids, tmp_path):
    model = tiny_moe(model_type)
    cfg = prunekit.make_config(model=model_type, metric="wanda", sparsity=0.5, save_format="compressed")
    report = prunekit.prune(model, None, cfg, calib_ids=ids)
    save_pruned(model, None, report, cfg, tmp_path / "o")
    back = prunekit.load_pretrained(tmp_path / "o")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    assert verify_saved(tmp_path / "o")["format"] == "compressed"


# ----------------------------------------------------------------------------------------- never skip silently

def without_experts(monkeypatch, partial=""):
    fam = families.FAMILIES["moe"]
    monkeypatch.setitem(families.FAMILIES, "moe", dataclasses.replace(fam, experts=None, partial=partial))


def test_a_prune_that_would_leave_most_weights_dense_is_refused(monkeypatch, ids):
    """The issue's case: experts prunekit cannot see (a family without its MoE entry) would leave 3-D expert tensors
    dense; the run is refused before any work, naming them."""
    without_experts(monkeypatch)
    model = tiny_moe("mixtral")
    dense = copy.deepcopy(model)
    with pytest.raises(PrunekitError, match=r"mlp\.experts\.gate_up_proj .*would be left dense"):
        prunekit.prune(model, None, {"metric": "wanda", "sparsity": 0.5}, calib_ids=ids)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), dense.state_dict().values()))
    # naming them in ignore prunes the rest, and says how little that is
    report = prunekit.prune(model, None, {"metric": "wanda", "sparsity": 0.5, "ignore": ["mlp.experts.*"]},
                            calib_ids=ids)
    assert report["params"]["prunable_share"] < 0.3
    assert "left dense as ignore asks" in report["coverage"]["warning"]


def test_a_family_known_to_be_partial_warns(monkeypatch, ids):
    without_experts(monkeypatch, partial="its experts are not handled")
    report = prunekit.prune(tiny_moe("mixtral"), None, {"metric": "wanda", "sparsity": 0.5}, calib_ids=ids)
    assert "its experts are not handled" in report["coverage"]["warning"]
    assert report["params"]["prunable_share"] < 0.3


def save_tiny_mixtral(folder, **kw):
    """A tiny random Mixtral saved by transformers 5, with stories260K's tokenizer (vocabulary 512)."""
    model = tiny_moe("mixtral", vocab_size=512, hidden_size=64, intermediate_size=64, **kw)
    model.save_pretrained(folder)
    for f in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(STORIES_HF / f, folder / f)
    return folder


CALIB = ["--calib", str(TINY_TEXT), "--nsamples", "4", "--seqlen", "64"]


def test_cli_prunes_experts_states_the_share_and_verifies(tmp_path, capsys):
    src = save_tiny_mixtral(tmp_path / "mixtral")
    assert main(["prune", "--model", str(src), "--metric", "wanda", "--sparsity", "0.5", *CALIB,
                 "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "sparsity 0.5000 of prunable weights (9" in out and "of the blocks' parameters" in out
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["params"]["prunable_share"] > 0.9 and report["experts"]["matrices"] == 2 * 4 * 3
    assert main(["verify", "--model", str(tmp_path / "o")]) == 0


def test_cli_refusal_is_one_line(tmp_path, capsys, monkeypatch):
    src = save_tiny_mixtral(tmp_path / "mixtral")
    without_experts(monkeypatch)
    assert main(["prune", "--model", str(src), "--metric", "wanda", "--sparsity", "0.5", *CALIB,
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("prunekit: error: prunekit can prune only") and "would be left dense" in err[-1]
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------- removal, allocation

def naive_reap(model, ids):
    """Per block, mean over routed tokens of routing weight x ||expert output|| (brute-force routing)."""
    out = []
    for block in model.model.layers:
        experts = block.mlp.experts
        h, index, w = capture_routing(model, experts, ids)
        s = []
        for e in range(experts.num_experts):
            pairs = routed(index, e)
            G, U, D = expert_weights(experts, e)
            tot = 0.0
            for t, k in pairs:
                x = h[t]
                y = (experts.act_fn(G @ x) * (U @ x)) @ D.t()
                tot += float(w[t, k]) * float(y.norm())
            s.append(tot / max(len(pairs), 1))
        out.append(s)
    return out


@pytest.mark.parametrize("model_type", ISSUE_TYPES)
def test_expert_removal_writes_a_smaller_model_that_reloads(model_type, ids, tmp_path):
    model = tiny_moe(model_type)
    dense = copy.deepcopy(model)
    ref = naive_reap(dense, ids)
    cfg = prunekit.make_config(model=model_type, metric="wanda", sparsity=0.5, remove_experts=1)
    report = prunekit.prune(model, None, cfg, calib_ids=ids)
    info = report["allocation"]["expert_removal"]
    assert info["experts_left"] == 3 and info["score"] == "reap"
    for b in range(2):
        assert info["scores"][str(b)] == pytest.approx(ref[b], rel=1e-4)
        gone = min(range(4), key=lambda e: (ref[b][e], -e))
        assert info["removed"][str(b)] == [gone]
        kept = [e for e in range(4) if e != gone]
        assert torch.equal(model.model.layers[b].mlp.gate.weight, dense.model.layers[b].mlp.gate.weight[kept])
    assert report["overall_sparsity"] == pytest.approx(0.5, abs=1e-12)
    save_pruned(model, None, report, cfg, tmp_path / "o")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert back.model.layers[0].mlp.experts.num_experts == 3
    assert verify_saved(tmp_path / "o")["overall_sparsity"] == pytest.approx(0.5, abs=1e-12)
    assert block_weight_sparsity_from_files(tmp_path / "o") == 0.5


def test_expert_removal_refuses_too_many(ids):
    with pytest.raises(PrunekitError, match="remove_experts must be between 1 and 3"):
        prunekit.prune(tiny_moe("mixtral"), None, {"metric": "wanda", "sparsity": 0.5, "remove_experts": 4},
                       calib_ids=ids)
    with pytest.raises(PrunekitError, match="fewer than the 2"):
        prunekit.prune(tiny_moe("mixtral"), None, {"metric": "wanda", "sparsity": 0.5, "remove_experts": 3},
                       calib_ids=ids)


@pytest.mark.parametrize("score", ["frequency", "reap"])
def test_expert_allocation_prunes_rare_experts_more_and_keeps_the_total(score, ids):
    model = tiny_moe("olmoe")
    report = prunekit.prune(model, None, {"metric": "wanda", "sparsity": 0.5, "expert_allocation": score,
                                          "expert_allocation_params": {"eps": 0.3}}, calib_ids=ids)
    scores = report["allocation"]["experts"]["scores"]
    for b in range(2):
        s = scores[str(b)]
        best, worst = max(range(4), key=lambda e: s[e]), min(range(4), key=lambda e: s[e])
        for proj in ("gate_proj", "up_proj", "down_proj"):
            recs = sorted((l for l in report["layers"] if l["block"] == b and "expert" in l and l["name"].endswith(proj)),
                          key=lambda l: l["expert"])
            targets = [l["target"] for l in recs]
            assert sum(targets) / len(targets) == pytest.approx(0.5, abs=1e-12)  # equal sizes: the plain mean
            assert targets[worst] > 0.5 > targets[best]
            assert all(abs(l["sparsity"] - l["target"]) < 2 / l["numel"] for l in recs)
    assert report["overall_sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_expert_allocation_with_nm_is_refused():
    with pytest.raises(PrunekitError, match="has nothing to move"):
        prunekit.make_config(pattern="2:4", expert_allocation="frequency")


def test_block_removal_with_compensation_scales_every_expert(ids):
    """Prune&Comp folds its scale into every residual writer: each expert's down projection too (its check of the
    compensated stream would fail otherwise)."""
    model = tiny_moe("mixtral", num_hidden_layers=3)
    report = prunekit.prune(model, None, {"metric": "wanda", "sparsity": 0.0, "remove_blocks": 1}, calib_ids=ids)
    assert len(model.model.layers) == 2 and report["allocation"]["layer_removal"]
