"""A search's checkpoint: files in the search folder, written atomically after every evaluation, and tied to one
search by a fingerprint (method, seed, target, model, data digests, parameters).

Every search method keeps its state through these functions: a resumed run reloads the state only when the
fingerprint matches, and a mismatch is one error that says what to do.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..core.errors import PrunekitError
from ..core.outputs import atomic_write_bytes, atomic_write_json


def normalized(fingerprint: dict) -> dict:
    """The fingerprint as it reads back from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(fingerprint))


def check_fingerprint(stored, current: dict, path) -> None:
    if stored != normalized(current):
        raise PrunekitError(f"{path} belongs to a different search (method, seed, target, model, data or parameters "
                            "differ); resume with the same settings, start over with --no-resume (resume=False), "
                            "or use another output folder")


def load_json(path) -> dict | None:
    """A checkpoint file's content, or None when there is none."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PrunekitError(f"cannot read search checkpoint {path}: {e}") from None


def save_json(path, data) -> None:
    atomic_write_json(path, data)


def save_bytes(path, data: bytes) -> None:
    atomic_write_bytes(path, data)


def start(paths, resume: bool) -> None:
    """Before a search: without ``resume``, forget any earlier state in ``paths``; make their folder."""
    for p in paths:
        p = Path(p)
        p.parent.mkdir(parents=True, exist_ok=True)
        if not resume and p.exists():
            p.unlink()
