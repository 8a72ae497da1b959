"""Imports of allocator modules beyond uniform (each registers itself)."""
from . import methods  # noqa: F401,E402  (er, er-plus, owl, alphapruning, farms)
