"""prunekit: post-training pruning of causal LMs, every method a composable part.

    import prunekit
    model, tok = prunekit.load_model("smollm2")
    report = prunekit.prune(model, tok, {"metric": "wanda", "sparsity": 0.5, "nsamples": 32, "seqlen": 256})

The names below load on first use, so that ``import prunekit.cli`` (and a Ctrl-C while it starts) does not
wait for torch and transformers.
"""
import importlib as _importlib
import logging as _logging

from .version import __version__  # noqa: F401

_API = {
    "PruneConfig": "pruning.config", "load_recipe": "pruning.config", "make_config": "pruning.config",
    "PrunekitError": "core.errors",
    "perplexity": "evaluate",
    "list_cached_models": "core.loading", "load_model": "core.loading",
    "run": "pruning.pipeline", "save_pruned": "pruning.pipeline",
    "prune": "pruning.run",
    "load_pretrained": "pruning.compressed",
}
__all__ = ["__version__", *_API]


def __getattr__(name):
    if name in _API:
        value = getattr(_importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'prunekit' has no attribute {name!r}")


_logging.getLogger(__name__).addHandler(_logging.NullHandler())
