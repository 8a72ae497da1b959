"""Why prunekit's dense SmolLM2 perplexity under protocol P (21.61 on an H200) is below the brief's independent
script's (21.98): the same first windows of WikiText-2 (seqlen 2048) scored three ways on CPU:
  rows-fp32   prunekit's evaluation text (HF rows joined with "\\n\\n"), float32 weights (what the GPU run did)
  rows-bf16   the same text, weights and compute in bf16 (what a GPU script often does)
  raw-fp32    the text of wiki.test.raw read as is (CRLF lines, no "\\n\\n" joins), float32

    python -m bench.dense_gap --windows 16        # writes bench/results/dense_gap.json
    python -m bench.dense_gap --model stories260K --windows 1 --seqlen 128   # a quick check
"""
from __future__ import annotations

import argparse

import torch

from prunekit.core.data import data_dir, eval_token_ids
from prunekit.evaluate.perplexity import perplexity

from bench.lib.env import environment
from bench.lib.models import load
from bench.lib.results import RESULTS, save_results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=2048)
    a = ap.parse_args(argv)
    model, tok = load(a.model)
    rows = eval_token_ids(tok, "wikitext2", a.seqlen)
    raw_path = data_dir() / "wikitext2" / "wiki.test.raw"
    raw = torch.tensor(tok(open(raw_path, encoding="utf-8", newline="").read(), add_special_tokens=False).input_ids)
    res = {"windows": a.windows, "seqlen": a.seqlen, "tokens_rows": int(rows.numel()), "tokens_raw": int(raw.numel())}
    for name, ids, dtype in (("rows-fp32", rows, torch.float32), ("raw-fp32", raw, torch.float32),
                             ("rows-bf16", rows, torch.bfloat16)):
        model.to(dtype)
        res[name] = perplexity(model, tok, "wikitext2", a.seqlen, a.windows, "cpu", batch_size=1, ids=ids)["ppl"]
        print(name, res[name], flush=True)
    res["environment"] = environment()
    save_results(RESULTS / "dense_gap.json", res)


if __name__ == "__main__":
    main()
