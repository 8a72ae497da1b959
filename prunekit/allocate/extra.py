"""Imports of allocator modules beyond uniform (each registers itself)."""
