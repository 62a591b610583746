"""KV-cache quantization and the attention-side online rotations.

Where: transformers 5.x attention modules (llama, mistral, qwen2/3, gemma3) compute
q/k/v, apply QK-norm (gemma3, qwen3) and RoPE, update the cache, then call
``ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, ...)`` with
``(module, query, key, value, attention_mask, ...)``; q/k/v are [batch, heads, seq,
head_dim] there, keys already rotated by RoPE. That call is the one clean place that sees
post-RoPE keys, so this module registers an attention function ``"llmpress"`` and points
only the attention modules it is attached to at it (each such module gets a shallow copy
of the config with ``_attn_implementation = "llmpress"``; the model-level config, hence
the mask construction, keeps the original implementation). The function:

1. rotates q and k per head online (``x -> x @ Q.T``, Q a head_dim Hadamard): q.k is
   unchanged, the keys lose their outlier channels (QuaRot/SpinQuant's R3);
2. fake-quantizes keys and values per head and per token (QuantArgs over head_dim:
   ``granularity: token`` gives one scale per (head, token), ``group`` splits a head);
3. calls the original implementation (sdpa / eager / ...);
4. rotates the attention output online over all heads (o_proj input), when asked.

Quantizing per token is what a quantized cache stores: a token's codes depend on that
token only, so quantizing the whole (unquantized) cache at every step, as done here after
``past_key_values.update``, gives the same numbers as quantizing each entry once on
insertion. Values get their per-head rotation offline (folded into v_proj and o_proj);
only keys need the online one (RoPE sits between k_proj and the cache).

In training (SpinQuant) the quantizers use a straight-through estimator.
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.nn as nn

from ..quant.args import QuantArgs
from ..quant.core import fake_quantize
from .online_hadamard import OnlineRotation

IMPL = "llmpress"


def ste_fake_quantize(x: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """fake_quantize with a straight-through gradient (identity) when x needs a gradient."""
    q = fake_quantize(x, args)
    if not x.requires_grad:
        return q
    return x + (q - x).detach()


class AttentionRuntime(nn.Module):
    """What the ``llmpress`` attention function applies for one attention module."""

    def __init__(self, base_config):
        super().__init__()
        self.base_config = base_config  # the model's config: its implementation is the inner one
        self.qk_rot: OnlineRotation | None = None
        self.o_rot: OnlineRotation | None = None
        self.key_args: QuantArgs | None = None
        self.value_args: QuantArgs | None = None

    def extra_repr(self) -> str:
        parts = []
        if self.key_args is not None:
            parts.append(f"keys={self.key_args.describe()}")
        if self.value_args is not None:
            parts.append(f"values={self.value_args.describe()}")
        return ", ".join(parts)


def _eager_for(module: nn.Module):
    mod = sys.modules.get(type(module).__module__)
    fn = getattr(mod, "eager_attention_forward", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as fn
    return fn


def llmpress_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    rt: AttentionRuntime = module.llmpress_attn
    if rt.qk_rot is not None:
        query = rt.qk_rot(query)
        key = rt.qk_rot(key)
    if rt.key_args is not None:
        key = ste_fake_quantize(key, rt.key_args)
    if rt.value_args is not None:
        value = ste_fake_quantize(value, rt.value_args)
    inner_name = rt.base_config._attn_implementation
    if inner_name == IMPL:  # never recurse
        inner_name = "sdpa"
    inner = ALL_ATTENTION_FUNCTIONS.get_interface(inner_name, _eager_for(module))
    out, weights = inner(module, query, key, value, attention_mask, **kwargs)
    if rt.o_rot is not None:
        shape = out.shape  # [batch, seq, heads, head_dim]
        out = rt.o_rot(out.reshape(*shape[:-2], -1)).reshape(shape)
    return out, weights


def _register() -> None:
    from transformers.modeling_utils import AttentionInterface

    if IMPL not in AttentionInterface._global_mapping:
        AttentionInterface.register(IMPL, llmpress_attention)


def attention_runtime(attn: nn.Module) -> AttentionRuntime:
    """The runtime of an attention module, created (and the module re-pointed) on first use."""
    rt = getattr(attn, "llmpress_attn", None)
    if rt is not None:
        return rt
    _register()
    base = attn.config
    rt = AttentionRuntime(base)
    attn.llmpress_attn = rt
    cfg = copy.copy(base)
    cfg._attn_implementation = IMPL
    attn.config = cfg
    return rt


def detach_attention_runtime(attn: nn.Module) -> None:
    rt = getattr(attn, "llmpress_attn", None)
    if rt is None:
        return
    attn.config = rt.base_config
    del attn.llmpress_attn


def set_kv_quant(attn: nn.Module, keys: QuantArgs | None, values: QuantArgs | None) -> None:
    rt = attention_runtime(attn)
    rt.key_args = keys
    rt.value_args = values
