"""DSA allocation programs (prunekit.methods.dsa): the text and readable forms round-trip, the canonical form
computes the same function, mutation and crossover only give valid programs, the OWL-style mapping, and the
allocator hits the target exactly (also through prunekit.prune)."""
import random

import pytest
import torch

from prunekit.core.allocation import allocate
from prunekit.methods.dsa import (MAX_PRE, MAX_TR, POST_OPS, PRE_OPS, REDUCTIONS, TRANSFORMS, BlockScores,
                                  InvalidProgram, Program, crossover, dsa_final_ratios, mutate, random_program)

from conftest import calib_and_heldout, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _summary(model, calib):
    from prunekit.core.metric import get_metric
    from prunekit.core.families import block_linears, get_blocks
    from prunekit.pruning.allocator_inputs import model_summary, score_profile

    bl = block_linears(model)
    s = model_summary(bl)
    s.scores = score_profile(model, get_blocks(model), bl, calib, get_metric("wanda"), torch.device("cpu"), None)
    return s


def test_program_text_round_trip():
    p = Program.parse("pre:abslog|red:var|tr:atan,asin|post:none")
    assert p == Program(("abslog",), "var", ("atan", "asin"), "none")
    assert Program.parse(p.text) == p
    assert p.readable() == "abslog -> var -> atan, asin"
    assert Program.parse(p.readable()) == p  # the paper's arrow form parses too
    assert Program.parse("red:var|tr:atan,asin|pre:abslog") == p  # sections in any order, post optional
    q = Program.parse("none -> outlier5 -> neg -> rank")
    assert q.text == "pre:none|red:outlier5|tr:neg|post:rank" and Program.parse(q.readable()) == q
    rng = random.Random(0)
    for _ in range(500):
        r = random_program(rng)
        assert Program.parse(r.text) == r and Program.parse(r.readable()) == r
    for bad in ["", "pre:abs", "red:nope", "pre:abs,abs,abs|red:mean", "red:mean|tr:sin,sin,sin,sin",
                "red:mean|post:zzz", "abs -> mean", "pre=abs|red:mean", "red:mean|red:var"]:
        with pytest.raises(InvalidProgram):
            Program.parse(bad)


def test_canonical_form_keeps_the_function():
    rng = random.Random(1)
    g = torch.Generator().manual_seed(0)
    blocks = [torch.randn(300, generator=g, dtype=torch.float64) * (b + 1) + 0.1 * b for b in range(5)]
    checked = 0
    for _ in range(3000):
        pre = tuple(rng.choice(list(PRE_OPS)) for _ in range(rng.randint(0, MAX_PRE)))
        tr = tuple(rng.choice(list(TRANSFORMS)) for _ in range(rng.randint(0, MAX_TR)))
        p = Program(pre, rng.choice(list(REDUCTIONS)), tr, rng.choice(list(POST_OPS)))
        c = p.canonical()
        assert c.canonical() == c and len(c.pre) <= len(p.pre) and len(c.tr) <= len(p.tr)
        if c == p:
            continue
        try:
            a = p.block_values(blocks)
        except InvalidProgram:
            continue
        torch.testing.assert_close(c.block_values(blocks), a, rtol=1e-6, atol=1e-9)  # equal up to the 1e-12 guards
        checked += 1
    assert checked > 50
    assert Program.parse("pre:abs,abs|red:mean|tr:neg,neg").key == "pre:abs|red:mean|tr:none|post:none"
    assert Program.parse("pre:abs,sq|red:mean|tr:neg,abs").key == "pre:sq|red:mean|tr:abs|post:none"


def test_mutation_and_crossover_only_produce_valid_programs():
    rng = random.Random(2)
    pop = [random_program(rng) for _ in range(20)]
    for _ in range(3000):
        a, b = rng.choice(pop), rng.choice(pop)
        for child in (mutate(a, rng), crossover(a, b, rng), mutate(crossover(a, b, rng), rng)):
            child.validate()
            assert child == child.canonical()
            assert Program.parse(child.text) == child
            assert len(child.pre) <= MAX_PRE and len(child.tr) <= MAX_TR
        pop[rng.randrange(len(pop))] = mutate(a, rng)
    changed = sum(mutate(p, rng) != p for p in pop * 10)
    assert changed >= 190  # a mutation changes the program (up to 10 retries)


def test_program_mapping_and_invalid_programs():
    g = torch.Generator().manual_seed(0)
    blocks = BlockScores([torch.rand(200, generator=g, dtype=torch.float64) * (b + 1) for b in range(4)])
    p = Program.parse("red:mean")
    r = p.block_ratios(blocks, 0.5, 0.1)
    assert abs(float(r.mean()) - 0.5) < 1e-12 and float(r.max() - r.min()) == pytest.approx(0.2)
    assert int(r.argmax()) == 3  # higher value -> more pruning
    assert int(Program.parse("red:mean|tr:neg").block_ratios(blocks, 0.5, 0.1).argmin()) == 3  # neg flips it
    with pytest.raises(InvalidProgram):
        Program.parse("pre:sq|red:mean|tr:exp,exp,exp").block_values(BlockScores([torch.full((4,), 30.0)] * 2))
    with pytest.raises(InvalidProgram):
        Program.parse("red:mean|tr:neg,log").block_values(blocks)


def test_dsa_allocator_hits_target_exactly():
    import prunekit

    model = tiny_model("llama", layers=4)
    calib, _ = calib_and_heldout()
    summary = _summary(model, calib)
    for text, lam in [("pre:abslog|red:var|tr:atan|post:none", 0.08), ("red:outlier3|tr:neg|post:rank", 0.2),
                      ("pre:sqrt|red:entropy|post:smooth", 0.1)]:
        r = allocate("dsa", summary, 0.6, program=text, lam=lam)
        n = {l.name: l.numel for l in summary.layers}
        mean = sum(r[k] * n[k] for k in r) / sum(n.values())
        assert abs(mean - 0.6) < 1e-12
        # OWL's mapping: the ratios span exactly 2 lam around the target (centred on the mean, not on S)
        assert max(r.values()) - min(r.values()) == pytest.approx(2 * lam)
        for b in range(4):
            assert len({round(r[l.name], 15) for l in summary.layers if l.block == b}) == 1
        assert r == dsa_final_ratios(summary, 0.6, text, lam)  # what the search evaluates
    assert len(set(allocate("dsa", summary, 0.6, program="red:mean", lam=0.0).values())) == 1
    with pytest.raises(prunekit.PrunekitError):
        allocate("dsa", summary, 0.6)
    rep = prunekit.prune(model, None, {"sparsity": 0.6, "allocation": "dsa", "device": "cpu",
                                       "allocation_params": {"program": "abslog -> var -> atan", "lam": 0.1}},
                         calib_ids=calib)
    assert rep["allocation"]["dsa_program"] == "pre:abslog|red:var|tr:atan|post:none"
    assert abs(sum(l["target"] * l["numel"] for l in rep["layers"]) / rep["params"]["prunable"] - 0.6) < 1e-9
    assert abs(rep["overall_sparsity"] - 0.6) <= len(rep["layers"]) / rep["params"]["prunable"]  # a weight per layer
