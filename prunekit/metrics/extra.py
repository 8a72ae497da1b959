"""Imports of metric modules beyond magnitude and Wanda (each registers itself)."""
from . import ace, ria, sparsegpt, stade  # noqa: F401
