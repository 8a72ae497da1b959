"""DSnoT (prunekit.methods.dsnot) against a naive row-by-row reference of its rules, on tiny layers: the same
masks (unstructured and N:M), counts per row and per group unchanged, |e_r| never grows and never changes sign."""
from __future__ import annotations

import pytest
import torch

from prunekit.core.masks import make_mask
from prunekit.core.refine import group_counts
from prunekit.methods.dsnot import dsnot

from conftest import correlated_inputs, generator, stats_of


def naive_row(w, pruned, mu, var, norm, nm, max_cycles, threshold, p):
    """One row by the module docstring's rules, in plain Python."""
    n = w.numel()
    c = [float(w[j] * mu[j]) for j in range(n)]
    key = [c[j] / float(var[j]) ** p for j in range(n)]
    wanda = [abs(float(w[j])) * float(norm[j]) for j in range(n)]
    P0 = [j for j in range(n) if pruned[j]]
    K0 = [j for j in range(n) if not pruned[j]]
    grow = sorted(P0, key=lambda j: (key[j], j))
    pos = sorted([j for j in K0 if c[j] > 0], key=lambda j: (wanda[j], j))
    neg = sorted([j for j in K0 if c[j] <= 0], key=lambda j: (wanda[j], j))
    prunable = set(K0)
    m = pruned.clone()
    e = float((w * mu * pruned).sum())  # summed as the method sums it (float32, over the whole row)
    sign0 = (e > 0) - (e < 0)
    lo, hi, pp, pn = 0, len(grow) - 1, 0, 0
    for _ in range(max_cycles):
        if abs(e) <= threshold or lo > hi:
            break
        up = e > 0
        g = grow[hi] if up else grow[lo]
        if nm is None:
            lst, ptr = (pos, pp) if e < 0 else (neg, pn)
            if ptr >= len(lst):
                break
            j = lst[ptr]
        else:
            M = nm[1]
            cands = [x for x in range(g // M * M, g // M * M + M) if x in prunable]
            if not cands:
                break
            j = min(cands, key=lambda x: (wanda[x], x))
        after = e - c[g] + c[j]
        sa = (after > 0) - (after < 0)
        if not (abs(after) < abs(e) and (sa == sign0 or after == 0)):
            break
        m[g], m[j] = False, True
        e = after
        prunable.discard(j)
        if up:
            hi -= 1
        else:
            lo += 1
        if nm is None:
            if lst is pos:
                pp += 1
            else:
                pn += 1
    return m


@pytest.fixture(scope="module")
def tiny():
    X = correlated_inputs(n=512, d=24, seed=11, mean=0.7)  # inputs with a mean: e_r is not ~0
    W = torch.randn(10, 24, generator=generator(12))
    return W, X, stats_of(X)


@pytest.mark.parametrize("pattern", [None, (2, 4)])
@pytest.mark.parametrize("cycles", [1, 3, 50])
def test_matches_the_naive_reference(tiny, pattern, cycles):
    W, X, st = tiny
    mask = make_mask(W.abs() * X.norm(dim=0), 0.5, pattern, "row")
    got, info = dsnot(W, mask, st, pattern, max_cycles=cycles, threshold=0.01)
    mu, var, norm = st.mean(), st.var(), st.col_norm()
    for r in range(W.shape[0]):
        want = naive_row(W[r], mask[r], mu, var, norm, pattern, cycles, 0.01, 1.0)
        assert torch.equal(got[r], want), r
    assert torch.equal(group_counts(got, pattern), group_counts(mask, pattern))
    assert info["swaps"] > 0 and info["error_after"] < info["error_before"]


def test_expected_error_shrinks_without_changing_sign(tiny):
    W, X, st = tiny
    mask = make_mask(W.abs(), 0.6, None, "layer")  # unequal counts per row
    got, _ = dsnot(W, mask, st, None, max_cycles=50, threshold=0.0)
    c = W * st.mean()[None, :]
    e0, e1 = (c * mask).sum(1), (c * got).sum(1)
    assert bool((e1.abs() <= e0.abs() + 1e-6).all())
    assert bool(((torch.sign(e1) == torch.sign(e0)) | (e1.abs() < 1e-6)).all())
    assert torch.equal(got.sum(1), mask.sum(1))


def test_threshold_and_zero_cycles_leave_the_mask(tiny):
    W, X, st = tiny
    mask = make_mask(W.abs(), 0.5, None, "row")
    assert torch.equal(dsnot(W, mask, st, None, max_cycles=0)[0], mask)
    assert torch.equal(dsnot(W, mask, st, None, threshold=1e9)[0], mask)
