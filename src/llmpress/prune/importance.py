"""Importance of whole structures from calibration windows (dense model, one pass each).

- Block Influence (ShortGPT, Men et al. 2024): for block i with input hidden states X_i and
  output X_{i+1}, ``BI_i = 1 - E_t[ X_i,t . X_{i+1},t / (||X_i,t|| ||X_{i+1},t||) ]`` over all
  calibration tokens t. A block that leaves the residual stream as it is has BI = 0.
- Drop-one perplexity: the perplexity of the calibration windows with block i skipped
  (its output replaced by its input), for each i.
- Input statistics of linears: the per-channel sum of squares (Wanda's ||X_j||^2) or the
  full Gram matrix X^T X, gathered with forward hooks.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..arch import ArchSpec, get_module
from ..progress import track

__all__ = ["block_influence", "drop_one_perplexity", "input_stats", "skipped"]


def _hidden_in(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden_out(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def _forward_all(model: nn.Module, data: torch.Tensor, windows: int, batch_size: int, desc: str | None = None) -> float:
    """Run the first ``windows`` windows through the model; returns the mean next-token NLL."""
    dev = next(model.parameters()).device
    n = min(windows, data.shape[0])
    nll, count = 0.0, 0
    starts = range(0, n, batch_size)
    for i in track(starts, desc, "batch") if desc else starts:
        ids = data[i : min(i + batch_size, n)].to(dev)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        nll += float(loss)
        count += ids[:, 1:].numel()
    return nll / max(count, 1)


@torch.no_grad()
def block_influence(model: nn.Module, spec: ArchSpec, data: torch.Tensor, *, windows: int = 32, batch_size: int = 4) -> list[float]:
    """BI of every decoder block (see the module doc), in block order."""
    layers = get_module(model, spec.blocks)
    sums = [0.0] * len(layers)
    counts = [0] * len(layers)
    handles = []
    for i, block in enumerate(layers):

        def hook(_mod, args, kwargs, output, i=i):
            x, y = _hidden_in(args, kwargs).float(), _hidden_out(output).float()
            cos = F.cosine_similarity(x, y, dim=-1)
            sums[i] += float(cos.double().sum())
            counts[i] += cos.numel()

        handles.append(block.register_forward_hook(hook, with_kwargs=True))
    try:
        _forward_all(model, data, windows, batch_size, "block influence")
    finally:
        for h in handles:
            h.remove()
    return [1.0 - s / max(c, 1) for s, c in zip(sums, counts)]


@contextmanager
def skipped(block: nn.Module):
    """While active, ``block`` returns its input unchanged (as if it were removed)."""

    def hook(_mod, args, kwargs, output):
        x = _hidden_in(args, kwargs)
        return (x, *output[1:]) if isinstance(output, (tuple, list)) else x

    h = block.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        h.remove()


@torch.no_grad()
def drop_one_perplexity(model: nn.Module, spec: ArchSpec, data: torch.Tensor, *, windows: int = 32, batch_size: int = 4) -> tuple[float, list[float]]:
    """(perplexity of the full model, [perplexity with block i skipped, for each i]) on the
    calibration windows."""
    layers = get_module(model, spec.blocks)
    base = math.exp(_forward_all(model, data, windows, batch_size))
    out = []
    for block in track(list(layers), "drop-one perplexity", "block"):
        with skipped(block):
            out.append(math.exp(_forward_all(model, data, windows, batch_size)))
    return base, out


@torch.no_grad()
def input_stats(
    model: nn.Module, data: torch.Tensor, *, sumsq: list[str] = (), gram: list[str] = (), windows: int = 32, batch_size: int = 4
) -> dict[str, torch.Tensor]:
    """Per named linear, over the calibration tokens of its input X [tokens, in]: ``sumsq``
    names get sum_t x_tj^2 [in] (float32), ``gram`` names X^T X [in, in] (float64)."""
    acc: dict[str, torch.Tensor] = {}
    handles = []
    for names, full in ((sumsq, False), (gram, True)):
        for n in names:

            def hook(_mod, inp, _out, n=n, full=full):
                x = inp[0].detach().reshape(-1, inp[0].shape[-1])
                v = x.double().T @ x.double() if full else (x.float() * x.float()).sum(0)
                acc[n] = v if n not in acc else acc[n] + v

            handles.append(get_module(model, n).register_forward_hook(hook))
    try:
        _forward_all(model, data, windows, batch_size, "structure importance")
    finally:
        for h in handles:
            h.remove()
    return {n: v.cpu() for n, v in acc.items()}
