"""Ctrl-C and SIGTERM: one way to stop a run, never ignored.

``install()`` (called first thing by the CLI) turns SIGTERM into the same ``KeyboardInterrupt`` as Ctrl-C and
remembers that a stop was asked for. An interrupt raised where Python cannot propagate it (inside a
``__del__`` or a callback: "Exception ignored in ...") is lost as an exception but not as a request:
:func:`check` raises it again, and the output writers call it before they put anything in place, so an
interrupted run never goes on to replace a folder. :func:`deferred` holds both signals back during the
few renames that swap an output folder into place, so that they are not split by a stop.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys

_STOP = {"signal": None}
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _handler(signum, _frame):
    _STOP["signal"] = signum
    raise KeyboardInterrupt(signal.Signals(signum).name)


def install() -> None:
    """SIGINT and SIGTERM both raise KeyboardInterrupt and are remembered (main thread only); a stop
    remembered from an earlier call in this process is forgotten."""
    reset()
    for s in _SIGNALS:
        signal.signal(s, _handler)


def _exit_now(signum, _frame):
    """During start-up nothing has been written yet: say so and leave at once (exit 130 / 143)."""
    name = signal.Signals(signum).name
    sys.stderr.write(f"prunekit: interrupted ({name}) while starting; no output was written\n")
    sys.stderr.flush()
    os._exit(143 if signum == signal.SIGTERM else 130)


def guard_startup():
    """Until :func:`end_startup`, SIGINT and SIGTERM end the process with one line (the command line's imports
    take seconds; a KeyboardInterrupt raised inside them would print a traceback). Returns the handlers to put
    back."""
    previous = {s: signal.getsignal(s) for s in _SIGNALS}
    for s in _SIGNALS:
        signal.signal(s, _exit_now)
    return previous


def end_startup(previous) -> None:
    for s, h in previous.items():
        signal.signal(s, h)


def requested() -> str | None:
    """The name of the signal that asked for a stop ('SIGINT', 'SIGTERM'), or None."""
    return None if _STOP["signal"] is None else signal.Signals(_STOP["signal"]).name


def check() -> None:
    """Raise KeyboardInterrupt if a stop was asked for, even if its first exception was swallowed."""
    if _STOP["signal"] is not None:
        raise KeyboardInterrupt(requested())


def reset() -> None:
    _STOP["signal"] = None


@contextlib.contextmanager
def deferred():
    """Hold SIGINT and SIGTERM back for the body (they are delivered when it ends)."""
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    except (AttributeError, ValueError, OSError):  # not the main thread, or no pthread_sigmask
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
