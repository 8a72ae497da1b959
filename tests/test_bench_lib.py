"""bench.lib.timing's phase timers are exclusive: a timed call nested in another counts for its own phase only."""
import sys
import types

from bench.lib import timing


def test_nested_phases_are_not_counted_twice(monkeypatch):
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

