"""Perplexity over token windows: exp(mean negative log-likelihood of every predicted token).

The output head is applied in chunks of tokens: a batch's full logits [batch, seq, vocab]
in float32 (plus the copies ``log_softmax`` makes) are the largest tensors of an
evaluation (4 x 511 x 49152 x 4 bytes = 402 MB per copy on SmolLM2-135M), while a chunk
of at most ``LOGITS_BUDGET`` elements keeps them to tens of MB. The decoder runs once per
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
from .memory import trim_malloc

LOGITS_BUDGET = 1 << 21  # elements of one chunk of logits (8 MB in float32)
# config fields that rescale logits after the head in some transformers models: not
# reproduced here, so such models take the plain path
_LOGIT_SCALES = ("logit_scale", "logits_scaling", "output_multiplier_scale", "logit_multiplier")
_TOKENWISE_MODULES = ("llmpress.runtime.qlinear", "llmpress.runtime.int8")


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
    if parts is not None and not _agrees(model, parts, windows[:1, :8].to(device)):
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


def _head_logits(head: nn.Module, softcap: float | None, h: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _agrees(model, parts: tuple, probe: torch.Tensor) -> bool:
    """The decomposition reproduces the model's own logits on a few tokens."""
    body, head, softcap = parts
    full = model(input_ids=probe, use_cache=False).logits.float()
    mine = _head_logits(head, softcap, body(input_ids=probe, use_cache=False).last_hidden_state)
    if mine.shape != full.shape:
        return False
    scale = float(full.abs().nan_to_num(0.0, 0.0, 0.0).max())  # NaN weights (a broken model) must not crash here
    return torch.allclose(mine, full, rtol=1e-4, atol=1e-4 * scale, equal_nan=True)


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
    step = max(1, LOGITS_BUDGET // vocab)
    total = 0.0
    for s in range(0, h.shape[0], step):
        logits = _head_logits(head, softcap, h[s : s + step])
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


def split_head(model: nn.Module) -> tuple[nn.Module, nn.Module, float | None] | None:
    """(decoder, output head, final logit softcap) of a causal LM whose logits are
    ``softcap(head(decoder(x).last_hidden_state))`` with a per-token head; None otherwise."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    body = getattr(model, "base_model", None)
    if head is None or body is None or body is model:
        return None
    if model._forward_hooks or model._forward_pre_hooks or "forward" in vars(model):
        return None  # the top-level forward was changed: only the model itself knows its logits
    if not _tokenwise(head):
        return None
    cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    if any(getattr(cfg, a, None) not in (None, 1, 1.0) for a in _LOGIT_SCALES):
        return None
    softcap = getattr(cfg, "final_logit_softcapping", None)
    return body, head, softcap


def _tokenwise(head: nn.Module) -> bool:
    """True when ``head`` maps each token independently (so chunking tokens changes nothing)."""
    from ..runtime.act_quant import ActQuantLinear

    for m in head.modules():
        if isinstance(m, ActQuantLinear):
            if m.args.granularity not in ("token", "group"):
                return False  # per-tensor / per-channel dynamic scales see the whole batch
        elif not (type(m) is nn.Linear or type(m).__module__ in _TOKENWISE_MODULES):
            return False
    return True
