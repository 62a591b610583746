"""Gradients of the next-token loss with respect to chosen weights, for the model-scope
stages that score weights or singular values from calibration gradients (``lowrank_alloc``,
``weight_importance``): one backward pass through the whole model per batch, kept near one
block's working set (decoder blocks recomputed in the backward pass, the head's logits a
chunk of tokens at a time, each gradient handed on as soon as it is computed).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..arch import blocks, get_module
from ..errors import UserError
from ..runtime.head import loss_parts, next_token_loss, recomputed_blocks


def weight_grads(model: nn.Module, names: list[str], data: torch.Tensor, windows: int, batch_size: int, consume) -> int:
    """One backward pass per batch of the first ``windows`` calibration windows (the mean
    next-token cross-entropy); ``consume(name, dL/dW)`` receives each named linear's gradient
    as soon as the pass has it, which is then dropped: never every gradient at once. Only
    those weights require gradients during the passes (restored after). Each decoder block's
    activations are recomputed in the backward pass instead of kept (one more forward per
    pass), and the head runs a chunk of tokens at a time where the model's logits are
    ``head(decoder(x))`` (``runtime.head.loss_parts``). A named weight the loss does not reach
    is refused (it would get no gradient, hence no score). Returns the number of batches."""
    params = [(n, get_module(model, n).weight) for n in names]
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    handles, got = [], dict.fromkeys(names, 0)
    for n, w in params:
        w.requires_grad_(True)
        w.grad = None

        def hook(p, n=n):
            g, p.grad = p.grad, None
            got[n] += 1
            consume(n, g)

        handles.append(w.register_post_accumulate_grad_hook(hook))
    dev = next(model.parameters()).device
    batches = 0
    try:
        parts = loss_parts(model, data[:1, :8].to(dev))
        with torch.enable_grad(), recomputed_blocks(blocks(model)):
            for i in range(0, min(windows, data.shape[0]), batch_size):
                next_token_loss(model, parts, data[i : min(i + batch_size, windows)].to(dev)).backward()
                batches += 1
    finally:
        for h in handles:
            h.remove()
        for p in model.parameters():
            p.grad = None
            p.requires_grad_(flags[id(p)])
    missed = [n for n, k in got.items() if k < batches]
    if missed:
        raise UserError(f"the calibration loss does not depend on {missed[:3]} (no gradient): not a layer of the model's forward pass")
    return batches
