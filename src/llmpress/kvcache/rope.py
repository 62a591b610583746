"""Moving cached keys to other rotary positions.

RoPE rotates each pair of a key's channels (i, i + d/2) by the angle ``p * theta_i`` of its
position p; a rotation by ``delta * theta_i`` composes with it, so a key cached at position p
is moved to ``p + delta`` exactly (up to float rounding) without its pre-RoPE value. The
pairing is transformers' ``rotate_half`` convention (Llama, Gemma3: ``cat(freqs, freqs)``).
"""

from __future__ import annotations

import torch
import torch.nn as nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def shift_keys(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """``keys`` [B, H, T, D] moved by ``delta`` positions (broadcastable to [B, H, T])."""
    ang = delta.to(torch.float32).unsqueeze(-1) * inv_freq.to(device=keys.device, dtype=torch.float32)  # [..., D/2]
    ang = torch.cat((ang, ang), dim=-1)
    k = keys.float()
    return (k * ang.cos() + rotate_half(k) * ang.sin()).to(keys.dtype)


def layer_inv_freqs(model: nn.Module) -> list[torch.Tensor | None]:
    """Each decoder layer's rotary inverse frequencies (None where they cannot be found)."""
    inner = getattr(model, "model", model)
    inner = getattr(inner, "language_model", inner)
    rot = getattr(inner, "rotary_emb", None)
    layers = getattr(inner, "layers", [])
    out: list[torch.Tensor | None] = []
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        lt = getattr(attn, "layer_type", None)
        f = None
        if rot is not None:
            f = getattr(rot, f"{lt}_inv_freq", None) if lt is not None else None
            f = f if f is not None else getattr(rot, "inv_freq", None)
        out.append(None if f is None else f.detach().float().clone())
    return out
