"""How much of a protocol-S perplexity is float rounding? The same pipeline on the same 64 calibration windows,
fed in different orders (only the order of float summations changes), on SmolLM2.

Why: SparseGPT 70% uniform gave 314.46 at commit c4634cf and 357.5 at 0237809 and later, where the only
change in its path is bit-level (the Cholesky's working copy is damped in place); block 0 came out identical,
block 1's o_proj differed by 2e-5 and down_proj had 0.025% of its mask flipped (near ties).

    python bench/order_noise.py --metric sparsegpt --sparsity 0.7 --orders 3
Writes bench/results/order_noise.json (merged by key) and .md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PROTOCOLS, RESULTS, environment, load_results, save_json  # noqa: E402

import prunekit  # noqa: E402
from prunekit.core.data import calibration_windows, eval_token_ids  # noqa: E402
from prunekit.evaluate.perplexity import perplexity  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--metric", default="sparsegpt")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--orders", type=int, default=3, help="order 0 = the protocol's; k > 0: a seeded permutation")
    a = ap.parse_args(argv)
    proto = PROTOCOLS["S"]
    out = RESULTS / "order_noise.json"
    data = load_results(out)
    model, tok = prunekit.load_model("smollm2")
    dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    eval_ids = eval_token_ids(tok, "wikitext2", proto["seqlen"])
    calib = calibration_windows(tok, proto["calib"], proto["nsamples"], proto["seqlen"], proto["seed"])
    key = f"{a.metric}/{a.sparsity:.2f}"
    rec = data.setdefault(key, {"metric": a.metric, "sparsity": a.sparsity, "protocol": proto, "ppl_by_order": {}})
    for k in range(a.orders):
        if str(k) in rec["ppl_by_order"]:
            continue
        perm = torch.arange(calib.shape[0]) if k == 0 else torch.randperm(calib.shape[0], generator=torch.Generator().manual_seed(k))
        model.load_state_dict(dense)
        t = time.time()
        prunekit.prune(model, tok, {"metric": a.metric, "sparsity": a.sparsity, "seqlen": proto["seqlen"], "device": "cpu",
                                    "nsamples": proto["nsamples"], "calib": proto["calib"], "seed": proto["seed"]},
                       calib_ids=calib[perm])
        ppl = perplexity(model, tok, "wikitext2", proto["seqlen"], proto["eval_windows"], "cpu", batch_size=4, ids=eval_ids)["ppl"]
        rec["ppl_by_order"][str(k)] = ppl
        print(key, "order", k, "ppl", round(ppl, 3), f"{time.time() - t:.0f}s", flush=True)
        rec["environment"] = environment()
        save_json(out, data)
    lines = ["# Rounding noise: one pipeline, the same calibration windows in different orders (SmolLM2, protocol S)", "",
             "Order 0 is the protocol's; order k > 0 a seeded permutation of the same 64 windows. Only the order of "
             "floating-point summations differs between runs.", "",
             "| pipeline | PPL per order | max / min |", "|---|---|---|"]
    for k, r in data.items():
        v = [r["ppl_by_order"][o] for o in sorted(r["ppl_by_order"], key=int)]
        lines.append(f"| {k} | {' / '.join(f'{x:.2f}' for x in v)} | {max(v) / min(v):.3f} |")
    (RESULTS / "order_noise.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
