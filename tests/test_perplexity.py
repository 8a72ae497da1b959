"""Paper-convention perplexity (prunekit.evaluate.perplexity): equal to the mean of independently computed
window losses on stories260K, and the block-by-block (offloaded) path equal to the whole-model forward on
tiny models of each family."""
import math

import pytest
import torch

import prunekit

from conftest import STORIES_HF, TINY_TEXT


def test_perplexity_matches_independent_loss():
    model, tok = prunekit.load_model(str(STORIES_HF))
    ids = tok(TINY_TEXT.read_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
    r = prunekit.perplexity(model, tok, str(TINY_TEXT), seqlen=128, max_windows=6, batch_size=4)
    losses = []
    with torch.no_grad():
        for i in range(6):
            x = ids[i * 128:(i + 1) * 128][None]
            losses.append(model(x, labels=x).loss.item())
    assert r["windows"] == 6 and r["tokens"] == 6 * 128
    assert r["ppl"] == pytest.approx(math.exp(sum(losses) / 6), rel=1e-5)
    full = prunekit.perplexity(model, tok, str(TINY_TEXT), seqlen=256)
    assert 3.0 < full["ppl"] < 8.0  # MANIFEST: about 5.43 on this excerpt


@pytest.mark.parametrize("fam", ["llama", "opt", "gpt2", "gpt_neox", "qwen2"])
def test_blockwise_perplexity_equals_whole_model(fam):
    from conftest import tiny_model

    model = tiny_model(fam)
    ids = torch.randint(0, 128, (200,), generator=torch.Generator().manual_seed(0))
    a = prunekit.perplexity(model, None, "x", seqlen=32, ids=ids, batch_size=2, offload=False)
    b = prunekit.perplexity(model, None, "x", seqlen=32, ids=ids, batch_size=2, offload=True)
    assert b["offload"] and not a["offload"] and a["windows"] == b["windows"] == 6
    assert b["ppl"] == pytest.approx(a["ppl"], rel=1e-5)
    c = prunekit.perplexity(model, None, "x", seqlen=32, ids=ids, batch_size=2, offload=False)
    assert c["ppl"] == a["ppl"]  # the blocks' own forward is back
