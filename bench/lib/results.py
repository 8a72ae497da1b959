"""bench/results/*.json: load, save atomically (with the markdown made from them), merge by key, resume.

Every file is a JSON object. Files that collect measurements by key (speed.json, sweep_speed.json, ...) are
updated with :func:`merge_results`. Files of keyed runs under one protocol (quality_S.json, grid_G.json, one
section of removal.json) go through :class:`Runs`: a run already present is skipped unless ``redo``, each
finished run is saved at once (an interrupted benchmark keeps what it finished and continues when restarted),
and runs stored under other settings are dropped rather than mixed with new ones.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable

from prunekit.core.outputs import atomic_write_json, atomic_write_text

from .paths import RESULTS

Markdown = Callable[[dict], str]

__all__ = ["RESULTS", "load_results", "save_results", "save_markdown", "merge_results", "same_settings", "Runs"]


def load_results(path: Path) -> dict:
    """The file's object, or {} when there is none yet."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else {}


def save_results(path: Path, data: dict, markdown: Markdown | None = None) -> None:
    """Write ``data`` atomically, and ``markdown(data)`` to the .md file of the same name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data, indent=2)
    if markdown is not None:
        save_markdown(path.with_suffix(".md"), markdown(data))


def save_markdown(path: Path, text: str) -> None:
    """A report made from one or more results files, written atomically."""
    atomic_write_text(path, text)


def merge_results(path: Path, rows: dict, markdown: Markdown | None = None) -> dict:
    """Add (or replace) the top-level ``rows`` of the file, save it; returns the merged object."""
    data = load_results(path)
    data.update(rows)
    save_results(path, data, markdown)
    return data


def same_settings(stored: dict, settings: dict, empty: dict | None = None) -> dict:
    """``stored`` when each key of ``settings`` has the same value there, else a new object of ``settings`` and
    ``empty`` (default ``{"runs": {}}``): results of other settings are never mixed with new ones."""
    if stored and all(stored.get(k) == v for k, v in settings.items()):
        return stored
    if stored:
        print("stored results are for other settings: starting anew", flush=True)
    return {**settings, **copy.deepcopy({"runs": {}} if empty is None else empty)}


class Runs:
    """The keyed runs of one results file, or of one section of it (``section``: the keys leading to it), made
    under ``settings``. :meth:`todo` says whether a key must run, :meth:`add` stores a finished run and saves."""

    def __init__(self, path: Path, settings: dict, redo: bool = False, markdown: Markdown | None = None,
                 section: tuple[str, ...] = ()):
        self.path, self.redo, self.markdown = Path(path), redo, markdown
        self.data = load_results(self.path)
        parent = self.data
        for k in section[:-1]:
            parent = parent.setdefault(k, {})
        if section:
            parent[section[-1]] = same_settings(parent.get(section[-1], {}), settings)
            self.section = parent[section[-1]]
        else:
            self.data = self.section = same_settings(self.data, settings)

    @property
    def runs(self) -> dict:
        return self.section["runs"]

    def todo(self, key: str) -> bool:
        return self.redo or key not in self.runs

    def add(self, key: str, record: dict) -> None:
        self.runs[key] = record
        self.save()

    def save(self) -> None:
        save_results(self.path, self.data, self.markdown)
