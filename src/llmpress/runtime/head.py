"""The output head of a causal LM as a separate step: ``split_head`` finds (decoder, head,
final-logit softcap) for a model whose logits are ``softcap(head(decoder(x)))`` with a
per-token head, so callers can apply the head to a chunk of tokens at a time (perplexity,
distillation) instead of materializing [batch, seq, vocab] logits at once;
``next_token_loss`` and ``recomputed_blocks`` keep a backward pass through the whole model
(gradient-based importance, plan-bits' output gradients) near one block's working set.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["LOGITS_BUDGET", "agrees", "chunk_tokens", "head_logits", "loss_parts", "next_token_loss", "recomputed_blocks", "split_head"]

LOGITS_BUDGET = 1 << 21  # elements of one chunk of logits (8 MB in float32)


def chunk_tokens(vocab: int, hidden: int, share: int = 8) -> int:
    """Tokens per chunk of logits: ``LOGITS_BUDGET`` elements' worth, but at least ``hidden /
    share``. Each chunk's matrix product reads the whole head weight [vocab, hidden] for its
    tokens; a few tokens per read leaves it bound by memory traffic. With the floor the chunk's
    float32 logits stay under ``1 / share`` of the head weight's float32 bytes, a bounded
    fraction of the model, while each read of the weight serves ``hidden / share`` tokens.
    Measured on gemma-3-270m (262144 x 640 head; perplexity of 8 windows of 512 tokens, fresh
    processes, 2-core CPU beside another run): the budget's 8 tokens a chunk 141-152 s at
    1825-1848 MB peak RSS; ``share`` 8 (80 tokens) 74 s, 1918 MB; ``share`` 4 (160 tokens)
    61-64 s, 2089-2181 MB. SmolLM2-135M (72 tokens instead of 42): 39 -> 36 s, same peak."""
    return max(1, LOGITS_BUDGET // max(vocab, 1), hidden // share)


# config fields that rescale logits after the head in some transformers models: not
# reproduced here, so such models take the plain path
_LOGIT_SCALES = ("logit_scale", "logits_scaling", "output_multiplier_scale", "logit_multiplier")
_TOKENWISE_MODULES = ("llmpress.runtime.qlinear", "llmpress.runtime.int8")


def head_logits(head: nn.Module, softcap: float | None, h: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def agrees(model, parts: tuple, probe: torch.Tensor) -> bool:
    """The decomposition reproduces the model's own logits on a few tokens."""
    body, head, softcap = parts
    full = model(input_ids=probe, use_cache=False).logits.float()
    mine = head_logits(head, softcap, body(input_ids=probe, use_cache=False).last_hidden_state)
    if mine.shape != full.shape:
        return False
    scale = float(full.abs().nan_to_num(0.0, 0.0, 0.0).max())  # NaN weights (a broken model) must not crash here
    return torch.allclose(mine, full, rtol=1e-4, atol=1e-4 * scale, equal_nan=True)


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
    from .act_quant import ActQuantLinear

    for m in head.modules():
        if isinstance(m, ActQuantLinear):
            if m.args.granularity not in ("token", "group"):
                return False  # per-tensor / per-channel dynamic scales see the whole batch
        elif not (type(m) is nn.Linear or type(m).__module__ in _TOKENWISE_MODULES):
            return False
    return True


def loss_parts(model: nn.Module, probe: torch.Tensor):
    """``split_head``'s parts when they reproduce the model's logits on ``probe`` (a few
    tokens), else None (the model's own loss, full logits)."""
    parts = split_head(model)
    with torch.no_grad():
        return parts if parts is not None and agrees(model, parts, probe) else None


def _nll_sum(head: nn.Module, softcap: float | None, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head_logits(head, softcap, h), target, reduction="sum")


def next_token_loss(model: nn.Module, parts, ids: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
    """The mean next-token loss of ``ids`` (the model's own ``labels`` loss; inputs ``emb``
    when given, else ``ids``). With ``parts`` (:func:`loss_parts`) the head and the loss run a
    chunk of tokens at a time, each chunk recomputed in the backward pass: no [tokens, vocab]
    logits (nor their gradient) are held for the whole batch (402 MB a copy for 2 windows of
    SmolLM2-135M)."""
    inputs = {"input_ids": ids} if emb is None else {"inputs_embeds": emb}
    if parts is None:
        return model(**inputs, labels=ids, use_cache=False).loss
    body, head, softcap = parts
    h = body(**inputs, use_cache=False).last_hidden_state[:, :-1]
    h = h.reshape(-1, h.shape[-1])
    target = ids[:, 1:].reshape(-1)
    step = chunk_tokens(head.weight.shape[0], h.shape[-1])
    total = sum(
        checkpoint(_nll_sum, head, softcap, h[s : s + step], target[s : s + step], use_reentrant=False) for s in range(0, target.numel(), step)
    )
    return total / target.numel()


@contextlib.contextmanager
def recomputed_blocks(layers: nn.ModuleList):
    """Inside, each layer's forward runs under activation checkpointing (non-reentrant: its
    keyword arguments pass through): a backward pass through the model recomputes each
    block's activations instead of keeping every block's, holding the blocks' inputs and one
    block's working set."""
    own = []
    for layer in layers:
        fwd = layer.forward
        own.append((layer, layer.__dict__.get("forward")))
        layer.forward = lambda *a, _f=fwd, **k: checkpoint(_f, *a, use_reentrant=False, **k)
    try:
        yield
    finally:
        for layer, before in own:
            if before is None:
                del layer.forward
            else:
                layer.forward = before
