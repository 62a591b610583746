"""KV-cache quantization as a model-scope method: keys (after RoPE and any online rotation)
and values fake-quantized per head and token at run time (:mod:`llmpress.runtime.kv_quant`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from ..arch import ArchSpec, get_module
from ..errors import UserError
from ..quant.args import QuantArgs
from ..registry import register
from ..runtime.kv_quant import set_kv_quant
from .rotation import attention_of, head_layout, record_transform


@dataclass(frozen=True)
class KVQuant:
    """Fake-quantize keys (after RoPE and any online rotation) and values per head and token."""

    keys: QuantArgs | None = field(default_factory=lambda: QuantArgs(bits=4, symmetric=False, granularity="token"))
    values: QuantArgs | None = field(default_factory=lambda: QuantArgs(bits=4, symmetric=False, granularity="token"))


@register("kv_quant", KVQuant, scope="model", summary="KV-cache quantization (per head and token, keys after RoPE)")
def kv_quant(model: nn.Module, spec: ArchSpec, calib_windows, stage) -> None:
    cfg: KVQuant = stage.config
    for block in get_module(model, spec.blocks):
        attn = attention_of(block, spec)
        hd, _, _ = head_layout(attn)
        for what, a in (("keys", cfg.keys), ("values", cfg.values)):
            if a is not None and a.granularity == "group" and hd % a.group_size:
                raise UserError(f"kv_quant.{what}: group_size {a.group_size} does not divide head_dim {hd}")
        set_kv_quant(attn, cfg.keys, cfg.values)
    record_transform(
        model, {"method": "kv_quant", "keys": cfg.keys.describe() if cfg.keys else None, "values": cfg.values.describe() if cfg.values else None}
    )
