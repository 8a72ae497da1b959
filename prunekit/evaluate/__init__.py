"""Evaluation: perplexity (paper convention) and, later, zero-shot tasks and speed."""
from .perplexity import perplexity  # noqa: F401
