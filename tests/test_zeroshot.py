"""Zero-shot evaluation: task parsers on the shared files, the log-likelihood scorer against a model
whose log-probabilities are known, acc vs acc_norm, and batch invariance on stories260K."""
import math
import re
from types import SimpleNamespace

import pytest
import torch

from prunekit.core.errors import PrunekitError
from prunekit.evaluate import zeroshot as zs
from prunekit.evaluate.tasks import PAPER_TASKS, TASKS, Item, hellaswag_preprocess, load_task, tasks_dir

from conftest import SHARED, STORIES_HF

TASK_DIR = SHARED / "tasks"

EXPECTED = {  # task: (items, allowed numbers of choices) — counts from shared/MANIFEST.md
    "boolq": (3270, {2}), "rte": (277, {2}), "hellaswag": (10042, {4}), "winogrande": (1267, {2}),
    "arc_easy": (2376, {3, 4, 5}), "arc_challenge": (1172, {3, 4, 5}), "openbookqa": (500, {4}),
    "piqa": (1838, {2}),
}


@pytest.fixture(scope="module")
def all_items():
    return {name: loader(TASK_DIR) for name, loader in TASKS.items()}


# ------------------------------------------------------------------------------------- parsers

def test_registry_names():
    assert set(TASKS) == set(EXPECTED) and set(PAPER_TASKS) == set(EXPECTED) - {"piqa"}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_parser_reads_whole_file(all_items, name):
    items = all_items[name]
    n, n_choices = EXPECTED[name]
    assert len(items) == n
    for it in items:
        assert len(it.choices) in n_choices
        assert 0 <= it.gold < len(it.choices)
        assert all(c.strip() for c in it.choices) and all(c.startswith(" ") for c in it.choices)
        reqs = it.requests()
        assert len(reqs) == len(it.choices) and all(ctx.strip() for ctx, _ in reqs)
        assert len(it.lengths()) == len(it.choices) and min(it.lengths()) > 0
    golds = {it.gold for it in items}  # every answer position occurs
    assert set(range(min(max(n_choices), 4))) <= golds <= set(range(max(n_choices)))


def test_prompt_formats(all_items):
    b = all_items["boolq"][0]
    assert b.context.endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert b.choices == [" no", " yes"] and b.gold == 0 and b.lengths() == [2, 3]
    r = all_items["rte"][0]
    assert r.context.endswith("\nQuestion: Christopher Reeve had an accident. True or False?\nAnswer:")
    assert r.choices == [" True", " False"] and r.gold == 1
    h = all_items["hellaswag"][0]
    assert h.context == "Roof shingle removal: A man is sitting on a roof. He"  # ctx_b capitalised
    assert h.choices[3] == " starts pulling up roofing on a roof." and h.gold == 3
    w = all_items["winogrande"][0]
    assert w.requests() == [("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
                            ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.")]
    assert w.gold == 1 and w.lengths() == [len(w.contexts[0]), len(w.contexts[1])]
    a = all_items["arc_easy"][1]
    assert a.context == ("Question: Which piece of safety equipment is used to keep mold spores from entering "
                         "the respiratory system?\nAnswer:")
    assert a.choices == [" safety goggles", " breathing mask", " rubber gloves", " lead apron"] and a.gold == 1
    assert a.lengths() == [14, 14, 13, 10]
    o = all_items["openbookqa"][1]
    assert o.context == "There is most likely going to be fog around:" and o.choices[0] == " a marsh" and o.gold == 0
    p = all_items["piqa"][1]
    assert p.context == "Question: dresser\nAnswer:"
    assert p.choices == [" replace drawer with bobby pin ", " finish, woodgrain with  bobby pin "] and p.gold == 1


def test_hellaswag_preprocess_matches_lm_eval_rules(all_items):
    # strip first, then replace/delete: a bracket at the end leaves a space, exactly as in lm-eval
    assert hellaswag_preprocess(" How to x [title] Do y. [step] Then z [header] ") == "How to x. Do y. Then z "
    for it in all_items["hellaswag"]:
        for s in [it.context] + it.choices:
            assert not re.search(r"\[.*?\]", s) and "  " not in s  # a lone "[" survives, as in lm-eval


def test_limit_is_first_n(all_items):
    assert load_task("arc_challenge", limit=5, task_dir=TASK_DIR) == all_items["arc_challenge"][:5]
    with pytest.raises(PrunekitError):
        load_task("nope", task_dir=TASK_DIR)


def test_task_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNEKIT_TASKS_DIR", str(TASK_DIR))
    assert tasks_dir() == TASK_DIR
    monkeypatch.setenv("PRUNEKIT_TASKS_DIR", str(tmp_path / "missing"))
    with pytest.raises(PrunekitError, match="PRUNEKIT_TASKS_DIR"):
        load_task("rte")
    monkeypatch.setenv("PRUNEKIT_TASKS_DIR", str(tmp_path))
    with pytest.raises(PrunekitError, match="task file missing"):
        load_task("boolq")


# -------------------------------------------------------------------------------------- scorer

class UnigramLM(torch.nn.Module):
    """Every position predicts the same distribution softmax(bias): the log-likelihood of a
    continuation is the sum of log_softmax(bias) over its tokens, whatever the context."""

    def __init__(self, vocab: int, favour: dict[int, float], max_len: int = 1024):
        super().__init__()
        bias = torch.zeros(vocab)
        for t, v in favour.items():
            bias[t] = v
        self.bias = torch.nn.Parameter(bias, requires_grad=False)
        self.config = SimpleNamespace(max_position_embeddings=max_len)
        self.widths = []

    def forward(self, input_ids, use_cache=False, **kw):
        assert kw.get("attention_mask") is None
        self.widths.append(input_ids.shape[1])
        assert input_ids.shape[1] <= self.config.max_position_embeddings
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1).clone())

    def logp(self, ids):
        return torch.log_softmax(self.bias.double(), -1)[ids].sum().item()


def _ids(tok, s):
    return tok(s, add_special_tokens=False)["input_ids"]


def test_encode_pair_lm_eval_split(gpt2_tokenizer):
    tok = gpt2_tokenizer
    c, k = zs.encode_pair(tok, "Question: sky?\nAnswer:", " blue")
    assert c == _ids(tok, "Question: sky?\nAnswer:") and k == _ids(tok, " blue")
    # trailing space of the context moves to the continuation
    c2, k2 = zs.encode_pair(tok, "Question: sky?\nAnswer: ", "blue")
    assert (c2, k2) == (c, k)
    # the continuation is whatever follows the context's tokens in the joint encoding
    whole = _ids(tok, "Thecat")
    c3, k3 = zs.encode_pair(tok, "The", "cat")
    assert c3 == _ids(tok, "The") and c3 + k3 == whole


def test_scorer_exact_logliks_and_greedy(gpt2_tokenizer):
    tok = gpt2_tokenizer
    blue, green, red = (_ids(tok, s)[0] for s in (" blue", " green", " red"))
    model = UnigramLM(len(tok), {blue: 8.0, green: 3.0})
    items = [Item("Question: What colour is the sky?\nAnswer:", [" green", " blue", " red"], 1),
             Item("Question: What colour is grass?\nAnswer:", [" blue", " green"], 1)]
    scores = zs.score_items(model, tok, items, batch_size=3)
    for it, sc in zip(items, scores):
        for ch, (ll, greedy) in zip(it.choices, sc):
            assert ll == pytest.approx(model.logp(_ids(tok, ch)), abs=1e-4)
            assert greedy == (ch == " blue")
    m = zs.metrics(items, scores)
    assert m["acc"] == 0.5 and m["n"] == 2  # blue is always chosen: right once
    assert m["acc_stderr"] == pytest.approx(math.sqrt(0.5 / 2))  # sample std (ddof=1) / sqrt(n)


def test_acc_norm_divides_by_characters(gpt2_tokenizer):
    tok = gpt2_tokenizer
    x, y = _ids(tok, " x")[0], _ids(tok, " y")[0]
    model = UnigramLM(len(tok), {x: 4.0, y: 5.0})
    item = Item("Pick:", [" x", " y y y y"], gold=1)
    assert item.lengths() == [1, 7]
    (lx, _), (ly, _) = zs.score_items(model, tok, [item])[0]
    lpx, lpy = model.logp([x]), model.logp([y])
    assert lx == pytest.approx(lpx, abs=1e-4) and ly == pytest.approx(4 * lpy, abs=1e-4)
    # raw: one token beats four; per character: 4*lpy/7 beats lpx/1
    assert lx > ly and ly / 7 > lx / 1
    m = zs.metrics([item], [[(lx, True), (ly, False)]])
    assert (m["acc"], m["acc_norm"]) == (0.0, 1.0)
    # explicit norm_lengths (WinoGrande-style) take precedence
    wino = Item("", [" y", " y"], 0, contexts=["a x", "a x y"], norm_lengths=[3, 5])
    assert wino.lengths() == [3, 5]


def test_left_truncation(gpt2_tokenizer):
    tok = gpt2_tokenizer
    y = _ids(tok, " y")[0]
    model = UnigramLM(len(tok), {y: 2.0}, max_len=8)
    item = Item(" ".join(["word"] * 50), [" y y", " z"], 0)
    sc = zs.score_items(model, tok, [item], batch_size=2)[0]
    assert max(model.widths) == 8
    assert sc[0][0] == pytest.approx(2 * model.logp([y]), abs=1e-4)
    with pytest.raises(PrunekitError, match="context length"):
        zs.score_items(model, tok, [Item("a", [" y" * 20], 0)])


def test_evaluate_task_and_summary(gpt2_tokenizer, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_TASKS_DIR", str(TASK_DIR))
    tok = gpt2_tokenizer
    model = UnigramLM(len(tok), {_ids(tok, " yes")[0]: 10.0})
    r = zs.evaluate_task(model, tok, "boolq", limit=6, batch_size=4)
    golds = [it.gold for it in load_task("boolq", limit=6)]
    assert r["n"] == 6 and r["n_available"] == 3270
    assert r["acc"] == pytest.approx(sum(golds) / 6)  # always answers " yes"
    res = zs.evaluate_tasks(model, tok, ["rte", "winogrande", "piqa"], limit=3, batch_size=4)
    assert set(res["tasks"]) == {"rte", "winogrande", "piqa"}
    assert res["mean_tasks"] == ["rte", "winogrande"] and not res["mean_complete"]
    assert res["mean_acc"] == pytest.approx((res["tasks"]["rte"]["acc"] + res["tasks"]["winogrande"]["acc"]) / 2)
    assert res["piqa_acc"] == res["tasks"]["piqa"]["acc"]
    with pytest.raises(PrunekitError, match="unknown zero-shot task"):
        zs.evaluate_tasks(model, tok, ["mmlu"])


def test_lm_eval_backend_missing_is_clear(gpt2_tokenizer):
    pytest.importorskip("torch")
    try:
        import lm_eval  # noqa: F401
        pytest.skip("lm_eval installed")
    except ImportError:
        pass
    with pytest.raises(PrunekitError, match="lm-eval"):
        zs.evaluate_tasks(UnigramLM(len(gpt2_tokenizer), {}), gpt2_tokenizer, ["rte"], limit=1, backend="lm-eval")


def test_lm_eval_backend_plumbing(gpt2_tokenizer, monkeypatch):
    """With a stand-in lm_eval module: the in-memory model goes to HFLM, results are mapped back."""
    import sys
    import types

    calls = {}

    class HFLM:
        def __init__(self, **kw):
            calls["hflm"] = kw

    def simple_evaluate(**kw):
        calls["eval"] = kw
        return {"results": {t: {"acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.25} for t in kw["tasks"]},
                "n-samples": {t: {"original": 10, "effective": 4} for t in kw["tasks"]}}

    fake = types.ModuleType("lm_eval")
    fake.simple_evaluate = simple_evaluate
    models, hf = types.ModuleType("lm_eval.models"), types.ModuleType("lm_eval.models.huggingface")
    hf.HFLM = HFLM
    for name, mod in (("lm_eval", fake), ("lm_eval.models", models), ("lm_eval.models.huggingface", hf)):
        monkeypatch.setitem(sys.modules, name, mod)
    model = UnigramLM(len(gpt2_tokenizer), {})
    res = zs.evaluate_tasks(model, gpt2_tokenizer, ["arc_easy", "boolq"], limit=4, batch_size=2, backend="lm-eval")
    assert calls["hflm"]["pretrained"] is model and calls["hflm"]["batch_size"] == 2
    assert calls["hflm"]["add_bos_token"] is False
    assert calls["eval"]["tasks"] == ["arc_easy", "boolq"] and calls["eval"]["num_fewshot"] == 0
    assert calls["eval"]["limit"] == 4
    assert res["backend"] == "lm-eval" and res["mean_acc"] == 0.5
    assert res["tasks"]["arc_easy"]["acc_norm"] == 0.25 and res["tasks"]["boolq"]["n"] == 4


# ------------------------------------------------------------------------ real tiny model (stories260K)

def test_batching_matches_batch_size_one_stories260k(monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("PRUNEKIT_TASKS_DIR", str(TASK_DIR))
    tok = AutoTokenizer.from_pretrained(str(STORIES_HF))
    model = AutoModelForCausalLM.from_pretrained(str(STORIES_HF)).eval()
    # boolq passages exceed the 512-token context with this 512-word vocabulary: exercises truncation
    items = (load_task("boolq", 2) + load_task("hellaswag", 2) + load_task("winogrande", 2)
             + load_task("arc_challenge", 2) + load_task("openbookqa", 1))
    one = zs.score_items(model, tok, items, batch_size=1)
    many = zs.score_items(model, tok, items, batch_size=5)
    for a, b in zip(one, many):
        assert [g for _, g in a] == [g for _, g in b]
        assert [ll for ll, _ in a] == pytest.approx([ll for ll, _ in b], abs=1e-4)
    # independent check of one log-likelihood by a single unpadded forward pass
    ctx, cont = zs.encode_pair(tok, *items[2].requests()[0])
    with torch.no_grad():
        logits = model(torch.tensor([ctx + cont])).logits[0, len(ctx) - 1:-1].log_softmax(-1)
    ref = logits.gather(-1, torch.tensor(cont)[:, None]).sum().item()
    assert one[2][0][0] == pytest.approx(ref, abs=1e-4)
