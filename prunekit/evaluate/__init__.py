"""Evaluation: token perplexity (paper convention) and the zero-shot task suite."""
from .perplexity import perplexity  # noqa: F401
