"""Pipeline configurations as the quality and grid benchmarks store them: a run is a dict of prunekit config
fields (metric, sparsity, pattern, allocation, rowwise, ...). Here: its key in a results file, its readable
description, and groupings of stored runs by level."""
from __future__ import annotations

import prunekit.methods  # noqa: F401  (registers the allocators that published_params looks up)
from prunekit.core.allocation import published_params

from .results import RESULTS, load_results


def pinned(run: dict) -> dict:
    """``run`` with the published value of each allocation parameter that prunekit tunes by default (AlphaPruning's
    eps, ...) written out where the run leaves it unset: a stored run without it was measured with the published
    value (before the tuned default), and a suite's run means the same. A run that wants the tuning says ``auto``."""
    if run.get("allocation", "uniform") == "uniform":
        return run
    params = published_params(run["allocation"], run.get("allocation_params") or {})
    return {**run, "allocation_params": params} if params else run


def key_of(run: dict) -> str:
    """The run's key in a results file (every field that changes the result; stable across versions)."""
    run = pinned(run)
    parts = [run["metric"], f"{run['sparsity']:.2f}", run.get("pattern", "unstructured"),
             run.get("allocation", "uniform")]
    for field in ("metric_params", "allocation_params"):  # only when set: keys of runs without them stay as they were
        if run.get(field):
            parts[-1 if field == "allocation_params" else 0] += "".join(f",{k}={v}" for k, v in
                                                                        sorted(run[field].items()))
    if run.get("sequential") is False:
        parts.append("dense-block-stats")
    if run.get("rowwise"):
        parts.append(run["rowwise"] + "".join(f",{k}={v}" for k, v in sorted(run.get("rowwise_params", {}).items()))
                     + "".join(f",skip={p}" for p in run.get("rowwise_skip", [])))  # full patterns: keys stay unique
    if run.get("refine"):
        parts.append("refine-" + run["refine"] + _params(run.get("refine_params")))
    if run.get("reconstruct"):
        parts.append("reconstruct-" + run["reconstruct"] + _params(run.get("reconstruct_params")))
    if run.get("row_rounding"):  # set explicitly (runs without the key used the default of their commit)
        parts.append("rows-" + run["row_rounding"])
    return "/".join(parts)


def _params(p: dict | None) -> str:
    """``,k=v,...`` in key order ('' for none): a method's parameters in a run key."""
    return "".join(f",{k}={v}" for k, v in sorted((p or {}).items()))


def params_words(p: dict | None) -> str:
    """`` (k=v, ...)`` for a description ('' for none)."""
    return f" ({', '.join(f'{k}={v}' for k, v in sorted(p.items()))})" if p else ""


def skip_label(c: dict, sep: str = ",") -> str:
    """``,skip=up_proj+o_proj`` (last name part of each pattern; for reading, not a key) for a run whose row-wise
    method leaves some layers out ('' otherwise)."""
    skip = c.get("rowwise_skip") or []
    return f"{sep}skip=" + "+".join(p.split(".")[-1] for p in skip) if skip else ""


def describe(c: dict) -> str:
    """The pipeline in words (sparsity and pattern left out: tables show them in their own columns)."""
    parts = [c["metric"] + params_words(c.get("metric_params")),
             c.get("allocation", "uniform") + params_words(c.get("allocation_params"))]
    if c.get("rowwise"):
        parts.append(c["rowwise"] + "".join(f" {k}={v}" for k, v in sorted(c.get("rowwise_params", {}).items()))
                     + skip_label(c, " "))
    if c.get("refine"):
        parts.append("refine " + c["refine"] + params_words(c.get("refine_params")))
    if c.get("reconstruct"):
        parts.append("reconstruct " + c["reconstruct"] + params_words(c.get("reconstruct_params")))
    if c.get("sequential") is False:
        parts.append("dense-block stats")
    if c.get("row_rounding"):
        parts.append("rows " + c["row_rounding"])
    return " + ".join(parts)


def rowwise_summary(layers: list[dict]) -> dict | None:
    """TRIM: how often and by how much it beat uniform rows on its own objective (layer output cosine);
    ``layers``: report layer entries or pruner records (those with a 'rowwise' entry count)."""
    rw = [l["rowwise"] for l in layers if l.get("rowwise", {}).get("score") is not None]
    if not rw:
        return None
    gains = [r["score"] - r["score_uniform"] for r in rw]
    return {"layers": len(rw), "improved": sum(g > 0 for g in gains), "mean_cos_gain": sum(gains) / len(gains),
            "min_cos_gain": min(gains), "negative_lr": sum(r["lr"] < 0 for r in rw)}


def by_level(runs: dict) -> dict:
    """(sparsity, pattern) -> [(key, run), ...] of a results file's runs."""
    groups: dict = {}
    for k, r in runs.items():
        groups.setdefault((r["config"]["sparsity"], r["config"].get("pattern", "unstructured")), []).append((k, r))
    return groups


def best_per_sparsity(data: dict) -> dict:
    """(sparsity, pattern) -> (key, run, number of runs compared) of the lowest-perplexity run."""
    return {g: (*min(runs, key=lambda kr: kr[1]["ppl"]), len(runs)) for g, runs in by_level(data["runs"]).items()}


def grid_confirm(top: int = 2, runs: dict | None = None) -> list[dict]:
    """The ``top`` best pipelines per sparsity of the screening grid (``runs``, default: those in grid_G.json),
    to check under protocol S (sequential calibration, 64 windows) that the proxy's ranking holds."""
    if runs is None:
        runs = load_results(RESULTS / "grid_G.json").get("runs", {})
    runs = {k: r for k, r in runs.items() if not r["config"].get("rowwise_params")}
    return [r["config"] for krs in by_level(runs).values() for _, r in sorted(krs, key=lambda kr: kr[1]["ppl"])[:top]]
