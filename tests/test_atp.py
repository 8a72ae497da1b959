"""ATP (prunekit.methods.atp): the arithmetic progression over depth (one parameter, the common difference),
its mean exactly the target with equal and unequal blocks, monotone, uniform at beta = 0, clipped progressions still
exact and monotone, its 'auto' grid, and a refused negative beta."""
from __future__ import annotations

import pytest
import torch

from prunekit.core.allocation import ALLOCATORS, LayerInfo, ModelSummary, allocate
from prunekit.core.errors import PrunekitError
from prunekit.methods.atp import ATPParams, atp, progression


def summary(n_blocks=8, unequal=False):
    layers = []
    for b in range(n_blocks):
        d = 32 + (16 * b if unequal else 0)
        layers += [LayerInfo(f"l.{b}.q", b, (d, d)), LayerInfo(f"l.{b}.up", b, (2 * d, d))]
    return ModelSummary(layers)


def block_ratios(s: ModelSummary, r: dict) -> list[float]:
    return [r[f"l.{b}.q"] for b in range(s.n_blocks)]


def weighted_mean(s: ModelSummary, r: dict) -> float:
    n = s.numels()
    return float((torch.tensor([r[l.name] for l in s.layers], dtype=torch.float64) * n).sum() / n.sum())


def test_one_parameter():
    assert list(ATPParams.model_fields) == ["beta"]
    assert ALLOCATORS["atp"].auto == {"beta": [0.0, 0.0025, 0.005, 0.0075, 0.01, 0.0125, 0.015]}
    assert ALLOCATORS["atp"].needs == frozenset()


@pytest.mark.parametrize("unequal", [False, True])
@pytest.mark.parametrize("target,beta", [(0.5, 0.01), (0.7, 0.02), (0.3, 0.0)])
def test_progression_mean_and_difference(unequal, target, beta):
    s = summary(unequal=unequal)
    raw = atp(s, target, beta)
    b = block_ratios(s, raw)
    assert all(abs((b[i + 1] - b[i]) - beta) < 1e-12 for i in range(len(b) - 1))
    assert weighted_mean(s, raw) == pytest.approx(target, abs=1e-12)
    r = allocate("atp", s, target, beta=beta)
    assert weighted_mean(s, r) == pytest.approx(target, abs=1e-12)
    assert block_ratios(s, r) == pytest.approx(b, abs=1e-12)
    if not unequal:  # equal blocks: centred on the target
        assert (b[0] + b[-1]) / 2 == pytest.approx(target, abs=1e-12)


def test_beta_zero_is_uniform():
    s = summary()
    assert set(allocate("atp", s, 0.6, beta=0.0).values()) == {0.6}


def test_clipped_progression_stays_exact_and_monotone():
    s = summary(n_blocks=10)
    r = allocate("atp", s, 0.8, beta=0.1, max_ratio=0.95)  # the raw ends are -0.65 and 1.25
    b = block_ratios(s, r)
    assert max(b) == 0.95 and min(b) >= 0.0
    assert all(x <= y for x, y in zip(b, b[1:]))
    assert weighted_mean(s, r) == pytest.approx(0.8, abs=1e-9)


def test_progression_helper():
    p = progression(torch.tensor([1.0, 1.0, 2.0]), 0.5, 0.1)
    assert p.tolist() == pytest.approx([0.5 - 0.125, 0.5 - 0.025, 0.5 + 0.075])


def test_negative_beta_is_refused_in_one_line():
    with pytest.raises(PrunekitError, match="atp beta must be >= 0.0 or 'auto', got -0.1"):
        allocate("atp", summary(), 0.5, beta=-0.1)
