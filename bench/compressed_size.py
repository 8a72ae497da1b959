"""Output sizes: a pruned model saved dense (exact zeros) and compressed (kept values + packed masks).

    python -m bench.compressed_size                                  # SmolLM2 and Qwen2.5-Coder-0.5B, bf16, 50 / 70%
    python -m bench.compressed_size --models stories260K --dtype float32

Each model is pruned by magnitude (the sizes do not depend on which weights are kept, only on how many), saved
both ways through prunekit (the save-time reload check runs for both), and measured from the files: the whole
folder, the weight files, and the pruned layers' own bytes. Writes bench/results/compressed_size.json and .md.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import prunekit

from bench.lib.env import describe, environment
from bench.lib.models import display_name, load
from bench.lib.results import RESULTS, merge_results
from bench.lib.tables import document, table

FILE = RESULTS / "compressed_size.json"


def folder_bytes(folder: Path, weights_only: bool = False) -> int:
    files = [f for f in folder.iterdir() if f.is_file()]
    if weights_only:
        files = [f for f in files if f.name.endswith(".safetensors") and f.name != "masks.safetensors"]
    return sum(f.stat().st_size for f in files)


def measure(spec: str, dtype: str, sparsity: float) -> dict:
    row = {"model": spec, "dtype": dtype, "sparsity": sparsity}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("dense", "compressed"):
            model, tok = load(spec, dtype)
            cfg = prunekit.make_config(model=spec, metric="magnitude", sparsity=sparsity, dtype=dtype, save_format=fmt)
            report = prunekit.prune(model, tok, cfg)
            out = Path(tmp) / fmt
            saved = prunekit.save_pruned(model, tok, report, cfg, out)
            row[fmt] = {"folder_bytes": folder_bytes(out), "weight_bytes": folder_bytes(out, weights_only=True)}
            if fmt == "compressed":
                row["pruned_dense_bytes"] = saved["pruned_dense_bytes"]
                row["pruned_compressed_bytes"] = saved["pruned_compressed_bytes"]
            row["prunable_params"], row["total_params"] = report["params"]["prunable"], report["params"]["total"]
    row["pruned_layers_ratio"] = row["pruned_compressed_bytes"] / row["pruned_dense_bytes"]
    row["folder_ratio"] = row["compressed"]["folder_bytes"] / row["dense"]["folder_bytes"]
    return row


def markdown(data: dict) -> str:
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    rows = [[display_name(r["model"]), r["dtype"], f"{r['sparsity']:.2f}", mib(r["pruned_dense_bytes"]),
             mib(r["pruned_compressed_bytes"]), f"{r['pruned_layers_ratio']:.4f}", mib(r["dense"]["folder_bytes"]),
             mib(r["compressed"]["folder_bytes"]), f"{r['folder_ratio']:.4f}"]
            for _, r in sorted(data["rows"].items())]
    return document([
        "# Output sizes: dense vs compressed folders", "",
        "Each model pruned by magnitude (sizes depend only on the sparsity), saved by prunekit in both formats; "
        "bytes read from the written files. Pruned layers: the decoder blocks' linear weights (embeddings, norms and "
        "lm_head are stored as they are in both formats). Compressed = kept values in the model's dtype + the mask, "
        "8 positions a byte.", "", f"Machine: {describe(data['environment'])}.", "",
        *table(["model", "dtype", "sparsity", "pruned layers dense (MiB)", "compressed (MiB)", "ratio",
                "folder dense (MiB)", "folder compressed (MiB)", "folder ratio"], rows)])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=["smollm2", "qwen2.5-coder-0.5b"])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--sparsity", type=float, nargs="*", default=[0.5, 0.7])
    a = ap.parse_args(argv)
    data = merge_results(FILE, {})
    rows = dict(data.get("rows", {}))
    for spec in a.models:
        for s in a.sparsity:
            r = measure(spec, a.dtype, s)
            rows[f"{spec}/{a.dtype}/{s:.2f}"] = r
            print(f"{spec} {a.dtype} {s:.2f}: pruned layers {r['pruned_layers_ratio']:.4f}, folder "
                  f"{r['folder_ratio']:.4f}", flush=True)
            merge_results(FILE, {"environment": environment(), "rows": rows}, markdown)


if __name__ == "__main__":
    main()
