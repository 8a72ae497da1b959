"""Timing and peak memory of what a benchmark measures."""
from __future__ import annotations

import contextlib
import importlib
import resource
import threading
import time

import torch

from prunekit.core.offload import rss_bytes


def sync(device) -> None:
    """Wait for the GPU's queued work (nothing on the CPU), so that a wall-clock reading covers it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, cuda: bool, reps: int = 3):
    """(result, seconds per call) of fn: one warm-up call, then the mean of ``reps`` calls (GPU synchronised)."""
    device = "cuda" if cuda else "cpu"
    out = fn()
    sync(device)
    t = time.time()
    for _ in range(reps):
        out = fn()
    sync(device)
    return out, (time.time() - t) / reps


def cuda_median_ms(fn, reps: int = 50, warmup: int = 5) -> float:
    """Median milliseconds of ``fn`` on the GPU, from CUDA events around each call (after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def cuda_graph_median_ms(fn, reps: int = 50, calls: int = 10) -> float:
    """Median milliseconds per call of ``fn`` captured ``calls`` times in one CUDA graph and replayed: the GPU's
    time without the host's per-call work (what eager timing adds)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return cuda_median_ms(g.replay, reps=reps) / calls


def _proc_status_gib(field: str) -> float | None:
    """A memory field of /proc/self/status in GiB (Linux), None where unreadable."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def rss_gib() -> float:
    """The process's resident memory now (the peak where /proc is unreadable)."""
    now = rss_bytes()
    return peak_rss_gib() if now is None else now / 2**30


def peak_rss_gib() -> float:
    """The process's resident-memory high-water mark (it never goes down: one measurement per process). Linux's
    VmHWM, which starts afresh when the process execs; ``ru_maxrss`` elsewhere, which also keeps what the process
    held before its exec (a benchmark worker forked from a large parent would report the parent's size)."""
    hwm = _proc_status_gib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_peak_rss() -> bool:
    """Start the high-water mark afresh from the current resident size (Linux: ``clear_refs`` 5 resets VmHWM);
    False where that is not possible (the mark then keeps what came before)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakRSS:
    """The highest resident memory seen while the block runs, sampled every ``interval`` seconds by a thread
    (``ru_maxrss`` never goes down, so it cannot give the peak of one of many prunes in one process). A spike
    shorter than the interval can be missed; ``start`` is the memory when the block began, so ``peak - start``
    is what the block added at its peak."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.start, self.peak = interval, 0.0, 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_gib())

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = rss_gib()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_gib())


@contextlib.contextmanager
def phase_timer(acc: dict, phases, cuda: bool, on: bool = True):
    """Add to ``acc[label]`` the seconds spent in each of ``phases`` ((module, function, label) triples) by
    wrapping those functions for the duration, with a GPU sync before and after each call (so a timed run is a
    little slower than a plain one). ``"module:Class"`` as the module wraps a method of that class. A function is
    wrapped where its caller looks it up: in the caller's module when the caller imported it by name. Each phase's
    time is exclusive: a wrapped call made inside another (the SparseGPT factor computed lazily inside the solve)
    counts for its own phase only."""
    if not on:
        yield
        return
    saved, inner = [], []  # inner: per open wrapped call, the time spent in wrapped calls nested in it
    for mod_name, fn_name, label in phases:
        mod_name, _, cls = mod_name.partition(":")  # "module:Class": a method of that class
        mod = importlib.import_module(mod_name)
        if cls:
            mod = getattr(mod, cls)
        fn = getattr(mod, fn_name)

        def wrapped(*args, _fn=fn, _label=label, **kw):
            if cuda:
                torch.cuda.synchronize()
            inner.append(0.0)
            t = time.time()
            try:
                out = _fn(*args, **kw)
                if cuda:
                    torch.cuda.synchronize()
            finally:
                dt = time.time() - t
                nested = inner.pop()
                acc[_label] = acc.get(_label, 0.0) + dt - nested
                if inner:
                    inner[-1] += dt
            return out
        saved.append((mod, fn_name, fn))
        setattr(mod, fn_name, wrapped)
    try:
        yield
    finally:
        for mod, fn_name, fn in saved:
            setattr(mod, fn_name, fn)
