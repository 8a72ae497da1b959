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


def test_window_means_bit_identical_to_the_flattened_batch():
    """The window-at-a-time loss (one window's log-softmax as the only temporary) gives exactly the numbers of the
    whole-batch formula it replaced, for float32 and bfloat16 logits."""
    import torch.nn.functional as F

    from prunekit.core.nll import _window_means

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(3, 40, 1000, generator=g) * 4).to(dtype)
        x = torch.randint(0, 1000, (3, 40), generator=g)
        flat = logits[:, :-1, :].float()
        ref = F.cross_entropy(flat.reshape(-1, 1000), x[:, 1:].reshape(-1), reduction="none").view(3, -1).mean(1)
        got = _window_means(logits, x)
        assert got.dtype == torch.float64 and torch.equal(got, ref.double())
