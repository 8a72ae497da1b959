"""Input statistics (prunekit.core.stats): feature sums in row chunks, the Gram matrix from its upper block
triangle, the fast (TF32, chunked) Hessian path with the check that switches it off, and the token
positions kept for TRIM's last-token inputs."""
from __future__ import annotations

import logging

import pytest
import torch

from prunekit.core.stats import LayerStats

from conftest import correlated_inputs, stats_of

D_IN = 128


def test_feature_sums_in_row_chunks_equal_the_direct_sums(monkeypatch):
    from prunekit.core import stats as stats_mod

    X = correlated_inputs(n=300, d=16, mean=0.5)
    monkeypatch.setattr(stats_mod, "CPU_SUM_ROWS", 7)  # 7 rows per chunk, 43 chunks per update
    st = stats_of(X, chunks=2)
    # float32 squares summed in float64, as the statistics define them; only the summation order differs
    assert torch.allclose(st.sq_sum, (X * X).double().sum(0), rtol=1e-12)
    assert torch.allclose(st.sum, X.double().sum(0), rtol=1e-12, atol=1e-9)
    assert st.count == 300


def test_fast_hessian_path_is_exact_on_bf16_inputs_and_its_check_rejects_a_rounded_result(caplog):
    """gram()'s GPU path (TF32 chunks + diagonal check), run here on CPU tensors: the chunked product of
    bf16 inputs matches float64; a result rounded to bf16 (what torch.mm(out_dtype=float32) gave on an
    H200) fails the check, which then switches the fast path off."""
    from prunekit.core import stats as stats_mod

    x = (correlated_inputs(n=3000, d=64) * 3).to(torch.bfloat16)
    ref = x.double().t() @ x.double()
    h = stats_mod._gram_tf32(x)
    assert float((h.double() - ref).norm() / ref.norm()) < 1e-6
    assert torch.allclose(stats_mod.sq_sums64(x), ref.diagonal(), rtol=1e-12)
    assert stats_mod.checked(x, h) is h and not stats_mod.FAST_GRAM_FAILED
    rounded = h.to(torch.bfloat16).float()
    try:
        with caplog.at_level(logging.WARNING, logger="prunekit.core.stats"):
            assert stats_mod.checked(x, rounded) is None
        assert stats_mod.FAST_GRAM_FAILED and stats_mod.FAST_GRAM_FAILED[0] > stats_mod.DIAG_TOL
        assert "float32 GEMMs from now on" in caplog.text
    finally:
        stats_mod.FAST_GRAM_FAILED.clear()


@pytest.mark.parametrize("width", [1, 16, 23, 70, 1000])
def test_block_upper_gram_equals_the_full_product(monkeypatch, width):
    """gram() computes only the upper block triangle of X^T X and mirrors it: every entry equals the
    float64 product, the result is exactly symmetric, for block widths from 1 column to all of them
    (uneven blocks included); the chunked TF32 path (run on CPU) accumulates the same blocks."""
    from prunekit.core import stats as stats_mod

    monkeypatch.setitem(stats_mod.GRAM_BLOCK, "cpu", width)
    monkeypatch.setattr(stats_mod, "SUM_CHUNK_ELEMENTS", 70 * 64)  # 64 rows per chunk
    x = correlated_inputs(n=500, d=70, mean=0.3)
    ref = x.double().t() @ x.double()
    for h in (stats_mod.gram(x), stats_mod._gram_tf32(x.to(torch.bfloat16)).double()):
        r = ref if h.dtype == torch.float32 else x.to(torch.bfloat16).double().t() @ x.to(torch.bfloat16).double()
        assert torch.equal(h, h.t())
        assert float((h.double() - r).abs().max() / r.abs().max()) < 1e-6


def test_tokens_per_sample_takes_evenly_spaced_positions_ending_at_the_last():
    x = torch.randn(3, 16, D_IN)
    st = LayerStats(frozenset({"last_tokens"}), D_IN, tokens_per_sample=4, max_last_tokens=2)
    assert st.token_positions(16) == [3, 7, 11, 15]
    st.update(x)
    # at most max_last_tokens sequences, k rows each, in (sequence, position) order
    assert torch.equal(st.last_token_inputs(), x[:2][:, [3, 7, 11, 15]].reshape(-1, D_IN))
    one = LayerStats(frozenset({"last_tokens"}), D_IN)
    one.update(x)
    assert torch.equal(one.last_token_inputs(), x[:, -1])  # default: the paper's last token only
    assert LayerStats(frozenset({"last_tokens"}), D_IN, tokens_per_sample=40).token_positions(5) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="tokens_per_sample"):
        LayerStats(frozenset({"last_tokens"}), D_IN, tokens_per_sample=0)
