"""Uniform allocation: every layer at the target."""
from __future__ import annotations

from ..core.allocation import ModelSummary, register_allocator


@register_allocator("uniform", description="every layer at the target")
def uniform(summary: ModelSummary, target: float, **_) -> dict[str, float]:
    return {l.name: target for l in summary.layers}
