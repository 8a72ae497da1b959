"""``prunekit analyze`` (prunekit.analyze): the report's files are written, every layer gets a fitted alpha, and
every allocation it compares has the requested mean sparsity."""
import json

import pytest

from prunekit.cli import main

from conftest import STORIES_HF, TINY_TEXT


def test_analyze_cli_writes_report(tmp_path):
    out = tmp_path / "an"
    assert main(["analyze", "--model", str(STORIES_HF), "--calib", str(TINY_TEXT), "--nsamples", "4",
                 "--seqlen", "64", "--target", "0.6", "--out", str(out)]) == 0
    for f in ("analysis.json", "analysis.md", "layers.csv", "alpha_per_block.png", "esd_fits.png", "allocations.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    r = json.loads((out / "analysis.json").read_text())
    assert len(r["layers"]) == 35 and all(x["alpha"] > 1 for x in r["layers"])
    block_numel = {}
    for x in r["layers"]:
        block_numel[x["block"]] = block_numel.get(x["block"], 0) + x["out"] * x["in"]
    total = sum(block_numel.values())
    for name, per_block in r["allocations"].items():
        mean = sum(s * block_numel[b] for b, s in enumerate(per_block)) / total
        assert mean == pytest.approx(0.6, abs=1e-6), name
