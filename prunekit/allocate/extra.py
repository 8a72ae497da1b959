"""Imports of allocator modules beyond uniform (each registers itself)."""
from . import engine_based, methods  # noqa: F401  (global, mrp; er, er-plus, owl, alphapruning, farms)
from ..search import program as _dsa  # noqa: F401,E402  (dsa)
