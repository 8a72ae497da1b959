"""Swap refinement (prunekit.methods.swaps) on tiny layers: each row's first swap is the brute-force best 1-swap
(unstructured and inside N:M groups), the result is a local optimum, counts per row and per group never change,
the error only goes down, the shortlist never makes a swap that raises the error."""
from __future__ import annotations

import itertools

import pytest
import torch

from prunekit.core.masks import make_mask
from prunekit.core.refine import apply_refine, group_counts
from prunekit.methods.swaps import swaps

from conftest import correlated_inputs, damped, generator, stats_of



def row_error(w: torch.Tensor, pruned: torch.Tensor, Hd: torch.Tensor) -> float:
    d = torch.where(pruned, w.double(), torch.zeros((), dtype=torch.float64))
    return float(d @ Hd @ d)


def brute_force_best(w, pruned, Hd, M=None):
    """(error, mask) of the best single swap of one row (None when no swap lowers the error)."""
    base = row_error(w, pruned, Hd)
    best = (base, None)
    P, K = pruned.nonzero().flatten().tolist(), (~pruned).nonzero().flatten().tolist()
    for i, j in itertools.product(P, K):
        if M is not None and i // M != j // M:
            continue
        m = pruned.clone()
        m[i], m[j] = False, True
        e = row_error(w, m, Hd)
        if e < best[0]:
            best = (e, m)
    return best


@pytest.fixture(scope="module")
def tiny():
    X = correlated_inputs(n=256, d=16, seed=5)
    W = torch.randn(6, 16, generator=generator(6))
    return W, X


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_first_swap_is_the_brute_force_best(tiny, pattern):
    W, X = tiny
    st = stats_of(X)
    mask = make_mask(W.abs() * X.norm(dim=0), 0.5, pattern, "row")
    got, info = swaps(W, mask, st, pattern, max_swaps=1, candidates=0)
    Hd = damped(st.hessian_mean(), 0.01)
    for r in range(W.shape[0]):
        err, best = brute_force_best(W[r], mask[r], Hd, None if pattern is None else pattern[1])
        want = mask[r] if best is None else best
        assert torch.equal(got[r], want), r
    assert info["swaps"] == int((got != mask).any(1).sum())


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_result_is_a_local_optimum_with_unchanged_counts(tiny, pattern):
    W, X = tiny
    st = stats_of(X)
    mask = make_mask(W.abs(), 0.5 if pattern else 0.6, pattern, "row")
    got, info = swaps(W, mask, st, pattern, max_swaps=1000, candidates=0)
    assert torch.equal(group_counts(got, pattern), group_counts(mask, pattern))
    Hd = damped(st.hessian_mean(), 0.01)
    for r in range(W.shape[0]):
        err, best = brute_force_best(W[r], got[r], Hd, None if pattern is None else pattern[1])
        assert best is None or err > row_error(W[r], got[r], Hd) * (1 - 1e-5), r
    total = sum(row_error(W[r], got[r], Hd) for r in range(W.shape[0]))
    assert info["error_after"] == pytest.approx(total, rel=1e-4)
    assert info["error_after"] < info["error_before"]


def test_shortlist_only_lowers_the_error():
    X = correlated_inputs(n=512, d=96, seed=8)
    W = torch.randn(20, 96, generator=generator(9))
    st = stats_of(X)
    Hd = damped(st.hessian_mean(), 0.01)
    mask = make_mask(W.abs() * X.norm(dim=0), 0.7, None, "layer")  # unequal counts per row
    got, info = swaps(W, mask, st, None, max_swaps=50, candidates=4)
    assert torch.equal(got.sum(1), mask.sum(1))
    for r in range(20):
        assert row_error(W[r], got[r], Hd) <= row_error(W[r], mask[r], Hd) * (1 + 1e-6)
    assert info["error_after"] < 0.9 * info["error_before"] and info["rows_changed"] > 0


def test_through_the_contract(tiny):
    W, X = tiny
    st = stats_of(X)
    mask = make_mask(W.abs(), 0.5, (2, 4), "row")
    info = {}
    got = apply_refine("swaps", W, mask, st, (2, 4), info=info, max_swaps=3)
    assert torch.equal(group_counts(got, (2, 4)), group_counts(mask, (2, 4))) and info["swaps"] <= 3 * 6
    untouched = apply_refine("swaps", W, mask, st, (2, 4), max_swaps=0)
    assert torch.equal(untouched, mask)
