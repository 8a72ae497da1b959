"""prunekit: post-training pruning of causal LMs, every method a composable part.

    import prunekit
    model, tok = prunekit.load_model("smollm2")
    report = prunekit.prune(model, tok, {"metric": "wanda", "sparsity": 0.5, "nsamples": 32, "seqlen": 256})
"""
import logging as _logging

__version__ = "0.1.0"

from .config import PruneConfig, load_recipe, make_config  # noqa: E402,F401
from .errors import PrunekitError  # noqa: E402,F401
from .evaluate import perplexity  # noqa: E402,F401
from .models.loading import list_cached_models, load_model  # noqa: E402,F401
from .pipeline import run, save_pruned  # noqa: E402,F401
from .prune import prune  # noqa: E402,F401

_logging.getLogger(__name__).addHandler(_logging.NullHandler())
