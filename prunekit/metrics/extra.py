"""Imports of metric modules beyond magnitude and Wanda (each registers itself)."""
