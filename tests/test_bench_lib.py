"""bench.lib: phase timers, resumable result files, tables; the committed results files still load and render."""
import json
import sys
import types
from pathlib import Path

import pytest

from bench import (grid, hessian_precision, mask_hashes, order_noise, quality, removal, search, search_setup, speed,
                   sparsegpt_factor, sparsegpt_memory, sweep_speed, trim_diagnose, zeroshot)
from bench.lib import timing
from bench.lib.pipelines import key_of
from bench.lib.protocols import PROTOCOLS
from bench.lib.results import Runs, load_results, merge_results
from bench.lib.tables import cell, document, table

COMMITTED = Path(__file__).resolve().parents[1] / "bench" / "results"


def test_nested_phases_are_not_counted_twice(monkeypatch):
    """A timed call nested in another counts for its own phase only."""
    clock = [0.0]
    mod = types.ModuleType("fake_phases")

    def factor():  # like factor_hessian, called lazily inside the solve
        clock[0] += 2.0
        return 1

    def solve():
        clock[0] += 1.0
        out = mod.factor() + mod.factor()
        clock[0] += 0.5
        return out

    mod.factor, mod.solve = factor, solve
    monkeypatch.setitem(sys.modules, "fake_phases", mod)
    monkeypatch.setattr(timing.time, "time", lambda: clock[0])
    phases = (("fake_phases", "factor", "factor"), ("fake_phases", "solve", "sweep"))
    acc = {}
    with timing.phase_timer(acc, phases, False, True):
        assert mod.solve() == 2
    assert acc == {"factor": 4.0, "sweep": 1.5}
    assert mod.solve is solve and mod.factor is factor  # unwrapped afterwards


def test_phase_timer_wraps_a_method_named_module_colon_class(monkeypatch):
    clock = [0.0]
    mod = types.ModuleType("fake_cls_phases")

    class Stats:
        def accumulate(self, n):
            clock[0] += n
            return n

    mod.Stats = Stats
    monkeypatch.setitem(sys.modules, "fake_cls_phases", mod)
    monkeypatch.setattr(timing.time, "time", lambda: clock[0])
    acc = {}
    original = Stats.accumulate
    with timing.phase_timer(acc, (("fake_cls_phases:Stats", "accumulate", "sums"),), False, True):
        assert Stats().accumulate(2.0) == 2.0 and Stats().accumulate(0.5) == 0.5
    assert acc == {"sums": 2.5}
    assert Stats.accumulate is original


def test_runs_resume_skip_redo_and_settings(tmp_path):
    path = tmp_path / "r.json"
    md = lambda data: f"{len(data['runs'])} runs\n"  # noqa: E731
    file = Runs(path, {"protocol": {"seed": 0}}, markdown=md)
    assert file.todo("a")
    file.add("a", {"ppl": 1.0})
    assert json.loads(path.read_text()) == {"protocol": {"seed": 0}, "runs": {"a": {"ppl": 1.0}}}
    assert path.with_suffix(".md").read_text() == "1 runs\n"
    again = Runs(path, {"protocol": {"seed": 0}})
    assert not again.todo("a") and again.todo("b")  # resumed: a is done
    assert Runs(path, {"protocol": {"seed": 0}}, redo=True).todo("a")
    other = Runs(path, {"protocol": {"seed": 1}})  # other settings: the stored runs are not mixed in
    assert other.todo("a") and other.data == {"protocol": {"seed": 1}, "runs": {}}
    assert json.loads(path.read_text())["protocol"] == {"seed": 0}  # ... and the file is kept until a save


def test_runs_in_a_section_leave_the_other_sections(tmp_path):
    path = tmp_path / "r.json"
    Runs(path, {"protocol": "S"}, section=("protocols", "S")).add("k1", {"x": 1})
    p = Runs(path, {"protocol": "P"}, section=("protocols", "P"))
    p.add("k2", {"x": 2})
    data = load_results(path)
    assert data["protocols"]["S"]["runs"] == {"k1": {"x": 1}} and data["protocols"]["P"]["runs"] == {"k2": {"x": 2}}
    assert not Runs(path, {"protocol": "S"}, section=("protocols", "S")).todo("k1")


def test_merge_results_replaces_given_keys_only(tmp_path):
    path = tmp_path / "m.json"
    merge_results(path, {"a": 1, "b": 2})
    assert merge_results(path, {"b": 3}) == {"a": 1, "b": 3} == load_results(path)
    assert load_results(tmp_path / "none.json") == {}
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_table_and_cells():
    assert table(["a", "b"], [[1, "x|y"], [cell(None), cell(float("inf"))]]) == [
        "| a | b |", "|---|---|", "| 1 | x/y |", "| - | inf |"]
    assert cell(3.14159, ".2f") == "3.14" and cell(12345.678) == "1.235e+04" and cell("s") == "s"
    assert document(["# t", "", "x", ""]) == "# t\n\nx\n"


# every results file a script renders: (module, file); the committed files must load and render
RENDERED = [(quality, "quality_S.json"), (quality, "quality_P.json"), (grid, "grid_G.json"),
            (search, "search.json"), (removal, "removal.json"), (speed, "speed.json"),
            (sweep_speed, "sweep_speed.json"), (sparsegpt_factor, "sparsegpt_factor.json"),
            (sparsegpt_memory, "sparsegpt_memory.json"), (search_setup, "search_setup.json"),
            (hessian_precision, "hessian_precision.json"), (order_noise, "order_noise.json"),
            (trim_diagnose, "trim_diagnose.json"), (zeroshot, "zeroshot.json"), (mask_hashes, "mask_hashes.json")]


@pytest.mark.parametrize("module,name", RENDERED, ids=[n for _, n in RENDERED])
def test_committed_results_render(module, name):
    render = getattr(module, "report_tables", None) or module.markdown
    md = render(load_results(COMMITTED / name))
    assert md.startswith("# ") and md.endswith("\n") and "|---|" in md


def test_committed_runs_resume_under_the_scripts_default_settings():
    """A default invocation finds its stored runs (same settings), so it skips them instead of starting anew."""
    cases = [(COMMITTED / "quality_S.json", {"protocol_name": "S", "protocol": PROTOCOLS["S"]}, ()),
             (COMMITTED / "quality_S-c4.json", {"protocol_name": "S-c4", "protocol": PROTOCOLS["S-c4"]}, ()),
             (COMMITTED / "grid_G.json", {"protocol": grid.protocol(), "model": "smollm2"}, ()),
             (COMMITTED / "hessian_precision.json", {"protocol": PROTOCOLS["S"]}, ())]
    label, proto = removal.protocol(None, "cpu", "smollm2")
    cases.append((COMMITTED / "removal.json", {"protocol": proto}, ("protocols", label)))
    for path, settings, section in cases:
        file = Runs(path, settings, section=section)
        assert file.runs and not any(file.todo(k) for k in file.runs), path.name


def test_stored_runs_sit_under_their_configs_keys_with_published_allocation_parameters():
    """Every stored quality and grid run is under key_of(its config). Runs measured before prunekit tuned an
    allocator's parameter by default (AlphaPruning's eps) carry the published value in config and key, so a suite's
    run that leaves it unset finds them, and a run with ``auto`` is another run."""
    for f in [*sorted(COMMITTED.glob("quality_*.json")), COMMITTED / "grid_G.json"]:
        for k, r in load_results(f)["runs"].items():
            assert key_of(r["config"]) == k, (f.name, k)
    run = {"metric": "wanda", "sparsity": 0.7, "allocation": "alphapruning"}
    assert key_of(run) == "wanda/0.70/unstructured/alphapruning,eps=0.3"
    assert key_of({**run, "allocation_params": {"eps": "auto"}}) == "wanda/0.70/unstructured/alphapruning,eps=auto"
    assert key_of({"metric": "wanda", "sparsity": 0.5}) == "wanda/0.50/unstructured/uniform"
    assert "wanda/0.70/unstructured/alphapruning,eps=0.3" in load_results(COMMITTED / "quality_S.json")["runs"]


def test_mask_hash_commands_pin_the_published_allocation_parameters():
    """The stored mask hashes were taken with AlphaPruning's published eps: the commands still ask for it."""
    assert mask_hashes.published(["--allocation", "alphapruning"]) == [
        "--allocation", "alphapruning", "--allocation-param", "eps=0.3"]
    given = ["--allocation", "alphapruning", "--allocation-param", "eps=auto"]
    assert mask_hashes.published(given) == given
    assert mask_hashes.published(["--metric", "wanda"]) == ["--metric", "wanda"]
