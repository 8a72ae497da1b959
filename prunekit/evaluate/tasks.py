"""Zero-shot multiple-choice tasks read from local files, with lm-eval-harness (v0.4) prompts.

Every parser returns a list of :class:`Item` in file order. An item is scored by the
log-likelihood of each continuation ``choices[i]`` given its context (``contexts[i]`` when the
context differs per choice, as in WinoGrande's partial evaluation, else ``context``).
``norm_lengths[i]`` is the length lm-eval divides by for ``acc_norm``: ``len()`` (Python characters,
i.e. code points, not bytes and not tokens) of the string its ``doc_to_choice`` returns, which is the
choice *without* the target delimiter ``" "``.

Per task: what lm-eval does, and where these local files force a deviation.

- ``boolq`` (lm-eval ``super_glue/boolq``): context ``"{passage}\\nQuestion: {question}?\\nAnswer:"``,
  choices ``" no"``, ``" yes"``, gold = int(answer). Local file is the original BoolQ dev set
  (question, title, passage, answer: bool); its passages and questions are the SuperGLUE ones.
  No deviation (lm-eval reports only ``acc``).
- ``rte`` (lm-eval ``glue/rte``): context ``"{sentence1}\\nQuestion: {sentence2} True or False?\\nAnswer:"``,
  choices ``" True"``, ``" False"``, gold = label (0 = entailment = True). No deviation (``acc`` only).
- ``hellaswag``: lm-eval builds ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())``
  and choices ``" " + preprocess(ending)``, where ``preprocess`` strips, replaces ``" [title]"`` with
  ``". "``, deletes every ``[...]`` and replaces double spaces by one. The local file (llama.cpp's
  format) only has ``"activity_label: ctx"`` with ``ctx = ctx_a + " " + ctx_b`` already joined and
  partly cleaned. Deviation: ``ctx_b`` is not separable, so ``ctx_b.capitalize()`` is approximated by
  upper-casing the first character of the final fragment (after the last ``". "``) when that fragment
  does not end with ``.``/``!``/``?`` (an unfinished sentence = ActivityNet's ``ctx_b``; 3,243 of the
  10,042 items, of which 3,236 start lower-case and change); letters after the first are left alone
  (``capitalize()`` would lower-case them).
  ``preprocess`` is then applied exactly as lm-eval does to the context and every ending.
- ``winogrande`` (lm-eval ``winogrande``, partial evaluation): the sentence's ``_`` splits it;
  ``contexts[i] = sentence[:idx] + option_i`` and the continuation, the same for both choices, is
  ``" " + sentence[idx + 1:].strip()``. ``acc`` compares the continuation's log-likelihood under the
  two contexts. lm-eval's ``doc_to_choice`` returns the two partial contexts, so its (unreported)
  ``acc_norm`` divides by their lengths; ``norm_lengths`` reproduces that. Sentence and options are
  recovered from ``"...sentence: {sentence}\\n\\nOption1: {o1} Option2: {o2} Answer format: ..."``.
- ``arc_easy`` / ``arc_challenge`` (lm-eval ``arc_easy``/``arc_challenge``): context
  ``"Question: {question}\\nAnswer:"``, choices ``" {text}"`` (3 to 5 choices), gold = index of the
  answer key. Recovered from ``"...question: {q}\\n\\nAnswer1: {a} Answer2: {b} ...\\n\\nAnswer format: ..."``.
  Deviation (unavoidable, harmless for scoring): the original choice labels (A-E / 1-5) are lost;
  choices keep their file order, which is the dataset's order.
- ``openbookqa`` (lm-eval ``openbookqa``): context = question stem (no "Question:" prefix), choices
  ``" {text}"``. Same recovery as ARC.
- ``piqa`` (lm-eval ``piqa``): context ``"Question: {goal}\\nAnswer:"``, choices ``" {sol1}"``, ``" {sol2}"``.
  Recovered from ``"...question: {goal}\\n\\nSolution1: {sol1}\\n\\nSolution2: {sol2}\\n\\nAnswer format: ..."``;
  the texts are kept verbatim (PIQA solutions sometimes carry trailing spaces, as in the dataset).

For the instruction-format files the recovered strings are exactly the substrings between the
fixed markers; if a dataset string had leading/trailing whitespace that the converter dropped, it
cannot be restored (not observed to matter).
"""
from __future__ import annotations

import bz2
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..core.errors import PrunekitError

# the seven tasks whose mean accuracy the pruning papers report (Wanda, SparseGPT, OWL, ...)
PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
# tasks for which lm-eval reports acc_norm next to acc
ACC_NORM_REPORTED = ("hellaswag", "arc_easy", "arc_challenge", "openbookqa", "piqa")


@dataclass(frozen=True)
class Item:
    """One multiple-choice question.

    ``choices`` are the continuations scored (target delimiter included, e.g. ``" yes"``);
    ``contexts`` (optional) gives a context per choice, overriding ``context``;
    ``norm_lengths`` are lm-eval's acc_norm divisors (character length of its choice strings).
    """

    context: str
    choices: list[str]
    gold: int
    contexts: list[str] | None = None
    norm_lengths: list[int] | None = None
    task: str = ""
    meta: dict = field(default_factory=dict, compare=False, repr=False)

    def requests(self) -> list[tuple[str, str]]:
        """(context, continuation) per choice."""
        ctxs = self.contexts if self.contexts is not None else [self.context] * len(self.choices)
        return list(zip(ctxs, self.choices))

    def lengths(self) -> list[int]:
        if self.norm_lengths is not None:
            return list(self.norm_lengths)
        return [len(c[1:] if c.startswith(" ") else c) for c in self.choices]


def _mc(context: str, texts: list[str], gold: int, task: str, **meta) -> Item:
    """Context + choices with lm-eval's default target delimiter ``" "``."""
    return Item(context=context, choices=[" " + t for t in texts], gold=gold,
                norm_lengths=[len(t) for t in texts], task=task, meta=meta)


# ----------------------------------------------------------------------------------- task dir

def tasks_dir(task_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the task files: argument, $PRUNEKIT_TASKS_DIR, ../shared/tasks from the
    working directory, or shared/tasks next to the repository."""
    if task_dir is not None:
        cands = [Path(task_dir)]
    elif os.environ.get("PRUNEKIT_TASKS_DIR"):
        cands = [Path(os.environ["PRUNEKIT_TASKS_DIR"])]
    else:
        cands = [Path.cwd() / ".." / "shared" / "tasks", Path(__file__).resolve().parents[3] / "shared" / "tasks"]
    for c in cands:
        if c.is_dir():
            return c
    raise PrunekitError(
        "zero-shot task files not found (looked in " + ", ".join(str(c) for c in cands)
        + "); set PRUNEKIT_TASKS_DIR to the folder holding boolq/, rte/, hellaswag/, winogrande/, "
          "ARC-Easy/, ARC-Challenge/, openbookqa/, piqa/")


def _file(task_dir, *parts: str) -> Path:
    p = tasks_dir(task_dir).joinpath(*parts)
    if not p.is_file():
        raise PrunekitError(f"task file missing: {p} (PRUNEKIT_TASKS_DIR points at the wrong folder?)")
    return p


def _bad(task: str, i: int, why: str):
    return PrunekitError(f"{task}: cannot parse item {i}: {why}")


# ---------------------------------------------------------------------------------- parsers

def load_boolq(task_dir=None) -> list[Item]:
    items = []
    with open(_file(task_dir, "boolq", "dev.jsonl"), encoding="utf-8") as f:
        for i, line in enumerate(x for x in f if x.strip()):
            d = json.loads(line)
            ctx = f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:"
            items.append(_mc(ctx, ["no", "yes"], int(bool(d["answer"])), "boolq"))
    return items


def load_rte(task_dir=None) -> list[Item]:
    import pyarrow.parquet as pq

    rows = pq.read_table(_file(task_dir, "rte", "validation.parquet")).to_pylist()
    items = []
    for i, d in enumerate(rows):
        if d["label"] not in (0, 1):
            raise _bad("rte", i, f"label {d['label']!r}")
        ctx = f"{d['sentence1']}\nQuestion: {d['sentence2']} True or False?\nAnswer:"
        items.append(_mc(ctx, ["True", "False"], int(d["label"]), "rte"))
    return items


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleaning (WikiHow bracket artefacts)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _capitalize_ctx_b(ctx: str) -> str:
    """Approximate lm-eval's ``ctx_b.capitalize()`` on an already joined ``ctx_a + " " + ctx_b``."""
    body = ctx.rstrip()
    if not body or body[-1] in ".!?":
        return ctx  # complete last sentence: ctx_b empty (WikiHow)
    cut = body.rfind(". ")
    start = cut + 2 if cut >= 0 else (body.find(": ") + 2 if ": " in body else 0)
    return ctx[:start] + ctx[start:start + 1].upper() + ctx[start + 1:]


def load_hellaswag(task_dir=None) -> list[Item]:
    with bz2.open(_file(task_dir, "hellaswag", "hellaswag_val_full.txt.bz2"), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise PrunekitError(f"hellaswag: {len(lines)} lines, not a multiple of 6")
    items = []
    for i in range(len(lines) // 6):
        ctx, gold, *endings = lines[6 * i: 6 * i + 6]
        try:
            g = int(gold)
        except ValueError:
            raise _bad("hellaswag", i, f"gold line {gold!r}") from None
        if not 0 <= g < 4:
            raise _bad("hellaswag", i, f"gold {g}")
        texts = [hellaswag_preprocess(e) for e in endings]
        items.append(_mc(hellaswag_preprocess(_capitalize_ctx_b(ctx)), texts, g, "hellaswag"))
    return items


def _instructions(task_dir, folder: str) -> list[dict]:
    with open(_file(task_dir, folder, "test.json"), encoding="utf-8") as f:
        return json.load(f)


def _after(text: str, marker: str, task: str, i: int) -> str:
    k = text.find(marker)
    if k < 0:
        raise _bad(task, i, f"no {marker!r}")
    return text[k + len(marker):]


def _answer_index(answer: str, prefix: str, n: int, task: str, i: int) -> int:
    m = re.fullmatch(prefix + r"(\d+)", answer.strip().lower())
    if not m or not 1 <= int(m.group(1)) <= n:
        raise _bad(task, i, f"answer {answer!r} with {n} choices")
    return int(m.group(1)) - 1


def _split_numbered(body: str, label: str, n: int, sep: str, task: str, i: int) -> list[str]:
    """``"{label}1: a{sep}{label}2: b ..."`` -> [a, b, ...] for exactly n choices."""
    first = f"{label}1: "
    if not body.startswith(first):
        raise _bad(task, i, f"choices do not start with {first!r}")
    out, pos = [], len(first)
    for k in range(2, n + 1):
        nxt = body.find(f"{sep}{label}{k}: ", pos)
        if nxt < 0:
            raise _bad(task, i, f"no {label}{k}")
        out.append(body[pos:nxt])
        pos = nxt + len(f"{sep}{label}{k}: ")
    out.append(body[pos:])
    return out


def _arc_like(task: str, folder: str, task_dir, arc_prompt: bool) -> list[Item]:
    items = []
    for i, d in enumerate(_instructions(task_dir, folder)):
        text = _after(d["instruction"], "Please choose the correct answer to the question: ", task, i)
        head, sep, fmt = text.rpartition("\n\nAnswer format: ")
        if not sep:
            raise _bad(task, i, "no answer format")
        n = len(fmt.strip().split("/"))
        question, sep, body = head.partition("\n\nAnswer1: ")
        if not sep:
            raise _bad(task, i, "no Answer1")
        texts = _split_numbered("Answer1: " + body, "Answer", n, " ", task, i)
        gold = _answer_index(d["answer"], "answer", n, task, i)
        ctx = f"Question: {question}\nAnswer:" if arc_prompt else question
        items.append(_mc(ctx, texts, gold, task))
    return items


def load_arc_easy(task_dir=None) -> list[Item]:
    return _arc_like("arc_easy", "ARC-Easy", task_dir, arc_prompt=True)


def load_arc_challenge(task_dir=None) -> list[Item]:
    return _arc_like("arc_challenge", "ARC-Challenge", task_dir, arc_prompt=True)


def load_openbookqa(task_dir=None) -> list[Item]:
    return _arc_like("openbookqa", "openbookqa", task_dir, arc_prompt=False)


def load_piqa(task_dir=None) -> list[Item]:
    items = []
    for i, d in enumerate(_instructions(task_dir, "piqa")):
        text = _after(d["instruction"], "Please choose the correct solution to the question: ", "piqa", i)
        head, sep, _ = text.rpartition("\n\nAnswer format: ")
        goal, sep2, body = head.partition("\n\nSolution1: ")
        if not (sep and sep2):
            raise _bad("piqa", i, "unexpected layout")
        texts = _split_numbered("Solution1: " + body, "Solution", 2, "\n\n", "piqa", i)
        gold = _answer_index(d["answer"], "solution", 2, "piqa", i)
        items.append(_mc(f"Question: {goal}\nAnswer:", texts, gold, "piqa"))
    return items


_WINO = re.compile(r"(?s)(.*)\n\nOption1: (.*) Option2: (.*) Answer format: option1/option2\s*")


def load_winogrande(task_dir=None) -> list[Item]:
    items = []
    for i, d in enumerate(_instructions(task_dir, "winogrande")):
        text = _after(d["instruction"], "fill in the blank to complete the given sentence: ", "winogrande", i)
        m = _WINO.fullmatch(text)
        if not m:
            raise _bad("winogrande", i, "unexpected layout")
        sentence, o1, o2 = m.groups()
        if sentence.count("_") != 1:
            raise _bad("winogrande", i, "sentence must contain exactly one '_'")
        idx = sentence.index("_")
        contexts = [sentence[:idx] + o1, sentence[:idx] + o2]
        target = " " + sentence[idx + 1:].strip()
        gold = _answer_index(d["answer"], "option", 2, "winogrande", i)
        items.append(Item(context=sentence[:idx], choices=[target, target], gold=gold, contexts=contexts,
                          norm_lengths=[len(c) for c in contexts], task="winogrande",
                          meta={"sentence": sentence, "options": [o1, o2]}))
    return items


TASKS: dict[str, Callable[..., list[Item]]] = {
    "boolq": load_boolq,
    "rte": load_rte,
    "hellaswag": load_hellaswag,
    "winogrande": load_winogrande,
    "arc_easy": load_arc_easy,
    "arc_challenge": load_arc_challenge,
    "openbookqa": load_openbookqa,
    "piqa": load_piqa,
}


def load_task(name: str, limit: int | None = None, task_dir=None) -> list[Item]:
    """Items of one task in file order; ``limit`` keeps the first N (deterministic)."""
    if name not in TASKS:
        raise PrunekitError(f"unknown zero-shot task '{name}'; choose from {', '.join(TASKS)}")
    items = TASKS[name](task_dir)
    if limit is not None:
        if limit < 1:
            raise PrunekitError(f"--limit must be >= 1, got {limit}")
        items = items[:limit]
    return items
