"""KV-cache policies: parse a spec, build the transformers ``Cache`` for a model.

Specs (``--kv`` on the CLI; ``+`` joins an eviction policy and KIVI storage):

- ``full``: every token in the model's precision (transformers' own dynamic cache);
- ``kivi:BITS[,gG][,rR][,sS]``: KIVI, 2 or 4 bits (also 3, 8), key groups of G tokens and value
  groups of G channels (default: the largest divisor of the head dimension up to 32, KIVI's
  group; a given G must divide it), the last R tokens (default 128, a multiple of G) in precision;
  ``sS``: also the first S tokens in precision (the attention sinks, whose massive keys and
  values a shared per-channel group cannot hold at 2 bits; default 0, KIVI as published; with an
  eviction policy give the sinks there instead: ``sinks:S,W+kivi:B``); ``pre``: keys quantized
  before RoPE (KVQuant; rotated back by their position, forward again when read: the same
  bytes, a much smaller 2-bit error on rotary models);
- ``sinks:S,W``: StreamingLLM, the first S tokens and the last W; ``window:W`` = ``sinks:0,W``;
- ``h2o:H,W``: H2O, the H tokens of largest accumulated attention (per key/value head) and the
  last W;
- eviction options after the numbers: ``pos=cache`` (default: keys sit at their position
  inside the cache, StreamingLLM's scheme; a stream may run past the training length) or
  ``pos=original``.

Examples: ``kivi:2``, ``kivi:2,s1,pre``, ``sinks:4,1020``, ``h2o:256,256``, ``sinks:4,1020+kivi:4``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch.nn as nn
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer

from ..errors import UserError
from .layers import PolicyLayer, SlidingKIVILayer
from .rope import layer_inv_freqs

KIVI_BITS = (2, 3, 4, 8)


@dataclass(kw_only=True, frozen=True)
class KVPolicy:
    kind: str = "full"  # full, sinks, h2o (window = sinks with 0 sinks)
    sinks: int = 0
    window: int | None = None
    heavy: int = 0
    positions: str = "cache"
    kivi_bits: int | None = None
    kivi_group: int | None = None  # None: the largest divisor of the head dimension up to 32
    kivi_residual: int = 128
    kivi_prerope: bool = False  # keys quantized before RoPE (KVQuant)

    @property
    def evicts(self) -> bool:
        return self.window is not None

    @property
    def budget(self) -> int | None:
        """Tokens kept by eviction (None: all)."""
        return None if self.window is None else self.sinks + self.heavy + self.window

    def describe(self) -> str:
        parts = []
        if self.kind == "sinks":
            parts.append(f"sinks:{self.sinks},{self.window}" if self.sinks else f"window:{self.window}")
        elif self.kind == "h2o":
            parts.append(f"h2o:{self.heavy},{self.window}")
        if self.evicts and self.positions != "cache":
            parts[-1] += f",pos={self.positions}"
        if self.kivi_bits:
            sinks = f",s{self.sinks}" if self.sinks and not self.evicts else ""  # precision sinks without eviction
            parts.append(
                f"kivi:{self.kivi_bits}"
                + (f",g{self.kivi_group}" if self.kivi_group else "")
                + f",r{self.kivi_residual}{sinks}"
                + (",pre" if self.kivi_prerope else "")
            )
        return "+".join(parts) or "full"


def _ints(args: list[str], n: int, what: str) -> list[int]:
    if len(args) != n:
        raise UserError(f"--kv {what}: expected {n} number(s), got {args}")
    try:
        out = [int(a) for a in args]
    except ValueError:
        raise UserError(f"--kv {what}: {args} are not whole numbers") from None
    if any(x < 0 for x in out):
        raise UserError(f"--kv {what}: numbers must not be negative ({out})")
    return out


def parse_policy(spec: str) -> KVPolicy:
    """A :class:`KVPolicy` from a spec string (module doc); a clear error naming what is wrong."""
    fields: dict = {}
    kivi_sinks = None
    for part in [p.strip() for p in str(spec).split("+") if p.strip()] or ["full"]:
        name, _, rest = part.partition(":")
        args = [a.strip() for a in rest.split(",") if a.strip()] if rest else []
        opts = [a for a in args if "=" in a]
        nums = [a for a in args if "=" not in a]
        if name == "full":
            if args:
                raise UserError(f"--kv full takes no arguments, got {args}")
            continue
        if name == "kivi":
            if "kivi_bits" in fields:
                raise UserError("--kv: kivi given twice")
            bits = _ints(nums[:1], 1, "kivi:BITS")[0] if nums else None
            if bits not in KIVI_BITS:
                raise UserError(f"--kv kivi:{bits}: bits must be one of {KIVI_BITS}")
            fields["kivi_bits"] = bits
            for a in nums[1:]:
                if a[:1] in ("g", "r") and a[1:].isdigit() and int(a[1:]) > 0:
                    fields["kivi_group" if a[0] == "g" else "kivi_residual"] = int(a[1:])
                elif a[:1] == "s" and a[1:].isdigit():
                    kivi_sinks = int(a[1:])
                elif a == "pre":
                    fields["kivi_prerope"] = True
                else:
                    raise UserError(
                        f"--kv kivi: {a!r} is not gN (group), rN (residual tokens), sN (first tokens in precision) or pre (keys before RoPE)"
                    )
            if opts:
                raise UserError(f"--kv kivi: unknown options {opts}")
            continue
        if name not in ("sinks", "window", "h2o"):
            raise UserError(f"--kv: unknown policy {name!r} (full, kivi, sinks, window, h2o)")
        if "kind" in fields:
            raise UserError("--kv: one eviction policy at a time (sinks, window or h2o), joined with kivi by +")
        if name == "window":
            (w,) = _ints(nums, 1, "window:W")
            fields.update(kind="sinks", sinks=0, window=w)
        elif name == "sinks":
            s, w = _ints(nums, 2, "sinks:S,W")
            fields.update(kind="sinks", sinks=s, window=w)
        else:
            h, w = _ints(nums, 2, "h2o:H,W")
            fields.update(kind="h2o", heavy=h, window=w)
        for o in opts:
            k, _, v = o.partition("=")
            if k != "pos" or v not in ("cache", "original"):
                raise UserError(f"--kv {name}: unknown option {o!r} (pos=cache or pos=original)")
            fields["positions"] = v
        if fields["window"] < 1:
            raise UserError(f"--kv {name}: the recent window must hold at least 1 token")
    if kivi_sinks:
        if "kind" in fields:
            raise UserError(f"--kv kivi:...,s{kivi_sinks}: with an eviction policy give the sinks there (sinks:S,W+kivi:B)")
        fields["sinks"] = kivi_sinks
    p = KVPolicy(**fields)
    if p.kivi_bits and p.kivi_group and p.kivi_residual % p.kivi_group:
        raise UserError(f"--kv kivi: the residual ({p.kivi_residual}) must be a multiple of the group ({p.kivi_group})")
    if p.kivi_bits and p.kind == "h2o":
        raise UserError(
            "--kv h2o+kivi: evicting single tokens from per-channel quantized key groups is not supported (sinks or window compose with kivi)"
        )
    if p.kivi_bits and p.evicts and p.window < p.kivi_residual + (p.kivi_group or 32):
        raise UserError(
            f"--kv: with kivi the window ({p.window}) must hold at least the residual plus one group ({p.kivi_residual + (p.kivi_group or 32)})"
        )
    return p


def check_policy(policy: KVPolicy, config, context: int | None = None) -> None:
    """Refuse a policy the model cannot run: a KIVI group not dividing the head dimension, a
    budget beyond the model's context, original positions past it (``context``: stream length)."""
    hd = head_dim(config)
    if policy.kivi_bits and hd % kivi_group(policy, config):
        raise UserError(f"--kv kivi: group {policy.kivi_group} does not divide the head dimension {hd}")
    if policy.kivi_bits and policy.kivi_residual % kivi_group(policy, config):
        raise UserError(f"--kv kivi: the residual ({policy.kivi_residual}) must be a multiple of the group ({kivi_group(policy, config)})")
    limit = getattr(config, "max_position_embeddings", None)
    if policy.evicts and policy.positions == "original" and limit and context and context > limit:
        raise UserError(f"--kv pos=original: {context} tokens run past the model's context of {limit} positions; use pos=cache")
    if policy.evicts and limit and policy.budget > limit:
        raise UserError(f"--kv: the cache budget ({policy.budget} tokens) is larger than the model's context ({limit} positions)")


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kivi_group(policy: KVPolicy, config) -> int:
    """The group a KIVI policy uses on a model: given, or the largest divisor of the head
    dimension up to 32 (KIVI's 32 on heads of 64 or 128)."""
    if policy.kivi_group:
        return policy.kivi_group
    hd = head_dim(config)
    return max(g for g in range(1, min(32, hd) + 1) if hd % g == 0)


def text_config(model: nn.Module):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def build_cache(model: nn.Module, policy: KVPolicy | str) -> Cache:
    """A fresh cache for one generation or one streamed evaluation with ``policy``. Full
    attention layers get the policy; a model's sliding-window layers (gemma3's local layers)
    keep their window (already bounded): in KIVI codes when the policy has KIVI and the window
    holds the residual plus a group, otherwise as transformers' sliding-window cache. With H2O the model's attention
    runs as eager attention that reports its probabilities to the cache (installed here, on
    the model; :func:`observe_attention`)."""
    if isinstance(policy, str):
        policy = parse_policy(policy)
    cfg = text_config(model)
    check_policy(policy, cfg)
    freqs = layer_inv_freqs(model)
    if policy.evicts and policy.positions == "cache" and any(f is None for f in freqs):
        raise UserError("--kv pos=cache: the model's rotary frequencies were not found; use pos=original")
    if policy.kivi_prerope and any(f is None for f in freqs):
        raise UserError("--kv kivi:...,pre: the model's rotary frequencies were not found; drop pre")
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    kivi = dict(bits=policy.kivi_bits, group=kivi_group(policy, cfg), residual=policy.kivi_residual) if policy.kivi_bits else None
    layers = []
    for i, t in enumerate(types):
        f = freqs[i] if i < len(freqs) else None
        kv = None if kivi is None else {**kivi, "inv_freq": f if policy.kivi_prerope else None}
        if t == "sliding_attention":
            W = cfg.sliding_window
            if kv is not None and W >= kv["residual"] + kv["group"]:
                layers.append(SlidingKIVILayer(window=W, kivi=kv, positions="original", inv_freq=f))
            else:
                layers.append(DynamicSlidingWindowLayer(sliding_window=W))
        else:
            layers.append(PolicyLayer(sinks=policy.sinks, window=policy.window, heavy=policy.heavy, kivi=kv,
                                      positions=policy.positions, inv_freq=f))  # fmt: skip
    cache = Cache(layers=layers)
    cache.llmpress_policy = policy
    if policy.kind == "h2o":
        observe_attention(model, cache)
    return cache


# -- H2O: the attention probabilities of each step, reported to the cache

OBSERVED = "llmpress_observed"


def _observed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    eager = sys.modules[type(module).__module__].eager_attention_forward
    out, probs = eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    obs = getattr(module, "_llmpress_cache", None)
    if obs is not None:
        layer = obs.layers[module.layer_idx]
        if isinstance(layer, PolicyLayer):
            layer.observe(probs)
    return out, probs


def observe_attention(model: nn.Module, cache: Cache) -> None:
    """Run ``model``'s attention as eager attention that hands each step's probabilities to
    ``cache``'s layers (H2O's accumulated attention). Undone by :func:`unobserve_attention`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(OBSERVED, _observed_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(OBSERVED, eager_mask)
    for m in model.modules():
        if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups"):
            m._llmpress_cache = cache
    for c in {id(x): x for x in (model.config, text_config(model))}.values():
        if not hasattr(c, "_llmpress_attn"):
            c._llmpress_attn = c._attn_implementation
        c._attn_implementation = OBSERVED


def unobserve_attention(model: nn.Module) -> None:
    for m in model.modules():
        if hasattr(m, "_llmpress_cache"):
            del m._llmpress_cache
    for c in {id(x): x for x in (model.config, text_config(model))}.values():
        if hasattr(c, "_llmpress_attn"):
            c._attn_implementation = c._llmpress_attn
            del c._llmpress_attn


def cache_bytes(cache: Cache) -> int:
    """Bytes the cache holds for K and V now (KIVI: codes, scales and minima)."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, PolicyLayer):
            total += layer.nbytes()
        elif getattr(layer, "keys", None) is not None and layer.is_initialized:
            total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return total
