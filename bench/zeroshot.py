"""Zero-shot benchmark: SmolLM2 dense, Wanda 50% uniform, and a 70% pipeline on the 8 tasks.

    python bench/zeroshot.py --limit 50          # CPU: first 50 items of each task
    python bench/zeroshot.py                     # full tasks (GPU)

Pruning uses protocol S calibration (64 x 512 C4 windows) on CPU, P on GPU. Writes
bench/results/zeroshot.json and zeroshot.md.
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
from prunekit.core.data import calibration_windows  # noqa: E402
from prunekit.evaluate.tasks import PAPER_TASKS  # noqa: E402
from prunekit.evaluate.zeroshot import evaluate_tasks  # noqa: E402

PIPELINES = {
    "dense": None,
    "wanda-50-uniform": {"metric": "wanda", "sparsity": 0.5},
    "best-70": None,  # filled from bench/results/quality_<protocol>.json (lowest 70% perplexity), or --best70
}


def best_70(protocol: str) -> dict:
    """The 70% unstructured pipeline with the lowest WikiText-2 perplexity in the quality benchmark."""
    from quality import best_per_sparsity

    data = load_results(RESULTS / f"quality_{protocol}.json")
    best = best_per_sparsity(data).get((0.7, "unstructured")) if data.get("runs") else None
    if best is None:
        return {"metric": "wanda", "sparsity": 0.7, "allocation": "owl"}
    return {k: v for k, v in best[1]["config"].items() if k != "seed"}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--pipelines", nargs="*", default=list(PIPELINES))
    ap.add_argument("--best70", help="JSON config of the 70%% pipeline (default: the best in quality_<protocol>.json)")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    proto = PROTOCOLS["P" if cuda else "S"]
    pipes = dict(PIPELINES)
    if a.best70:
        import json

        pipes["best-70"] = json.loads(a.best70)
    else:
        pipes["best-70"] = best_70("P" if cuda else "S")
    model, tok = prunekit.load_model("smollm2")
    dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    calib = calibration_windows(tok, proto["calib"], proto["nsamples"], proto["seqlen"], proto["seed"])
    out = {"protocol": proto, "limit": a.limit, "environment": environment(), "runs": {}}
    for name in a.pipelines:
        cfg = pipes[name]
        model.load_state_dict(dense)
        t = time.time()
        if cfg:
            prunekit.prune(model, tok, dict(cfg, seqlen=proto["seqlen"], nsamples=proto["nsamples"], device=device),
                           calib_ids=calib)
        z = evaluate_tasks(model, tok, limit=a.limit, batch_size=a.batch_size, device=device)
        out["runs"][name] = {"config": cfg, "results": z, "seconds": round(time.time() - t, 1)}
        save_json(RESULTS / "zeroshot.json", out)
        print(name, z["mean_acc"], flush=True)
    tasks = list(PAPER_TASKS) + ["piqa"]
    lines = ["# Zero-shot accuracy: SmolLM2-135M-Instruct", "",
             f"Local task files, lm-eval conventions (0-shot, log-likelihood, acc; acc_norm in the JSON). "
             f"{'First ' + str(a.limit) + ' items per task' if a.limit else 'Full tasks'}. Pruning calibration "
             f"{proto['nsamples']} x {proto['seqlen']} C4 windows. {out['environment']['processor']}, "
             f"torch {out['environment']['torch']}, {out['environment']['date']}."
             + (f" With {a.limit} items a task's accuracy has a standard error of up to {0.5 / a.limit ** 0.5:.3f} "
                f"(the 7-task mean about {0.5 / (7 * a.limit) ** 0.5:.3f}): small differences are noise."
                if a.limit else ""), "",
             "| pipeline | " + " | ".join(tasks) + " | mean (7 paper tasks) |", "|---" * (len(tasks) + 2) + "|"]
    for name, r in out["runs"].items():
        t = r["results"]["tasks"]
        if r["config"]:
            name += " (" + ", ".join(f"{k}={v}" for k, v in r["config"].items()) + ")"
        lines.append(f"| {name} | " + " | ".join(f"{t[k]['acc']:.3f}" if k in t else "-" for k in tasks)
                     + f" | {r['results']['mean_acc']:.4f} |")
    (RESULTS / "zeroshot.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
