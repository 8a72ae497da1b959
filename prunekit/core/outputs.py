"""Where prunekit writes, and how, so that a user's files are never lost.

- :func:`check_output` runs before any work: an output path may not be empty, may not be, contain or lie
  inside an input (the model folder or file, calibration and evaluation files), may not contain the current
  folder, may exist only with ``overwrite``, and its location must be writable (checked by creating and
  removing a folder there, which also catches names too long for the file system).
- :func:`atomic_dir` writes a folder into a temporary sibling ``.NAME.tmp-PID-XXXXXX`` and renames it into
  place at the end. Without ``overwrite`` the final rename refuses a target that appeared meanwhile (another
  run): the finished work is kept in ``NAME.conflict-TIME`` and the run fails. With ``overwrite`` the old
  folder is first renamed to ``.NAME.old-PID-XXXXXX`` and deleted after the new one is in place.
- Siblings left by a run that was killed (SIGKILL, power loss) belong to a process that no longer exists:
  :func:`clean_stale` removes them when the same output is written again, and puts an ``.old`` folder back
  when the kill came between the two renames (so the previous output is not lost).
- :func:`atomic_write_bytes` / :func:`atomic_write_json` / :func:`atomic_write_text`: one file, same idea.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path

from . import interrupts
from .errors import PrunekitError

log = logging.getLogger(__name__)

_STEM_BYTES = 200  # the part of an output's name kept in its temporary siblings' names (file names: 255 bytes)
committed: list[Path] = []  # outputs put in place by this process (the CLI's interrupt message names them)


def _stem(name: str) -> str:
    return os.fsencode(name)[:_STEM_BYTES].decode(errors="ignore")


def _sibling(out: Path, kind: str) -> Path:
    return out.parent / f".{_stem(out.name)}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def resolved_path(p) -> Path:
    return Path(os.path.abspath(Path(p).expanduser())).resolve()


def relation(out: Path, inp: Path) -> str | None:
    if out == inp:
        return "is"
    if out in inp.parents:
        return "contains"
    if inp in out.parents:
        return "lies inside"
    return None


def check_output(out, overwrite: bool = False, inputs=(), what: str = "output folder", exists: str = "refuse") -> Path:
    """Validate an output folder before any work (see the module docstring); returns it as a Path.

    ``inputs``: paths (files or folders) the run reads; None entries and paths that do not exist are skipped.
    ``exists="later"``: an existing folder is not refused here (without ``overwrite``, :func:`atomic_dir`'s
    final rename then keeps the new output beside it), for a check made after the work was done."""
    if out is None or not str(out).strip():
        raise PrunekitError(f"{what} is empty: give a folder name")
    p = Path(str(out)).expanduser()
    try:
        name_max = os.pathconf(_existing_ancestor(resolved_path(p.parent) / "x"), "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    if len(os.fsencode(p.name)) > name_max:
        raise PrunekitError(f"{what} name is {len(os.fsencode(p.name))} bytes long; this file system allows {name_max}")
    r = resolved_path(p)
    for inp in inputs:
        if inp is None or not Path(inp).expanduser().exists():
            continue
        rel = relation(r, resolved_path(inp))
        if rel:
            raise PrunekitError(f"{what} {out} {rel} the input {inp}: choose another folder (inputs are never "
                                "overwritten)")
    cwd = resolved_path(Path.cwd())
    if relation(r, cwd) in ("is", "contains"):
        raise PrunekitError(f"{what} {out} is or contains the current folder; choose a new folder for the output")
    if p.is_symlink() or (p.exists() and not p.is_dir()):
        raise PrunekitError(f"{what} {out} exists and is not a folder")
    if p.exists() and not overwrite and exists == "refuse":
        raise PrunekitError(f"{what} {out} exists; pass --overwrite to replace it")
    _probe_writable(r, what, out)
    return p


def _existing_ancestor(r: Path) -> Path:
    a = r.parent
    while not a.exists() and a != a.parent:
        a = a.parent
    return a


def _probe_writable(r: Path, what: str, out) -> None:
    """Create and remove a folder where the output's temporary sibling will go (or in the nearest existing
    ancestor of a parent still to be made)."""
    anc = _existing_ancestor(r)
    if not anc.is_dir():
        raise PrunekitError(f"{what} {out}: {anc} is not a folder")
    probe = _sibling(r, "probe") if anc == r.parent else anc / f".prunekit-probe-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise PrunekitError(f"cannot write {what} {out} ({e.strerror} in {anc})") from None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out) -> list[str]:
    """Remove the temporary siblings of ``out`` left by processes that no longer run; an ``.old`` sibling is
    moved back to ``out`` when ``out`` is missing (a kill between the two renames of an overwrite).
    Returns what was done, one line each (also logged as warnings)."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        return []
    pat = re.compile(rf"^\.{re.escape(_stem(out.name))}\.(tmp|old|probe)-(\d+)-[0-9a-f]{{6}}$")
    done = []
    for entry in sorted(parent.iterdir()):
        m = pat.match(entry.name)
        if not m or _pid_alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not os.path.lexists(out):
            os.rename(entry, out)
            done.append(f"restored {out} from {entry.name}, left by an interrupted overwrite (process "
                        f"{m.group(2)})")
        else:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            done.append(f"removed {entry}, left by an interrupted run (process {m.group(2)})")
    for line in done:
        log.warning(line)
    return done


def _renameat2():
    try:
        f = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    f.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return f


def rename_noreplace(src, dst) -> bool:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (atomically where the kernel supports
    RENAME_NOREPLACE). Returns False, leaving both alone, when ``dst`` exists."""
    f = _renameat2()
    if f is not None:
        at_fdcwd, noreplace = -100, 1
        if f(at_fdcwd, os.fsencode(str(src)), at_fdcwd, os.fsencode(str(dst)), noreplace) == 0:
            return True
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            return False
        if err not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        return False
    os.rename(src, dst)
    return True


def _commit(tmp: Path, out: Path, overwrite: bool) -> None:
    interrupts.check()  # a stop whose exception was swallowed on the way must still stop the run here
    old = None
    with interrupts.deferred():
        if overwrite and os.path.lexists(out):
            old = _sibling(out, "old")
            os.rename(out, old)
            os.rename(tmp, out)
        elif not rename_noreplace(tmp, out):
            keep = out.with_name(f"{_stem(out.name)}.conflict-{time.strftime('%Y%m%d-%H%M%S')}")
            os.rename(tmp, keep)
            raise PrunekitError(f"{out} exists (another run wrote it while this one worked?) and --overwrite was not "
                                f"given: it was left as it is; this run's output is in {keep}")
        committed.append(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(out, overwrite: bool = False, inputs=(), what: str = "output folder"):
    """Yield a temporary folder; on success it is renamed to ``out`` (see the module docstring), on any error
    or interrupt it is removed and ``out`` is untouched. An existing ``out`` without ``overwrite`` is left
    alone and the finished work kept beside it (``NAME.conflict-TIME``), with an error."""
    out = check_output(out, overwrite, inputs, what, exists="later")
    clean_stale(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        _commit(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path, data: bytes) -> None:
    """Write one file atomically: a temporary sibling, fsync, rename over ``path``."""
    path = Path(path)
    tmp = _sibling(path, "tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        interrupts.check()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path, data, **kw) -> None:
    atomic_write_bytes(path, json.dumps(data, **kw).encode())


def check_output_file(path, inputs=(), what: str = "output file") -> Path:
    """Validate an output file path before any work: not empty, not inside or equal to an input, an existing
    parent folder that is writable."""
    if path is None or not str(path).strip():
        raise PrunekitError(f"{what} is empty")
    p = Path(str(path)).expanduser()
    r = resolved_path(p)
    for inp in inputs:
        if inp is not None and Path(inp).expanduser().exists() and relation(r, resolved_path(inp)):
            raise PrunekitError(f"{what} {path} is or lies inside the input {inp}: write it elsewhere")
    if p.is_dir():
        raise PrunekitError(f"{what} {path} is a folder")
    if not r.parent.is_dir():
        raise PrunekitError(f"{what} {path}: folder {p.parent} does not exist")
    _probe_writable(r, what, path)
    return p
