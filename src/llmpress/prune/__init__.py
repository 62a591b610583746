"""Pruning: mask selection helpers and pruning solvers (SparseGPT)."""

from .masks import describe_pattern, is_nm, magnitude_prune, nm_prune_mask, row_prune_mask, sparsity_of, topk_prune_mask

__all__ = [
    "describe_pattern",
    "is_nm",
    "magnitude_prune",
    "nm_prune_mask",
    "row_prune_mask",
    "sparsity_of",
    "topk_prune_mask",
]
