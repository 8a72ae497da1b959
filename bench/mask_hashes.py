"""No-behaviour-change check: hashes of what a fixed list of pruning pipelines saves.

Why: before/after a structural refactor of the package, every pipeline below must save bit-identical masks
(and, as a stronger check, identical weights: SparseGPT reconstruction, STADE bias corrections, block-removal
scales). Each pipeline is run ONLY through the command line (``python -m prunekit.cli prune|search`` in a
subprocess, cwd a temporary folder, the measured source tree first on PYTHONPATH), so the measurement does not
depend on the measured package's internal layout (this script itself imports only bench.lib, for its record,
result file and table). Subprocesses run one at a time with OMP/MKL threads = 1 (the thread
count can change float reduction order) and TOKENIZERS_PARALLELISM=false.

Hashed per pipeline: ``masks`` = sha256 over masks.safetensors (sorted names; name + packed bytes),
``weights`` = sha256 over every tensor of the other *.safetensors files (sorted; name + dtype + shape + bytes),
``sparsity`` / ``layers`` from report.json (and the found recipe for the search).

    python -m bench.mask_hashes                                 # both suites, this repository's prunekit
    python -m bench.mask_hashes --suite stories --prunekit /tmp/pk-base   # an old commit from a git worktree
    python -m bench.mask_hashes --suite stories --out /tmp/mh_new --compare bench/results/mask_hashes.json

Suites: ``stories`` (stories260K from the shared folder, ~30 pipelines, a few seconds each) and ``smollm2`` (three
protocol-S pipelines, minutes each). Writes <out>.json (merged by pipeline name) and <out>.md; default out
bench/results/mask_hashes. --compare prints same / masks differ / weights differ only per pipeline and exits 1
if any masks differ (or a pipeline fails in one file only).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

from bench.lib.env import git_commit, host, now
from bench.lib.paths import REPO, shared_dir
from bench.lib.results import RESULTS, load_results, save_results
from bench.lib.tables import document, table
import prunekit.methods  # noqa: F401  (registers the allocators that published_params looks up)
from prunekit.core.allocation import published_params

THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
OUT = "OUT"  # placeholder for the pipeline's temporary folder (commands are recorded with it)


def pipelines(shared: str) -> dict[str, tuple[str, list[list[str]]]]:
    """name -> (suite, commands). The last command's output folder (OUT/out) is the one hashed."""
    model = f"{shared}/models/stories260K/hf"  # max_position_embeddings 512: seqlen 128 fits
    base = ["--model", model, "--calib", f"{shared}/data/TinyStories-valid-excerpt.txt", "--nsamples", "16",
            "--seqlen", "128", "--seed", "0", "--device", "cpu"]
    st = {}
    for m in ["magnitude", "wanda", "sparsegpt", "ria", "stade", "ace"]:
        st[f"{m}-0.5"] = ["--metric", m, "--sparsity", "0.5"]
    for m, pat in [("wanda", "2:4"), ("sparsegpt", "2:4")]:
        st[f"{m}-{pat}"] = ["--metric", m, "--sparsity", "0.5", "--pattern", pat]
    # down_proj's d_in (172) is not a multiple of 8: kept dense
    st["wanda-4:8-ignore-down"] = ["--metric", "wanda", "--sparsity", "0.5", "--pattern", "4:8",
                                   "--ignore", "*.down_proj"]
    for alloc in ["uniform", "global", "er", "er-plus", "owl", "alphapruning", "farms", "mrp"]:
        st[f"wanda-0.7-{alloc}"] = ["--metric", "wanda", "--sparsity", "0.7", "--allocation", alloc]
    w5, w7 = ["--metric", "wanda", "--sparsity", "0.5"], ["--metric", "wanda", "--sparsity", "0.7"]
    st.update({
        "wanda-0.7-alphapruning-eps-auto": w7 + ["--allocation", "alphapruning", "--allocation-param", "eps=auto"],
        "wanda-0.7-alphapruning-layer": w7 + ["--allocation", "alphapruning", "--allocation-param", "level=layer",
                                              "--granularity", "layer"],
        "sparsegpt-0.7-alphapruning": ["--metric", "sparsegpt", "--sparsity", "0.7", "--allocation", "alphapruning"],
        "wanda-0.7-trim": w7 + ["--rowwise", "trim"],
        "wanda-0.7-alphapruning-floor": w7 + ["--allocation", "alphapruning", "--row-rounding", "floor"],
        "wanda-0.5-reconstruct-sparsegpt": w5 + ["--reconstruct", "sparsegpt"],
        "wanda-0.5-no-sequential": w5 + ["--no-sequential"],
        "wanda-0.5-remove1-prune-comp": w5 + ["--remove-blocks", "1", "--removal", "prune-comp"],
        "wanda-0.5-remove1-bi": w5 + ["--remove-blocks", "1", "--removal", "bi"],
        "wanda-0.5-calib-prototype-hard": w5 + ["--calib-select", "prototype:hard"],
    })
    prune = ["python", "-m", "prunekit.cli", "prune"]
    st = {k: published(v) for k, v in st.items()}
    out = {k: ("stories", [prune + v + base + ["--out", f"{OUT}/out"]]) for k, v in st.items()}
    search = ["python", "-m", "prunekit.cli", "search", "--method", "dsa", "--budget", "2", "--param", "population=2",
              "--param", "elite=1", "--sparsity", "0.7", "--heldout", "4", "--heldout-seqlen", "128"]
    out["dsa-search-budget2"] = ("stories", [search + base + ["--out", f"{OUT}/search"],
                                             prune + ["--recipe", f"{OUT}/search/recipe.yaml", "--model", model,
                                                      "--device", "cpu", "--out", f"{OUT}/out"]])
    proto_s = ["--model", "smollm2", "--calib", "c4", "--nsamples", "64", "--seqlen", "512", "--seed", "0",
               "--device", "cpu", "--out", f"{OUT}/out"]
    for name, v in [("S-wanda-0.5", ["--metric", "wanda", "--sparsity", "0.5"]),
                    ("S-sparsegpt-0.7-alphapruning", ["--metric", "sparsegpt", "--sparsity", "0.7",
                                                      "--allocation", "alphapruning"]),
                    ("S-wanda-2:4", ["--metric", "wanda", "--sparsity", "0.5", "--pattern", "2:4"])]:
        out[name] = ("smollm2", [prune + published(v) + proto_s])
    return out


def published(args: list[str]) -> list[str]:
    """``args`` with ``--allocation-param K=V`` for each parameter the allocation tunes by default and ``args`` leave
    unset, V its published value: the stored hashes were taken with it (before the tuned default)."""
    if "--allocation" not in args:
        return args
    name = args[args.index("--allocation") + 1]
    given = {v.split("=", 1)[0]: v for i, v in enumerate(args) if i and args[i - 1] == "--allocation-param"}
    extra = {k: v for k, v in published_params(name, {}).items() if k not in given}
    return args + [x for k, v in extra.items() for x in ("--allocation-param", f"{k}={v}")]


def sha_masks(folder: Path) -> str:
    h = hashlib.sha256()
    with safe_open(folder / "masks.safetensors", framework="numpy") as f:
        for k in sorted(f.keys()):
            h.update(k.encode())
            h.update(f.get_tensor(k).tobytes())
    return h.hexdigest()


def sha_weights(folder: Path) -> str:
    tensors = {}
    for p in sorted(folder.glob("*.safetensors")):
        if p.name != "masks.safetensors":
            with safe_open(p, framework="pt") as f:
                tensors.update({k: f.get_tensor(k) for k in f.keys()})
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(f"{k}|{t.dtype}|{list(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def sub_env(prunekit: Path, shared: str) -> dict:
    """The subprocesses' environment: the measured tree first on PYTHONPATH, one thread, the shared data; the
    SparseGPT sweep switch that trees from before the sweep parameter read is removed."""
    env = {k: v for k, v in os.environ.items() if k != "PRUNEKIT_SPARSEGPT_SWEEP"}
    env.update(THREADS, PRUNEKIT_DATA_DIR=f"{shared}/data",
               PYTHONPATH=os.pathsep.join([str(prunekit)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    return env


def environment(prunekit: Path, shared: str, env: dict, cwd: str) -> dict:
    probe = ("import json, platform, sys, torch, transformers, prunekit; print(json.dumps({'prunekit_file': "
             "prunekit.__file__, 'torch_threads': torch.get_num_threads(), 'torch': torch.__version__, "
             "'transformers': transformers.__version__, 'python': platform.python_version()}))")
    r = json.loads(subprocess.run([sys.executable, "-c", probe], env=env, cwd=cwd, capture_output=True, text=True,
                                  check=True).stdout)
    if not Path(r["prunekit_file"]).resolve().is_relative_to(prunekit):
        sys.exit(f"subprocesses import prunekit from {r['prunekit_file']}, not from {prunekit}")
    return {"commit": git_commit(prunekit, "prunekit"), "prunekit": str(prunekit), "shared": shared, **host(), **r,
            **THREADS, "date": now()}


def run_pipeline(commands: list[list[str]], env: dict, tmp: Path) -> dict:
    t = time.time()
    for c in commands:
        argv = [sys.executable if a == "python" else a.replace(f"{OUT}/", f"{tmp}/") for a in c]
        p = subprocess.run(argv, env=env, cwd=tmp, capture_output=True, text=True)
        if p.returncode:
            err = [ln for ln in p.stderr.splitlines() if ln.strip()]
            err = (err[-1] if err else f"exit code {p.returncode}")[:300]
            return {"error": err, "seconds": round(time.time() - t, 1)}
    seconds = round(time.time() - t, 1)
    folder = tmp / "out"
    rep = json.loads((folder / "report.json").read_text())
    r = {"masks": sha_masks(folder), "weights": sha_weights(folder), "sparsity": rep["overall_sparsity"],
         "layers": len(rep["layers"]), "seconds": seconds}
    if (tmp / "search" / "recipe.yaml").is_file():
        r["recipe"] = (tmp / "search" / "recipe.yaml").read_text()
    return r


def markdown(data: dict) -> str:
    lines = ["# Mask / weight hashes of fixed pruning pipelines (`python -m bench.mask_hashes`)", ""]
    for suite, e in data["environment"].items():
        lines.append(f"- {suite}: commit {e['commit']}, " + ", ".join(f"{k} {v}" for k, v in e.items()
                                                                  if k != "commit"))
    rows = [[name, f"failed: {r['error']}", "", "", r["seconds"]] if "error" in r else
            [name, f"`{r['masks'][:16]}`", f"`{r['weights'][:16]}`", f"{r['sparsity']:.6f} ({r['layers']} layers)",
             r["seconds"]] for name, r in data["pipelines"].items()]
    return document(lines + [""] + table(["pipeline", "masks sha256", "weights sha256", "sparsity", "seconds"], rows))


def compare(mine: dict, other: dict) -> int:
    bad = 0
    for name in sorted(set(mine) | set(other)):
        a, b = mine.get(name), other.get(name)
        if a is None or b is None:
            verdict = f"only in {'this run' if b is None else 'the other file'}"
        elif "error" in a or "error" in b:
            verdict = "both failed" if "error" in a and "error" in b else "masks differ (failed in one only)"
        else:
            verdict = ("same" if a["weights"] == b["weights"] and a.get("recipe") == b.get("recipe") else
                       "weights differ only") if a["masks"] == b["masks"] else "masks differ"
        bad += verdict.startswith("masks differ")
        print(f"{name:36s} {verdict}")
    return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", choices=["stories", "smollm2"], action="append", help="default: both")
    ap.add_argument("--prunekit", type=Path, default=REPO, help="source tree to measure (default: this repo)")
    ap.add_argument("--shared", default=str(shared_dir()), help="folder holding data/ and models/")
    ap.add_argument("--only", nargs="*", help="run only these pipeline names")
    ap.add_argument("--out", default=str(RESULTS / "mask_hashes"), help="output file stem")
    ap.add_argument("--compare", type=Path, help="another results .json: report same / masks differ per pipeline")
    a = ap.parse_args(argv)
    suites, prunekit, shared = a.suite or ["stories", "smollm2"], a.prunekit.resolve(), str(Path(a.shared).resolve())
    out = Path(a.out).with_suffix(".json")
    data = load_results(out)
    data.setdefault("environment", {})
    data.setdefault("pipelines", {})
    if not a.only:  # a full suite run replaces that suite's entries (renamed or removed pipelines go too)
        data["pipelines"] = {k: v for k, v in data["pipelines"].items() if v["suite"] not in suites}
    env = sub_env(prunekit, shared)
    todo = {k: v for k, v in pipelines(shared).items() if v[0] in suites and (not a.only or k in a.only)}
    with tempfile.TemporaryDirectory(prefix="mask_hashes_") as root:
        e = environment(prunekit, shared, env, root)
        for suite in sorted({s for s, _ in todo.values()}):
            data["environment"][suite] = e
        if "smollm2" in suites:  # first use downloads and converts SmolLM2: not part of any pipeline's time
            subprocess.run([sys.executable, "-m", "prunekit.cli", "models", "--fetch-default"], env=env, cwd=root,
                           check=True, capture_output=True)
        for name, (suite, commands) in todo.items():
            tmp = Path(tempfile.mkdtemp(dir=root))
            r = run_pipeline(commands, env, tmp)
            r = {"suite": suite, **r, "commands": [shlex.join(c).replace(shared, "$SHARED") for c in commands]}
            if "recipe" in r:
                r["recipe"] = r["recipe"].replace(shared, "$SHARED")
            data["pipelines"][name] = r
            print(f"{name:36s} {r.get('masks', '')[:16]:16s} {r.get('weights', '')[:16]:16s} "
                  f"{r.get('sparsity', r.get('error'))} {r['seconds']} s", flush=True)
            save_results(out, data, markdown)
    if a.compare:
        other = load_results(a.compare)["pipelines"]
        return compare({k: v for k, v in data["pipelines"].items() if k in todo}, {k: v for k, v in other.items()
                                                                                   if k in todo})
    return 0


if __name__ == "__main__":
    sys.exit(main())
