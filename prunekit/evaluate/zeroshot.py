"""Zero-shot multiple-choice evaluation by continuation log-likelihood, lm-eval-harness (v0.4) style.

Scoring (what lm-eval's ``HFLM.loglikelihood`` does, reimplemented):

- Tokenisation (``encode_pair``): trailing whitespace of the context is moved to the front of the
  continuation; ``whole = enc(context + continuation)``, ``ctx = enc(context)``, and the continuation
  tokens are ``whole[len(ctx):]`` (so a token that merges across the boundary counts as continuation).
  ``enc(s) = tokenizer(s, add_special_tokens=add_bos_token)``. Default ``add_bos_token=False``: no
  BOS, as lm-eval v0.3 and the earlier v0.4 releases (used by the pruning papers) did; ``True`` adds the
  tokenizer's special tokens (BOS for LLaMA-style tokenizers; nothing for GPT-2-style ones);
  ``None`` uses the tokenizer's default, which is what lm-eval 0.4.13 does when ``add_bos_token`` is
  unset (LLaMA tokenizers then get BOS). An empty context becomes ``[bos or eos]``.
  Checked against lm-eval 0.4.13 ``HFLM.loglikelihood`` on 144 requests of all 8 tasks (stories260K
  and a tiny LLaMA with the GPT-2 tokenizer, all three settings): same is_greedy, |d loglik| < 4e-5.
- The model input is ``(ctx + cont)[-(max_length + 1):][:-1]`` (truncation from the left), the
  log-likelihood is the sum over the continuation tokens of log_softmax(logits) in fp32, and
  ``is_greedy`` says every continuation token is the argmax. ``max_length`` is read like lm-eval's:
  config ``n_positions`` / ``max_position_embeddings`` / ``n_ctx``, else the tokenizer's
  ``model_max_length`` when set, else 2048.
- Batches are formed after sorting by length (longest first), right-padded, no attention mask (as
  lm-eval's causal path): with causal attention the padding never reaches the scored positions, so
  the result equals batch size 1 up to float rounding.

Metrics (lm-eval ``multiple_choice`` ``process_results``):

- ``acc``: ``argmax_i ll_i == gold`` (first index on ties, like ``np.argmax``).
- ``acc_norm``: ``argmax_i ll_i / L_i == gold`` with ``L_i = len(choice_i)`` — the length in Python
  *characters* (Unicode code points; not UTF-8 bytes, not tokens) of the choice string *without* the
  leading target delimiter " " (lm-eval measures ``doc_to_choice``'s strings; the delimiter is added
  only when the request is built). For WinoGrande lm-eval's choices are the two partial contexts, so
  L_i is their length (lm-eval does not report acc_norm there). A zero length is taken as 1.
- ``*_stderr``: sample standard deviation (ddof=1) / sqrt(n), lm-eval's ``mean_stderr``.

The papers' "mean accuracy" is the mean of ``acc`` over boolq, rte, hellaswag, winogrande, arc_easy,
arc_challenge, openbookqa (Wanda's tables report ``acc`` for every task, e.g. LLaMA-7B HellaSwag 56.9);
PIQA is reported beside it. ``mean_acc_norm_where_reported`` is the variant with acc_norm for
hellaswag/arc/openbookqa.
"""
from __future__ import annotations

import math
import time
from typing import Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.errors import PrunekitError
from ..core.families import model_context_length
from ..core.offload import on_device
from .tasks import ACC_NORM_REPORTED, PAPER_TASKS, TASKS, Item, tasks_dir

DEFAULT_TASKS = PAPER_TASKS + ("piqa",)
_HUGE = 10 ** 12


# ------------------------------------------------------------------------------- tokenisation

def _enc(tokenizer, text: str, add_bos_token: bool | None) -> list[int]:
    """lm-eval's ``tok_encode``: ``add_special_tokens=add_bos_token``, or the tokenizer's default if None."""
    kw = {} if add_bos_token is None else {"add_special_tokens": bool(add_bos_token)}
    return list(tokenizer(text, **kw)["input_ids"])


def encode_pair(tokenizer, context: str, continuation: str,
                add_bos_token: bool | None = False) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, split the way lm-eval's ``_encode_pair`` does."""
    if context == "":
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise PrunekitError("empty context and the tokenizer has neither BOS nor EOS token")
        return [start], _enc(tokenizer, continuation, add_bos_token)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _enc(tokenizer, context + continuation, add_bos_token)
    ctx = _enc(tokenizer, context, add_bos_token)
    return ctx, whole[len(ctx):]


def model_max_length(model, tokenizer=None) -> int:
    """The model's context length (the architecture family's answer), else the tokenizer's, else 2048."""
    v = model_context_length(model)
    if v:
        return v
    v = getattr(tokenizer, "model_max_length", None)
    if isinstance(v, int) and 0 < v < _HUGE:
        return v
    return 2048


# ----------------------------------------------------------------------------------- scoring

@torch.no_grad()
def score_requests(model, tokenizer, requests: Sequence[tuple[str, str]], batch_size: int = 8, device=None,
                   max_length: int | None = None, add_bos_token: bool | None = False,
                   desc: str = "loglik") -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) of each continuation given its context, in request order."""
    if batch_size < 1:
        raise PrunekitError(f"batch size must be >= 1, got {batch_size}")
    max_length = max_length or model_max_length(model, tokenizer)
    encoded = []
    for ctx, cont in requests:
        c, k = encode_pair(tokenizer, ctx, cont, add_bos_token)
        if len(k) > max_length:
            raise PrunekitError(f"continuation of {len(k)} tokens exceeds the model's context length {max_length}")
        inp = (c + k)[-(max_length + 1):][:-1]
        encoded.append((inp, k))
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    results: list[tuple[float, bool] | None] = [None] * len(encoded)
    dev = device or next(model.parameters()).device
    for s in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        idx = order[s:s + batch_size]
        width = max(len(encoded[i][0]) for i in idx)
        x = torch.zeros((len(idx), max(width, 1)), dtype=torch.long)
        for r, i in enumerate(idx):
            inp = encoded[i][0]
            x[r, :len(inp)] = torch.tensor(inp, dtype=torch.long)
        logits = model(input_ids=x.to(dev), use_cache=False).logits
        for r, i in enumerate(idx):
            inp, cont = encoded[i]
            if not cont:
                results[i] = (0.0, True)
                continue
            n = len(inp)
            lp = logits[r, n - len(cont):n].float().log_softmax(-1)
            tgt = torch.tensor(cont, dtype=torch.long, device=lp.device)
            ll = lp.gather(-1, tgt[:, None]).sum().item()
            results[i] = (float(ll), bool((lp.argmax(-1) == tgt).all().item()))
    return results  # type: ignore[return-value]


def score_items(model, tokenizer, items: Sequence[Item], batch_size: int = 8, device=None,
                max_length: int | None = None, add_bos_token: bool | None = False,
                desc: str = "loglik") -> list[list[tuple[float, bool]]]:
    """Per item, per choice: (log-likelihood of the continuation, is_greedy)."""
    reqs, spans = [], []
    for it in items:
        r = it.requests()
        spans.append((len(reqs), len(reqs) + len(r)))
        reqs.extend(r)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    with on_device(model, dev):
        flat = score_requests(model, tokenizer, reqs, batch_size, dev, max_length, add_bos_token, desc)
    return [flat[a:b] for a, b in spans]


# ----------------------------------------------------------------------------------- metrics

def _mean_stderr(x: np.ndarray) -> float:
    if len(x) < 2:
        return float("nan")
    return float(np.std(x, ddof=1) / math.sqrt(len(x)))


def item_predictions(item: Item, scores: Sequence[tuple[float, bool]]) -> tuple[int, int]:
    """(pred, pred_norm) for one item."""
    lls = np.array([s[0] for s in scores], dtype=np.float64)
    lens = np.array([max(n, 1) for n in item.lengths()], dtype=np.float64)
    return int(np.argmax(lls)), int(np.argmax(lls / lens))


def metrics(items: Sequence[Item], scores: Sequence[Sequence[tuple[float, bool]]]) -> dict:
    if not items:
        raise PrunekitError("no items to score")
    preds = [item_predictions(it, sc) for it, sc in zip(items, scores)]
    acc = np.array([p == it.gold for (p, _), it in zip(preds, items)], dtype=np.float64)
    accn = np.array([q == it.gold for (_, q), it in zip(preds, items)], dtype=np.float64)
    return {"acc": float(acc.mean()), "acc_stderr": _mean_stderr(acc),
            "acc_norm": float(accn.mean()), "acc_norm_stderr": _mean_stderr(accn), "n": len(items)}


def evaluate_task(model, tokenizer, name: str, limit: int | None = None, batch_size: int = 8, device=None,
                  task_dir=None, max_length: int | None = None, add_bos_token: bool | None = False) -> dict:
    """acc, acc_norm (lm-eval definitions), their stderr and n on one task (first ``limit`` items)."""
    t0 = time.time()
    if name not in TASKS:
        raise PrunekitError(f"unknown zero-shot task '{name}'; choose from {', '.join(TASKS)}")
    if limit is not None and limit < 1:
        raise PrunekitError(f"--limit must be >= 1, got {limit}")
    all_items = TASKS[name](task_dir)
    items = all_items[:limit] if limit is not None else all_items
    scores = score_items(model, tokenizer, items, batch_size, device, max_length, add_bos_token, desc=name)
    out = {"task": name, **metrics(items, scores)}
    out["n_available"] = len(all_items)
    out["lm_eval_reports"] = ["acc", "acc_norm"] if name in ACC_NORM_REPORTED else ["acc"]
    out["seconds"] = round(time.time() - t0, 2)
    return out


def _summary(per_task: dict, limit, backend: str) -> dict:
    present = [t for t in PAPER_TASKS if per_task.get(t, {}).get("acc") is not None]
    res = {"tasks": per_task, "backend": backend, "limit": limit, "num_fewshot": 0,
           "mean_tasks": present, "mean_complete": len(present) == len(PAPER_TASKS), "mean_acc": None,
           "mean_acc_norm_where_reported": None}
    if present:
        res["mean_acc"] = float(np.mean([per_task[t]["acc"] for t in present]))
        # variant some papers use: acc_norm where lm-eval reports it (hellaswag, arc, openbookqa), acc elsewhere
        res["mean_acc_norm_where_reported"] = float(np.mean(
            [per_task[t]["acc_norm"] if t in ACC_NORM_REPORTED and per_task[t].get("acc_norm") is not None
             else per_task[t]["acc"] for t in present]))
    if "piqa" in per_task:
        res["piqa_acc"] = per_task["piqa"].get("acc")
    return res


def _check_names(names: Iterable[str] | None) -> list[str]:
    names = list(names) if names is not None else list(DEFAULT_TASKS)
    bad = [n for n in names if n not in TASKS]
    if bad:
        raise PrunekitError(f"unknown zero-shot task(s) {', '.join(bad)}; choose from {', '.join(TASKS)}")
    if not names:
        raise PrunekitError("no zero-shot task given")
    return list(dict.fromkeys(names))


def evaluate_tasks(model, tokenizer, names: Iterable[str] | None = None, limit: int | None = None,
                   batch_size: int = 8, device=None, backend: str = "prunekit", task_dir=None,
                   max_length: int | None = None, add_bos_token: bool | None = False) -> dict:
    """Several tasks (default: the 7 paper tasks + PIQA). Returns per-task results, ``mean_acc`` over
    the paper tasks evaluated (``mean_complete`` says whether all 7 were), and ``piqa_acc``.
    ``backend="lm-eval"`` delegates to lm-eval-harness (see :func:`evaluate_tasks_lm_eval`)."""
    names = _check_names(names)
    if backend == "lm-eval":
        return evaluate_tasks_lm_eval(model, tokenizer, names, limit, batch_size, device,
                                      max_length=max_length, add_bos_token=add_bos_token)
    if backend != "prunekit":
        raise PrunekitError(f"unknown evaluation backend '{backend}' (prunekit or lm-eval)")
    if task_dir is None:
        tasks_dir()  # fail early with the clear message
    per = {n: evaluate_task(model, tokenizer, n, limit, batch_size, device, task_dir, max_length, add_bos_token)
           for n in names}
    return _summary(per, limit, "prunekit")


def evaluate_tasks_lm_eval(model, tokenizer, names: Iterable[str] | None = None, limit: int | None = None,
                           batch_size: int = 8, device=None, max_length: int | None = None,
                           add_bos_token: bool | None = False) -> dict:
    """The same tasks through lm-eval-harness (``simple_evaluate`` on an ``HFLM`` wrapping the in-memory
    model). lm-eval reads its own copies of the datasets (Hugging Face Hub or its cache), not the local
    files; results have the same layout as :func:`evaluate_tasks`."""
    names = _check_names(names)
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise PrunekitError(f"backend 'lm-eval' needs the lm-eval package (pip install lm-eval): {e}") from None
    t0 = time.time()
    with on_device(model, device if device is not None else next(model.parameters()).device):
        kw = {"pretrained": model, "tokenizer": tokenizer, "batch_size": batch_size, "add_bos_token": add_bos_token}
        if max_length:
            kw["max_length"] = max_length
        lm = HFLM(**kw)
        out = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=0, limit=limit)
    per = {}
    for n in names:
        r = out["results"].get(n, {})
        get = lambda k: (float(r[f"{k},none"]) if isinstance(r.get(f"{k},none"), (int, float)) else None)  # noqa: E731
        counts = out.get("n-samples", {}).get(n) or {}
        per[n] = {"task": n, "acc": get("acc"), "acc_stderr": get("acc_stderr"), "acc_norm": get("acc_norm"),
                  "acc_norm_stderr": get("acc_norm_stderr"), "n": counts.get("effective"),
                  "n_available": counts.get("original"),
                  "lm_eval_reports": ["acc", "acc_norm"] if n in ACC_NORM_REPORTED else ["acc"]}
    res = _summary(per, limit, "lm-eval")
    res["seconds"] = round(time.time() - t0, 2)
    return res
