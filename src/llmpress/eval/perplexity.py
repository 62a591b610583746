"""Perplexity over token windows: exp(mean negative log-likelihood of every predicted token).

The output head is applied in chunks of tokens: a batch's full logits [batch, seq, vocab]
in float32 (plus the copies ``log_softmax`` makes) are the largest tensors of an
evaluation (4 x 511 x 49152 x 4 bytes = 402 MB per copy on SmolLM2-135M), while a chunk
of ``LOGITS_BUDGET`` elements keeps them to tens of MB (at least ``hidden / 8`` tokens a chunk,
:func:`llmpress.runtime.head.chunk_tokens`: under an eighth of the head weight's bytes). The decoder runs once per
batch as before; only the head and the loss are chunked, so the result equals the plain
computation up to float summation order. Models whose head is not a per-token map, or
whose forward does more than ``head(decoder(x))`` in a way this module does not know (checked
on the first 8 tokens against the model's own logits), are evaluated the plain way.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import progress as progress_mod
from ..calib.dist import Group
from ..runtime.head import LOGITS_BUDGET, agrees, chunk_tokens, head_logits, split_head
from .memory import trim_malloc

__all__ = ["LOGITS_BUDGET", "hidden_nll", "perplexity", "split_head"]


@torch.no_grad()
def perplexity(
    model,
    windows: torch.Tensor,
    batch_size: int = 4,
    progress: bool = False,
    desc: str = "ppl",
    chunked: bool = True,
    group: Group | None = None,
    kl=None,
) -> float:
    """Perplexity of ``model`` on ``windows`` [n, L]; each window predicts its tokens 2..L.

    ``chunked=False`` forces the plain computation (full logits per batch), for tests.
    ``group`` (data-parallel ranks, :mod:`llmpress.calib.dist`): each rank scores its
    contiguous share of the windows and the log-likelihood sums are added over the ranks
    (the same perplexity up to float summation order and batch composition).
    ``kl``: a recorder or comparer of :class:`llmpress.eval.kl.BaselineLogprobs` that sees the
    logits of every scored token, in order, a chunk at a time.
    """
    device = next(model.parameters()).device
    parts = split_head(model) if chunked else None
    if parts is not None and not agrees(model, parts, windows[:1, :8].to(device)):
        parts = None  # the model's logits are not head(decoder(x)) after all: the plain way
    first = 0
    if group is not None and group.active:
        mine = group.share(windows.shape[0])
        windows, first = windows[mine.start : mine.stop], mine.start
    if kl is not None:
        kl.start(windows, first)
    nll = 0.0
    count = 0
    trim_malloc()  # what earlier steps freed but malloc kept would sit under every batch
    for batch in progress_mod.track(windows.split(batch_size), desc, "batch", on=progress):
        batch = batch.to(device)
        target = batch[:, 1:]
        if parts is None:
            nll += _plain_nll(model, batch, kl)
        else:
            nll += _chunked_nll(*parts, batch, kl)
        count += target.numel()
        trim_malloc()  # the batch's freed activations go back to the system, not into the next batch's peak
    if group is not None and group.active:
        total = group.sum_(torch.tensor([nll, float(count)], dtype=torch.float64))
        nll, count = float(total[0]), int(total[1])
    if kl is not None:
        kl.finish(group)
    return math.exp(nll / count)


def _plain_nll(model, batch: torch.Tensor, kl=None) -> float:
    logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
    target = batch[:, 1:]
    if kl is not None:
        for row in logits:  # a window at a time: a view, where the whole batch's rows would be a copy
            kl.add(row)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").item()


def _chunked_nll(body: nn.Module, head: nn.Module, softcap: float | None, batch: torch.Tensor, kl=None) -> float:
    return hidden_nll(head, softcap, body(input_ids=batch, use_cache=False).last_hidden_state, batch, kl)


def hidden_nll(head: nn.Module, softcap: float | None, hidden: torch.Tensor, batch: torch.Tensor, kl=None) -> float:
    """Summed negative log-likelihood of ``batch``'s tokens 2..L from the decoder's final
    hidden states (after the final norm), the head applied a chunk of tokens at a time
    (each chunk's logits shown to ``kl`` first, when given: see :func:`perplexity`)."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    del hidden
    target = batch[:, 1:].reshape(-1)
    vocab = head.out_features if hasattr(head, "out_features") else head.weight.shape[0]
    step = chunk_tokens(vocab, h.shape[-1])
    total = 0.0
    for s in range(0, h.shape[0], step):
        logits = head_logits(head, softcap, h[s : s + step])
        if kl is not None:
            kl.add(logits)
        total += _nll_sum(logits, target[s : s + step])
    return total


def _nll_sum(logits: torch.Tensor, target: torch.Tensor) -> float:
    """sum(logsumexp(logits) - logits[target]), computed in place in ``logits`` (which the
    caller gives up): no log_softmax copy of the chunk."""
    picked = logits.gather(1, target[:, None]).squeeze(1)
    top = logits.amax(dim=1, keepdim=True)
    lse = logits.sub_(top).exp_().sum(dim=1).log_().add_(top.squeeze(1))
    return (lse - picked).sum().item()
