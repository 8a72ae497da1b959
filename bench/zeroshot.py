"""Zero-shot benchmark: SmolLM2 dense, Wanda 50% uniform, and a 70% pipeline on the 8 tasks.

    python -m bench.zeroshot --limit 50          # CPU: first 50 items of each task
    python -m bench.zeroshot                     # full tasks (GPU)
    python -m bench.zeroshot --model stories260K --limit 2 --pipelines dense wanda-50-uniform   # a quick check

Pruning uses protocol S calibration (64 x 512 C4 windows) on CPU, P on GPU. Writes
bench/results/zeroshot.json and zeroshot.md.
"""
from __future__ import annotations

import argparse
import json
import time

from prunekit.core.offload import resolve_device
from prunekit.evaluate.tasks import PAPER_TASKS
from prunekit.evaluate.zeroshot import evaluate_tasks

from bench.lib.env import describe as machine_line
from bench.lib.env import environment
from bench.lib.models import ProtocolModel, display_name
from bench.lib.pipelines import best_per_sparsity
from bench.lib.protocols import select
from bench.lib.results import RESULTS, load_results, save_results
from bench.lib.tables import document, table

PIPELINES = {
    "dense": None,
    "wanda-50-uniform": {"metric": "wanda", "sparsity": 0.5},
    "best-70": None,  # filled from bench/results/quality_<protocol>.json (lowest 70% perplexity), or --best70
}


def best_70(protocol: str) -> dict:
    """The 70% unstructured pipeline with the lowest WikiText-2 perplexity in the quality benchmark."""
    data = load_results(RESULTS / f"quality_{protocol}.json")
    best = best_per_sparsity(data).get((0.7, "unstructured")) if data.get("runs") else None
    if best is None:
        return {"metric": "wanda", "sparsity": 0.7, "allocation": "owl"}
    return {k: v for k, v in best[1]["config"].items() if k != "seed"}


def markdown(out: dict) -> str:
    tasks = list(PAPER_TASKS) + ["piqa"]
    limit, proto, model = out["limit"], out["protocol"], out.get("model", "smollm2")
    lines = [f"# Zero-shot accuracy: {display_name(model)}", "",
             f"Local task files, lm-eval conventions (0-shot, log-likelihood, acc; acc_norm in the JSON). "
             f"{'First ' + str(limit) + ' items per task' if limit else 'Full tasks'}. Pruning calibration "
             f"{proto['nsamples']} x {proto['seqlen']} C4 windows. {machine_line(out['environment'])}."
             + (f" With {limit} items a task's accuracy has a standard error of up to {0.5 / limit ** 0.5:.3f} "
                f"(the 7-task mean about {0.5 / (7 * limit) ** 0.5:.3f}): small differences are noise."
                if limit else ""), ""]
    rows = []
    for name, r in out["runs"].items():
        t = r["results"]["tasks"]
        if r["config"]:
            name += " (" + ", ".join(f"{k}={v}" for k, v in r["config"].items()) + ")"
        rows.append([name] + [f"{t[k]['acc']:.3f}" if k in t else "-" for k in tasks]
                    + [f"{r['results']['mean_acc']:.4f}"])
    return document(lines + table(["pipeline"] + tasks + ["mean (7 paper tasks)"], rows))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--pipelines", nargs="*", default=list(PIPELINES), choices=list(PIPELINES))
    ap.add_argument("--best70", help="JSON config of the 70%% pipeline (default: the best in quality_<protocol>.json)")
    a = ap.parse_args(argv)
    device = resolve_device(a.device).type
    pname, proto = select(None, device)
    pipes = dict(PIPELINES, **{"best-70": json.loads(a.best70) if a.best70 else best_70(pname)})
    pm = ProtocolModel(a.model, proto, device)
    out = {"protocol": proto, "limit": a.limit, "model": a.model, "environment": environment(), "runs": {}}
    for name in a.pipelines:
        cfg = pipes[name]
        t = time.time()
        if cfg:
            pm.prune(cfg)
        else:
            pm.dense.restore()
        z = evaluate_tasks(pm.model, pm.tok, limit=a.limit, batch_size=a.batch_size, device=device)
        out["runs"][name] = {"config": cfg, "results": z, "seconds": round(time.time() - t, 1)}
        save_results(RESULTS / "zeroshot.json", out, markdown)
        print(name, z["mean_acc"], flush=True)


if __name__ == "__main__":
    main()
