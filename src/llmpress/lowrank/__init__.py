"""Low-rank factorization: SVD, ASVD, SVD-LLM (docs/lowrank.md)."""
