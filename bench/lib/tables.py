"""Markdown tables and their cells, one writer for every benchmark report."""
from __future__ import annotations

import math
from typing import Iterable


def table(header: Iterable[str], rows: Iterable[Iterable]) -> list[str]:
    """The lines of a markdown table: header, separator, one line per row (cells as ``str``; a '|' inside a
    cell is written '/' so that it cannot split the cell)."""
    header = list(header)

    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header)] + [line(r) for r in rows]


def cell(v, spec: str = ".4g") -> str:
    """A number for a table: '-' for None (not run / not measured), 'inf' / 'nan' for non-finite floats."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return str(v) if not math.isfinite(v) else format(v, spec)
    return str(v)


def document(lines: Iterable[str]) -> str:
    """The text of a markdown file made of ``lines`` (ending with one newline)."""
    return "\n".join(lines).rstrip("\n") + "\n"
