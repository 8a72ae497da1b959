"""The environment record stored with every benchmark result: machine, versions, measured commit, date.

The machine and versions are prunekit's own record (:mod:`prunekit.core.env`, what every report stores), with
prunekit's ``platform`` kept under the key ``machine`` that every results file has used. ``git`` is the commit of
the checkout whose prunekit was imported (``PYTHONPATH`` decides: a benchmark can measure another checkout with
this one's scripts), ``+dirty`` when its prunekit/ or bench/ (results excluded: a running benchmark rewrites them)
differ from that commit. ``BENCH_GIT`` overrides it: a copied tree (the GPU machine's) may carry a stale .git.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import prunekit
from prunekit.core.env import machine, versions

from .paths import REPO


def git_commit(tree: Path, *paths: str) -> str:
    """Short HEAD of the checkout at ``tree``, ``+dirty`` when ``paths`` (git pathspecs, default all) have changes
    (untracked files count). Read-only: no index refresh. '' outside a checkout."""
    def git(*args):
        return subprocess.run(["git", "--no-optional-locks", "-C", str(tree), *args], capture_output=True,
                              text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    return head + ("+dirty" if head and git("status", "--porcelain", "--", *paths) else "")


def host() -> dict:
    """The machine part of the record (this process's torch threads, the GPU when there is one)."""
    m = machine()
    return {"machine": m.pop("platform"), **m}


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


def environment() -> dict:
    tree = Path(prunekit.__file__).resolve().parents[1]
    env = {**host(), **versions(), "date": now(),
           "git": os.environ.get("BENCH_GIT") or git_commit(tree, "prunekit", "bench", ":!bench/results")}
    if tree != REPO:
        env["prunekit_path"] = str(tree)
    return env


def per_device(device) -> dict:
    """``{"environment_gpu" | "environment_cpu": environment()}``: the record of a results file that keeps one
    machine per device kind (measurements of both merged into one file)."""
    return {"environment_" + ("gpu" if str(device).startswith("cuda") else "cpu"): environment()}


def per_device_lines(data: dict) -> list[str]:
    """Markdown lines for the :func:`per_device` records of a results file."""
    lines = []
    for key in ("environment_cpu", "environment_gpu"):
        if key in data:
            lines += ["", f"{key}: " + ", ".join(f"{k} {v}" for k, v in data[key].items())]
    return lines


def describe(env: dict, threads: bool = False) -> str:
    """One sentence naming the machine, versions, commit and date of a record."""
    return (f"{env.get('gpu', env['processor'])}, {env['cpu_count']} CPUs"
            + (f", {env['torch_threads']} torch threads" if threads else "")
            + f", torch {env['torch']}, transformers {env['transformers']}, prunekit {env['prunekit']} "
              f"({env.get('git', '?')}), {env['date']}")
