"""Evaluation: perplexity, size, memory."""

from .perplexity import perplexity
from .size import model_size

__all__ = ["perplexity", "model_size"]
