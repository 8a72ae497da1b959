"""Set-up cost of an allocation search (everything before and around the candidates' evaluations).

    python -m bench.search_setup --label now
    PYTHONPATH=/tmp/base:. python -P -m bench.search_setup --label base  # an older prunekit, same script
    python -m bench.search_setup --label check --model stories260K          # a quick check (mind the results file)

DSA on SmolLM2 at 70% with Wanda, protocol S calibration (64 x 512 C4, seed 0), 16 x 256 held-out windows,
budget 2 (population 2: the two seed programs), fitness mode cached. Records the wall time of model
loading, of ``run_search`` as a whole and of its search loop (``seconds``), so ``total - search`` is the
set-up: the dense statistics pass, the score profile, the dense and uniform baselines. The fitness values
are recorded too, so two versions can be checked to search the same thing. The git commit is the one of
the imported prunekit (``PYTHONPATH`` decides which). Writes bench/results/search_setup.json (merged by
label) and .md.
"""
from __future__ import annotations

import argparse
import tempfile
import time

from prunekit.search import run_search

from bench.lib.env import environment
from bench.lib.models import load
from bench.lib.protocols import PROTOCOLS
from bench.lib.results import RESULTS, load_results, save_results
from bench.lib.tables import document, table


def markdown(data: dict) -> str:
    """search_setup.md from the results file."""
    lines = ["# Search set-up cost (SmolLM2, DSA, Wanda 70%)", "", f"Protocol: {data['protocol']}.", ""]
    lines += table(["label", "commit", "load s", "run_search s", "of which search loop s", "set-up s",
                    "fitness of the candidates"],
                   [[label, r["environment"]["git"], r["load_s"], r["run_search_s"], r["search_loop_s"], r["setup_s"],
                     ", ".join(f"{f:.4g}" for f in r["fitness"])] for label, r in data["runs"].items()])
    lines += [""] + [f"- {label}: {r['note']}" for label, r in data["runs"].items() if r.get("note")]
    for label, r in data["runs"].items():
        lines += ["", f"{label}: " + ", ".join(f"{k} {v}" for k, v in r["environment"].items())]
    return document(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--label", required=True)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--budget", type=int, default=2)
    ap.add_argument("--note", default="", help="a remark printed under the table (e.g. what else differs)")
    a = ap.parse_args(argv)
    proto = PROTOCOLS["S"]
    env = environment()  # its git: the checkout of the imported prunekit
    t0 = time.time()
    model, tok = load(a.model)
    t1 = time.time()
    with tempfile.TemporaryDirectory() as out:
        res = run_search(model, tok, "dsa", a.budget, 0.7, metric="wanda", out_dir=out, seed=proto["seed"],
                         resume=False, calib=proto["calib"], nsamples=proto["nsamples"], seqlen=proto["seqlen"],
                         n_heldout=16, heldout_seqlen=256, device="cpu", progress=False, population=a.budget,
                         elite=1)
    t2 = time.time()
    row = {"load_s": round(t1 - t0, 1), "run_search_s": round(t2 - t1, 1), "search_loop_s": res["seconds"],
           "setup_s": round(t2 - t1 - res["seconds"], 1), "baselines": res["baselines"],
           "fitness": [h["fitness"] for h in res["history"]], "programs": [h["program"] for h in res["history"]],
           "note": a.note, "environment": env}
    path = RESULTS / "search_setup.json"
    data = load_results(path)
    data.setdefault("runs", {})[a.label] = row
    data["protocol"] = {"model": a.model, "method": "dsa", "metric": "wanda", "target": 0.7, "budget": a.budget,
                        "calibration": (f"{proto['calib']} {proto['nsamples']} x {proto['seqlen']}, "
                                        f"seed {proto['seed']}"),
                        "heldout": "16 x 256", "mode": "cached", "device": "cpu"}
    save_results(path, data, markdown)
    print(markdown(data))


if __name__ == "__main__":
    main()
