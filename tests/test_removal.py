"""Block removal (prunekit.methods.removal): block scores, one-shot and Prune&Comp removal with its
magnitude compensation, tied embeddings, and removed models that reload and generate, on tiny models."""
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config, tiny_model

from prunekit.core.errors import PrunekitError
from prunekit.methods.removal import (
    BLOCK_SCORES,
    block_influence,
    compensate_block,
    fold_scale,
    prune_and_comp,
    remove_blocks,
    remove_one_shot,
    residual_writers,
)
from prunekit.core.families import get_blocks


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _streams(model, ids):
    """Residual stream before every block plus after the last one (before the final norm), via hooks."""
    blocks = get_blocks(model)
    seen = []
    pre = [b.register_forward_pre_hook(lambda m, a, k: seen.append(a[0] if a else k["hidden_states"]),
                                       with_kwargs=True) for b in blocks]
    post = blocks[-1].register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
    try:
        _logits(model, ids)
    finally:
        for h in pre + [post]:
            h.remove()
    return seen


def _mag(h):
    return h.float().abs().mean().item()


def _tiny_eps(model):
    for m in model.modules():
        for attr in ("eps", "variance_epsilon"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 1e-12)


def _generate(model, ids, use_cache):
    return model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None,
                          use_cache=use_cache)


@pytest.mark.parametrize("fam", ["llama", "gpt2"])
def test_removing_zero_blocks_changes_nothing(fam, calib_ids):
    model = tiny_model(fam)
    ref = _logits(model, calib_ids)
    assert remove_blocks(model, []) == [0, 1, 2]
    r1 = prune_and_comp(model, calib_ids, 0)
    r2 = remove_one_shot(model, calib_ids, 0)
    assert r1["removed"] == [] and r2["removed"] == []
    assert len(get_blocks(model)) == model.config.num_hidden_layers == 3
    assert torch.equal(_logits(model, calib_ids), ref)


@pytest.mark.parametrize("fam", ["llama", "qwen2", "opt", "gpt2", "gpt_neox"])
def test_removed_model_reloads_and_generates(fam, calib_ids, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(fam, layers=4)
    res = prune_and_comp(model, calib_ids, 2)
    assert len(res["removed"]) == 2 and len(set(res["removed"])) == 2
    assert res["kept"] == [j for j in range(4) if j not in res["removed"]]
    assert all(s > 0 for s in res["scales"])
    assert remove_blocks(model, [0]) == [1]  # block 0 too, so that every layer_idx shifts
    blocks = get_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers == 1
    if fam == "qwen2":
        assert len(model.config.layer_types) == 1
    ref = _logits(model, calib_ids)
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert len(get_blocks(back)) == back.config.num_hidden_layers == 1
    assert torch.allclose(_logits(back, calib_ids), ref, atol=1e-6, rtol=0)
    prompt = calib_ids[:2, :6]
    for m in (model, back):  # the KV cache indexes layers by layer_idx: cached and uncached agree
        out = _generate(m, prompt, True)
        assert out.shape == (2, 11)
        assert torch.equal(out, _generate(m, prompt, False))


@pytest.mark.parametrize("fam", ["llama", "gpt2"])
def test_block_influence_matches_hidden_states(fam, calib_ids):
    model = tiny_model(fam)
    with torch.no_grad():
        hs = model(calib_ids, output_hidden_states=True, use_cache=False).hidden_states
    ref = [(1 - F.cosine_similarity(hs[b], hs[b + 1], dim=-1)).mean().item() for b in range(len(hs) - 1)]
    bi = block_influence(model, calib_ids, batch_size=4)  # two batches, uneven
    # the last hidden state is after the final norm: cos is unchanged by RMSNorm with unit weights (llama),
    # not by LayerNorm (gpt2), so there the last block is left out of the comparison
    n = len(bi) if fam == "llama" else len(bi) - 1
    assert bi[:n] == pytest.approx(ref[:n], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("fam", ["llama", "opt"])
def test_compensation_restores_magnitude(fam, calib_ids):
    dense = tiny_model(fam, layers=4)
    comp, plain = copy.deepcopy(dense), copy.deepcopy(dense)
    rc = prune_and_comp(comp, calib_ids, 1)
    rp = prune_and_comp(plain, calib_ids, 1, compensate=False)
    assert rc["removed"] == rp["removed"] and rp["scales"] == [None]
    i = rc["removed"][0]
    target = _mag(_streams(dense, calib_ids)[i + 1])  # leaving the removed block in the dense model
    with_comp = _mag(_streams(comp, calib_ids)[i])  # at the same place after removal
    without = _mag(_streams(plain, calib_ids)[i])
    assert abs(with_comp - target) < abs(without - target)
    assert with_comp == pytest.approx(target, rel=1e-3)
    assert rc["scales"][0] == pytest.approx(target / without, rel=1e-3)


@pytest.mark.parametrize("fam", ["gpt2", "llama_tied"])
def test_tied_embeddings_are_untied_before_scaling(fam, calib_ids, tmp_path):
    from transformers import AutoModelForCausalLM

    if fam == "llama_tied":
        cfg = tiny_config("llama")
        cfg.tie_word_embeddings = True
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).eval()
    else:
        model = tiny_model(fam)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert head.weight is emb.weight
    _tiny_eps(model)
    ref = _logits(model, calib_ids)
    w0 = emb.weight.detach().clone()
    naive = copy.deepcopy(model)
    with torch.no_grad():
        naive.get_input_embeddings().weight.mul_(2.0)  # tied: the logits double
    assert not torch.allclose(_logits(naive, calib_ids), ref, atol=1e-3)

    # scale the whole stream before the final norm: the norm absorbs it, the logits must not move
    fold_scale(model, len(get_blocks(model)), 2.0, residual_writers(model, calib_ids))
    head = model.get_output_embeddings()
    assert head.weight is not model.get_input_embeddings().weight
    assert torch.equal(head.weight, w0) and torch.equal(model.get_input_embeddings().weight, 2 * w0)
    assert model.config.tie_word_embeddings is False
    assert torch.allclose(_logits(model, calib_ids), ref, atol=1e-4, rtol=1e-4)
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    _tiny_eps(back)
    assert back.get_output_embeddings().weight is not back.get_input_embeddings().weight
    assert torch.allclose(_logits(back, calib_ids), ref, atol=1e-4, rtol=1e-4)


def test_scores_registry_and_one_shot(calib_ids):
    model = tiny_model("llama", layers=4)
    for name in ("bi", "magnitude", "taylor", "ppl"):
        s = BLOCK_SCORES[name](model, calib_ids, batch_size=3)
        assert len(s) == 4 and all(torch.isfinite(torch.tensor(s)))
    assert not any(p.grad is not None for p in model.parameters())  # taylor cleans up
    bi = block_influence(model, calib_ids)
    lowest = sorted(sorted(range(4), key=lambda j: bi[j])[:2])
    res = remove_one_shot(copy.deepcopy(model), calib_ids, 2)
    assert res["removed"] == lowest
    res = prune_and_comp(copy.deepcopy(model), calib_ids, 1, score="taylor")
    assert len(res["removed"]) == 1 and res["scales"][0] > 0
    with pytest.raises(PrunekitError):
        prune_and_comp(model, calib_ids, 4)
    with pytest.raises(PrunekitError):
        prune_and_comp(model, calib_ids, 1, score="nope")


def test_compensation_refused_for_post_norm_model(calib_ids):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("opt")
    cfg.do_layer_norm_before = False  # OPT-350m style: LayerNorm after the residual add
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PrunekitError, match="not supported"):
        compensate_block(model, calib_ids, 2, 1.5)
    after = model.state_dict()
    assert all(torch.allclose(after[k], v, rtol=1e-6, atol=1e-7) for k, v in before.items())
