"""Perplexity over token windows: exp(mean negative log-likelihood of every predicted token)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import progress as progress_mod


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = False, desc: str = "ppl") -> float:
    """Perplexity of ``model`` on ``windows`` [n, L]; each window predicts its tokens 2..L."""
    device = next(model.parameters()).device
    nll = 0.0
    count = 0
    for batch in progress_mod.track(windows.split(batch_size), desc, "batch", on=progress):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        target = batch[:, 1:]
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").item()
        count += target.numel()
    return math.exp(nll / count)
