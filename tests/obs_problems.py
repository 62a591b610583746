"""Small layer-wise problems for the second-order solvers' tests (GPTQ, SparseGPT, OBS)."""

from __future__ import annotations

import torch


def correlated_problem(rows: int = 16, cols: int = 32, n: int = 512, seed: int = 0, spread: float = 3.0):
    """(W [rows, cols], X [n, cols], H = 2/n X^T X): inputs mixed by a random matrix (so
    columns correlate) and scaled per channel from 1/spread to spread (outlier-ish channels)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    scale = torch.logspace(-1, 1, cols).pow(torch.log10(torch.tensor(spread)))[torch.randperm(cols, generator=g)]
    X = (torch.randn(n, cols, generator=g) @ mix) * scale
    W = torch.randn(rows, cols, generator=g)
    H = 2.0 / n * X.T @ X
    return W, X, H


def damped(H: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    return H + damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)


def output_error(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> float:
    """||W X - W_hat X||^2 (X as rows of tokens)."""
    return float(((X.double() @ (W - W_hat).double().T) ** 2).sum())
