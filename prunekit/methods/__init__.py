"""Every method, one file each. Importing this package registers them all: add a method by adding its file
and one name to this list (see ARCHITECTURE.md)."""
from . import (  # noqa: F401
    ace,
    alphapruning,
    dsa,
    er,
    experts,
    farms,
    global_threshold,
    magnitude,
    mrp,
    owl,
    prototype,
    removal,
    ria,
    sparsegpt,
    stade,
    trim,
    uniform,
    wanda,
)
