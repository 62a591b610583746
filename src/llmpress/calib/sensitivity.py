"""What the loss is sensitive to, from one forward and backward pass of the dense model per
batch of calibration windows: the mean squared loss gradient at named modules' outputs, per
output channel (the diagonal empirical Fisher) and optionally per token (``plan-bits``'
weightings, llmpress/bitplan.py)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .. import progress
from ..arch import get_arch, get_module
from ..runtime.head import loss_parts, next_token_loss, recomputed_blocks

__all__ = ["collect_fisher", "collect_sensitivity"]


def collect_fisher(model: nn.Module, names: list[str], windows: torch.Tensor, batch_size: int = 2) -> dict[str, torch.Tensor]:
    """Per named module, ``f_j = E_t[(dL/dy_tj)^2]`` (:func:`collect_sensitivity`)."""
    return collect_sensitivity(model, names, windows, batch_size)[0]


def collect_sensitivity(
    model: nn.Module, names: list[str], windows: torch.Tensor, batch_size: int = 2, per_token: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per named linear (or decoder block: its hidden-state output), the mean over tokens of the squared gradient of the model's
    next-token loss with respect to each output channel, ``f_j = E_t[(dL/dy_tj)^2]`` (the
    diagonal empirical Fisher of the layer's outputs), from a forward and backward pass of
    the dense model per batch of ``windows``. The weights are not given gradients: the
    graph starts at the input embeddings. With ``per_token`` the second dict holds, per name,
    each token's ``sum_j (dL/dy_tj)^2`` over its mean over the tokens (float32, the shape of
    ``windows``; 0 where no loss reaches: the last position); empty otherwise."""
    sums = {n: None for n in names}
    tokens: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    count = [0]

    def out_hook(name):
        def hook(_m, _inp, out):
            def grad_hook(g, _n=name):
                g2 = g.detach().float().pow(2)
                sq = g2.reshape(-1, g.shape[-1]).sum(0)
                sums[_n] = sq if sums[_n] is None else sums[_n] + sq
                if per_token:
                    tokens[_n].append(g2.sum(-1).cpu())

            y = out[0] if isinstance(out, tuple) else out  # a decoder block: its hidden states
            if y.requires_grad:
                y.register_hook(grad_hook)

        return hook

    dev = next(model.parameters()).device
    parts = loss_parts(model, windows[:1, :8].to(dev))
    handles = [get_module(model, n).register_forward_hook(out_hook(n)) for n in names]
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        with torch.enable_grad(), recomputed_blocks(get_module(model, get_arch(model).blocks)):
            for i in progress.track(range(0, windows.shape[0], batch_size), "plan-bits: output gradients", "batch"):
                ids = windows[i : i + batch_size].to(dev)
                emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                next_token_loss(model, parts, ids, emb).backward()
                count[0] += ids.numel()
    finally:
        for h in handles:
            h.remove()
        for p, req in frozen:
            p.requires_grad_(req)
    fisher = {n: (v / max(count[0], 1)).double() for n, v in sums.items() if v is not None}
    per = {n: torch.cat(t) for n, t in tokens.items() if t}
    return fisher, {n: t / t.mean().clamp_min(torch.finfo(torch.float32).tiny) for n, t in per.items()}
