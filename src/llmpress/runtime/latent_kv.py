"""QSVD's latent KV cache: an attention whose q/k/v share one right factor caches the latent.

After QSVD (:mod:`llmpress.lowrank.qsvd`) q_proj, k_proj and v_proj are
:class:`~llmpress.runtime.lowrank.LowRankLinear` modules sharing ``B`` [r, E]. Their keys and
values are functions of the latent ``h = x B^T`` (r numbers per token), so
:class:`LatentKVAttention` caches h in place of K and V (2 d_kv numbers per token: 384 on
SmolLM2-135M). Keys are rebuilt at every step, ``K = h A_k^T`` per head, then RoPE at their
positions (RoPE cannot be applied before caching: it does not commute with the rebuild). Values
need no RoPE, so a decode step never rebuilds them: ``P V = (P h) A_v^T``, the attention weights
P of each query head applied to the latent and the result expanded by that head's rows of A_v
(the absorption multi-head latent attention uses); a prefill, where rebuilding V once is
cheaper than expanding every query position, rebuilds them. The trade is QSVD's: less cache
memory and bandwidth for about ``T r d_kv`` more multiply-adds per decode step over a context of
T tokens (the key rebuild).

The cache is the model's own ``past_key_values`` (transformers' Cache): each layer stores
``h`` as its "keys" ([batch, 1, T, r]) and an empty tensor ([batch, 1, T, 0]) as its "values",
so ``generate`` and the cache bookkeeping (lengths, masks) work unchanged and the cache's bytes
are the latent's. The T' cached latents end at the current token, so their keys get RoPE at
positions P-T'..P-1 (P tokens so far): sequences without left padding (one prompt, or a batch of
prompts of the same length). Llama-family attention (q/k/v/o, one rotary table) and Gemma 3's
(query/key RMS norms on the rebuilt heads before RoPE, a rotary table per layer type,
sliding-window layers whose cache keeps the window's last latents); other attention modules
(logit soft-capping, a run-time attention function) keep their factored linears and K/V cache.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .lowrank import LowRankLinear


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [batch, 1, seq, head_dim]
    return x * cos + _rotate_half(x) * sin


def _heads(y: torch.Tensor, head_dim: int) -> torch.Tensor:
    b, t, _ = y.shape
    return y.view(b, t, -1, head_dim).transpose(1, 2)


def shares_latent(attn: nn.Module) -> bool:
    """Whether ``attn``'s q/k/v are low-rank linears with one shared right factor."""
    mods = [getattr(attn, p, None) for p in ("q_proj", "k_proj", "v_proj")]
    if not all(isinstance(m, LowRankLinear) for m in mods):
        return False
    return all(m.b is mods[0].b for m in mods[1:])


class LatentKVAttention(nn.Module):
    """A Llama-family or Gemma 3 attention serving QSVD's shared latent as its KV cache."""

    latent_kv = True

    def __init__(self, attn: nn.Module, rotary: nn.Module):
        super().__init__()
        self.attn = attn
        object.__setattr__(self, "_rotary", rotary)  # the model's rotary table, not a submodule of this one
        self.rank = attn.q_proj.rank

    def __getattr__(self, name: str):
        """What the wrapped attention has (q_proj, o_proj, config, layer_idx, ...): code that
        inspects a model's attention keeps working."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "attn":
                raise
            return getattr(self.attn, name)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        import sys

        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        a = self.attn
        q_lin, k_lin, v_lin = a.q_proj, a.k_proj, a.v_proj
        h = q_lin.latent(hidden_states)  # [batch, t, r]: what the cache keeps
        q = _heads(q_lin.expand(h), a.head_dim)
        b, t = h.shape[:2]
        if past_key_values is not None:
            cached, _ = past_key_values.update(h[:, None], h.new_zeros(b, 1, t, 0), self.layer_idx)
            h_all = cached[:, 0]
        else:
            h_all = h
        n_heads, length = q.shape[1], h_all.shape[1]
        # values need no RoPE, so P V = (P h) A_v^T: the latent goes through the attention and each
        # head's output is expanded once, when that costs less than rebuilding V (a decode step)
        absorb = n_heads * t * self.rank * (length + a.head_dim) < length * self.rank * v_lin.out_features + n_heads * t * length * a.head_dim
        k = _heads(k_lin.expand(h_all), a.head_dim)
        n_kv = k.shape[1]
        v = h_all[:, None].expand(b, n_kv, length, self.rank) if absorb else _heads(v_lin.expand(h_all), a.head_dim)
        if hasattr(a, "q_norm"):  # Gemma 3: RMS norm of each query and key head, before RoPE
            q, k = a.q_norm(q), a.k_norm(k)
        cos, sin = position_embeddings
        q = _rope(q, cos, sin)
        if h_all.shape[1] == t:
            k = _rope(k, cos, sin)
        else:
            k = _rope(k, *self._key_rope(k, length, kwargs.get("position_ids")))
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(a.config._attn_implementation, None)
        if interface is None:  # eager: the attention's own module's function
            interface = sys.modules[type(a).__module__].eager_attention_forward
        if getattr(a, "sliding_window", None):
            kwargs["sliding_window"] = a.sliding_window
        out, weights = interface(a, q, k, v, attention_mask, dropout=0.0, scaling=a.scaling, **kwargs)
        if absorb:  # [b, t, heads, r]: each query head through its key/value head's rows of A_v
            groups = n_heads // n_kv
            out = torch.einsum("bthr,hdr->bthd", out, v_lin.A.view(n_kv, a.head_dim, self.rank).repeat_interleave(groups, 0).to(out.dtype))
            if v_lin.bias is not None:  # each row of the attention weights sums to 1
                out = out + v_lin.bias.view(n_kv, a.head_dim).repeat_interleave(groups, 0).to(out.dtype)
        out = out.reshape(b, t, -1).contiguous()
        return a.o_proj(out), weights

    def _key_rope(self, like: torch.Tensor, length: int, position_ids) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin at the positions of the ``length`` cached latents: the last ones up to the current
        token (a sliding-window layer keeps only the window's)."""
        end = int(position_ids[0, -1]) + 1 if position_ids is not None else length
        positions = torch.arange(end - length, end, device=like.device)[None].expand(like.shape[0], -1)
        layer_type = getattr(self.attn, "layer_type", None)
        return self._rotary(like, positions) if layer_type is None else self._rotary(like, positions, layer_type)


def attach_latent_kv(model: nn.Module) -> list[str]:
    """Serve every Llama-family or Gemma 3 attention of ``model`` whose q/k/v share a latent with
    :class:`LatentKVAttention`; the names of the attention modules changed."""
    body = getattr(model, "model", None)
    rotary = getattr(body, "rotary_emb", None)
    layers = getattr(body, "layers", None)
    if rotary is None or layers is None or not (hasattr(rotary, "inv_freq") or hasattr(rotary, "layer_types")):
        return []
    done = []
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or isinstance(attn, LatentKVAttention) or not shares_latent(attn):
            continue
        if (
            hasattr(attn, "q_norm") != hasattr(attn, "k_norm")
            or getattr(attn, "attn_logit_softcapping", None)
            or getattr(attn, "llmpress_attn", None)
        ):
            continue  # one-sided head norms, soft-capped logits or a run-time attention function: not this module's forward
        layer.self_attn = LatentKVAttention(attn, rotary)
        done.append(f"model.layers.{i}.self_attn")
    return done
