"""bench.quality's TRIM-skip table pairs each run with its own file's twins (same seed, same evaluation set)."""
import json

from bench import quality
from bench.lib.pipelines import describe, key_of


def _file(path, name, seed, ev, runs):
    proto = {"seqlen": 512, "nsamples": 64, "eval_windows": 64, "calib": "c4", "seed": seed, **({"eval": ev} if ev else {})}
    path.write_text(json.dumps({"protocol_name": name, "protocol": proto,
                                "runs": {key_of(c): {"config": c, "ppl": p} for c, p in runs}}))


def test_trim_skip_report_pairs_twins_within_one_protocol_file(tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "RESULTS", tmp_path)
    base = {"metric": "wanda", "sparsity": 0.7, "allocation": "uniform"}
    skip = {**base, "rowwise": "trim", "rowwise_skip": ["*.mlp.up_proj", "o_proj"]}
    every = {**base, "rowwise": "trim", "rowwise_params": {"inputs": "all"}}
    _file(tmp_path / "quality_S.json", "S", 0, None, [(base, 1000.0), ({**base, "rowwise": "trim"}, 1200.0),
                                                      (skip, 900.0), (every, 950.0),
                                                      ({**every, "rowwise_skip": skip["rowwise_skip"]}, 850.0)])
    # another seed's file: its own no-TRIM twin, no full-TRIM twin; a twin in S must not be borrowed
    _file(tmp_path / "quality_S-seed1.json", "S-seed1", 1, None, [(base, 800.0), (skip, 880.0), (every, 840.0)])
    _file(tmp_path / "quality_S-c4.json", "S-c4", 0, "c4", [(skip, 50.0)])
    report = quality.trim_skip_report()
    skip_part, all_part = report.split("## TRIM scored on every calibration token")
    rows = [line.split(" | ") for line in skip_part.splitlines() if line.startswith("| S")]
    by = {(r[0].strip("| "), r[7]): r for r in rows}
    assert by["S", "last"][8:] == ["up_proj+o_proj", "1000.00", "1200.00", "900.00", "-10.0% |"]
    # the inputs=all run with skip: its full-TRIM twin is TRIM on all tokens, not the paper's
    assert by["S", "all"][8:] == ["up_proj+o_proj", "1000.00", "950.00", "850.00", "-15.0% |"]
    assert by["S-seed1", "last"][1:3] == ["wikitext2", "1"]
    assert by["S-seed1", "last"][9:] == ["800.00", "-", "880.00", "+10.0% |"]
    assert by["S-c4", "last"][1] == "c4" and by["S-c4", "last"][9:] == ["-", "-", "50.00", "- |"]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in all_part.splitlines()
            if line.startswith("| S")}
    assert set(rows) == {"S", "S-seed1"}
    assert rows["S"][7:] == ["1000.00", "1200.00", "900.00", "950.00", "-5.0% |"]
    assert rows["S-seed1"][7:] == ["800.00", "-", "880.00", "840.00", "+5.0% |"]


def test_skip_patterns_with_the_same_last_part_get_different_keys():
    a = {"metric": "wanda", "sparsity": 0.7, "rowwise": "trim", "rowwise_skip": ["*.mlp.up_proj"]}
    b = {**a, "rowwise_skip": ["layers.0.mlp.up_proj"]}
    assert key_of(a) != key_of(b) and describe(a) == describe(b)
