"""Shared pieces of the benchmarks: protocols, environment record, result files."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

PROTOCOLS = {
    # CPU: seqlen 512, 64 C4 calibration windows, the first 64 WikiText-2 windows
    "S": {"seqlen": 512, "nsamples": 64, "eval_windows": 64, "calib": "c4", "seed": 0},
    # GPU: the papers' protocol, full WikiText-2 test split
    "P": {"seqlen": 2048, "nsamples": 128, "eval_windows": None, "calib": "c4", "seed": 0},
    # S, evaluated on C4 instead: 64 windows of the first 1,100 C4 validation documents (calibration draws from
    # the documents after them), a held-out check on a second text source
    "S-c4": {"seqlen": 512, "nsamples": 64, "eval_windows": 64, "calib": "c4", "seed": 0, "eval": "c4"},
}


def environment() -> dict:
    import transformers

    import prunekit

    env = {"machine": platform.platform(), "processor": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "torch": torch.__version__, "transformers": transformers.__version__,
           "prunekit": prunekit.__version__, "python": platform.python_version(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    try:
        import subprocess

        here = Path(__file__).parent
        env["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=here).stdout.strip()
        # code changed since that commit (results files excluded: a running bench rewrites them)
        if subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "../prunekit", ".", ":!results"],
                          cwd=here).returncode == 1:
            env["git"] += "+dirty"
    except Exception:
        pass
    if os.environ.get("BENCH_GIT"):  # the commit a copied tree was made from (the GPU machine's copy may carry
        env["git"] = os.environ["BENCH_GIT"]  # a stale .git: it read the session's first commit +dirty)
    return env


def load_results(path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return {}


def save_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def timed(fn, cuda: bool, reps: int = 3):
    """(result, seconds per call) of fn: one warm-up call, then the mean of ``reps`` calls (GPU synchronised)."""
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    t = time.time()
    for _ in range(reps):
        out = fn()
    if cuda:
        torch.cuda.synchronize()
    return out, (time.time() - t) / reps


def environment_lines(data: dict) -> list[str]:
    """Markdown lines for the ``environment_cpu`` / ``environment_gpu`` records of a results file."""
    lines = []
    for key in ("environment_cpu", "environment_gpu"):
        if key in data:
            lines += ["", f"{key}: " + ", ".join(f"{k} {v}" for k, v in data[key].items())]
    return lines


def correlated_hessian(d: int, g: torch.Generator, device) -> torch.Tensor:
    """H = (2/n) X^T X for n = 2d correlated random inputs (X = Z A, Z and A Gaussian): a dense,
    well-conditioned-enough (d, d) Hessian for SparseGPT's benchmarks."""
    x = torch.randn(2 * d, d, generator=g, device=device) @ (torch.randn(d, d, generator=g, device=device) / d ** 0.5)
    return x.t() @ x * (2.0 / x.shape[0])
