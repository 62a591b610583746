"""Dynamic activation quantization around a linear layer.

The input of the linear is quantized per token at run time (scale from each token's own
range), multiplied with the (already quantized) weight, and the result stays in floating
point: dequantization happens before any non-linear function, as the seeds describe.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..quant.args import QuantArgs
from ..quant.core import fake_quantize


class ActQuantLinear(nn.Module):
    def __init__(self, linear: nn.Linear, args: QuantArgs):
        super().__init__()
        self.linear = linear
        self.args = args

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self):
        return self.linear.bias

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(fake_quantize(x, self.args))

    def extra_repr(self) -> str:
        return f"act={self.args.describe()}"


def plain(module: nn.Module) -> nn.Module:
    """The linear inside an activation-quantization wrapper (any other module as it is)."""
    return module.linear if isinstance(module, ActQuantLinear) else module


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` under the names the model has without its activation-quantization
    wrappers (``...q_proj.linear.weight`` -> ``...q_proj.weight``), so a checkpoint loads into
    plain transformers; the model itself is not changed."""
    wrapped = {n for n, m in model.named_modules() if isinstance(m, ActQuantLinear)}
    state = model.state_dict()
    if not wrapped:
        return state
    out = {}
    for k, v in state.items():
        owner, sep, rest = k.partition(".linear.")
        while sep and owner not in wrapped:  # a ".linear." deeper in the name
            head, sep, rest = rest.partition(".linear.")
            owner = f"{owner}.linear.{head}"
        out[f"{owner}.{rest}" if sep else k] = v
    return out
