"""Pruning a model: config, plan, layer pruner, the run, its report and its saved folder.

Importing it registers every method (``prunekit.methods``): the configs and plans here name them."""
from .. import methods  # noqa: F401
