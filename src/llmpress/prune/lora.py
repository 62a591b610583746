"""Low-rank adapters (LoRA, Hu et al. 2021) for recovery training: each linear of the decoder
blocks computes

    y = W x + (alpha / r) * B (A x),    A: [r, in] (random, std 1/sqrt(in)),  B: [out, r] (zeros)

so training starts from the model as it is, and only A and B (r * (in + out) numbers per
linear, instead of in * out) get gradients and AdamW moments. :meth:`LoRA.merge` folds the
product into the weights, ``W += (alpha / r) * B A``, and removes the adapters: the model keeps
its shapes and nothing of LoRA is left to save or serve. :meth:`LoRA.remove` drops them
unmerged (a run that did not help).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..arch import get_arch
from ..errors import RecipeError

__all__ = ["LoRA"]


class LoRA:
    """Adapters of rank ``rank`` on every ``nn.Linear`` inside the decoder blocks of ``model``
    (forward hooks; the model's own parameters are untouched until :meth:`merge`)."""

    def __init__(self, model: nn.Module, *, rank: int, alpha: float, seed: int = 0):
        if rank < 1 or not alpha > 0:
            raise RecipeError(f"LoRA: rank={rank!r} must be >= 1 and alpha={alpha!r} positive")
        self.scale = alpha / rank
        prefix = get_arch(model).blocks + "."
        gen = torch.Generator().manual_seed(seed)
        self.adapters: dict[str, tuple[nn.Linear, nn.Parameter, nn.Parameter]] = {}
        self._hooks = []
        for name, m in model.named_modules():
            if not (isinstance(m, nn.Linear) and name.startswith(prefix)):
                continue
            dev = m.weight.device
            a = torch.randn(rank, m.in_features, generator=gen) / math.sqrt(m.in_features)
            self.adapters[name] = (
                m,
                nn.Parameter(a.to(dev)),
                nn.Parameter(torch.zeros(m.out_features, rank, device=dev)),
            )
            self._hooks.append(m.register_forward_hook(self._hook(name)))
        if not self.adapters:
            raise RecipeError("LoRA: the model has no linear layer inside its decoder blocks")

    def _hook(self, name: str):
        def add(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            _, a, b = self.adapters[name]
            x = args[0]
            return out + ((x.to(a.dtype) @ a.T) @ b.T * self.scale).to(out.dtype)

        return add

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, a, b in self.adapters.values() for p in (a, b)]

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def remove(self) -> None:
        """Drop the adapters without changing the weights."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every adapter into its weight (``W += scale * B A``) and drop the adapters."""
        for m, a, b in self.adapters.values():
            m.weight.add_((b @ a * self.scale).to(m.weight.dtype))
        self.remove()
