"""LLM.int8() (Dettmers et al., 2022): mixed-precision decomposition of a linear at run time.

For an input X [tokens, in] the feature columns holding an outlier, ``|x_tj| >= threshold``
for any token of the call, are multiplied in floating point; the other columns use
vector-wise int8 (one scale per token row of X, one per output channel of W) with int32
accumulation:

    Y = X[:, O] W[:, O]^T  +  s_X s_W^T * (Q(X[:, ~O]) Q(W[:, ~O])^T)

``outlier_weights="int8"`` (bitsandbytes' behaviour, 8-bit storage) multiplies the
outlier columns with the dequantized int8 weight; ``"float"`` keeps the original float
weight for them. With ``threshold = 0`` every column is an outlier: the product is the
float (or W8A16) matmul. Each module counts the share of outlier columns per call; the
``llm_int8`` recipe method puts the live counters into the layer's record notes, and
:func:`llm_int8_stats` reads them after an evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import RecipeError
from ..quant.args import QuantArgs
from ..quant.core import QParams
from ..registry import ModuleContext, register
from .int8 import BACKENDS, int8_mm, quantize_rows, weight_codes


def llm_int8_matmul(
    x: torch.Tensor,
    w_outlier: torch.Tensor,
    w_codes: torch.Tensor,
    w_scale: torch.Tensor,
    threshold: float,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decomposed X W^T for X [T, in]: (Y [T, out] float32, outlier column mask [in])."""
    xf = x.float()
    cols = (xf.abs() >= threshold).any(0)
    n_out = int(cols.sum())
    y = torch.zeros(xf.shape[0], w_codes.shape[0], dtype=torch.float32, device=x.device)
    if n_out:
        y += xf[:, cols] @ w_outlier[:, cols].float().t()
    if n_out < xf.shape[1]:
        xr = xf.masked_fill(cols, 0.0)
        codes, s = quantize_rows(xr)
        y += int8_mm(codes, w_codes.t(), backend).float() * s * w_scale.unsqueeze(0)
    return y, cols


def new_counters(threshold: float, in_features: int) -> dict:
    return {
        "threshold": threshold,
        "in_features": in_features,
        "calls": 0,
        "mean_outlier_share": 0.0,
        "max_outlier_share": 0.0,
        "last_outlier_columns": 0,
    }


class LLMInt8Linear(nn.Linear):
    """nn.Linear computing with the LLM.int8() decomposition (made by :func:`install_llm_int8`).

    A subclass, converted in place, so the module keeps its name, parameters and
    ``state_dict`` (the int8 codes are non-persistent buffers rebuilt from ``weight``).
    """

    threshold: float
    backend: str
    counters: dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y, cols = llm_int8_matmul(x.reshape(-1, shape[-1]), self.weight, self.int8_codes, self.int8_scale, self.threshold, self.backend)
        c = self.counters
        share = float(cols.sum()) / cols.numel()
        c["calls"] += 1
        c["mean_outlier_share"] += (share - c["mean_outlier_share"]) / c["calls"]
        c["max_outlier_share"] = max(c["max_outlier_share"], share)
        c["last_outlier_columns"] = int(cols.sum())
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", llm_int8(threshold={self.threshold}, backend={self.backend})"


def install_llm_int8(
    linear: nn.Linear, threshold: float = 6.0, outlier_weights: str = "int8", backend: str = "auto", qparams: QParams | None = None
) -> QParams:
    """Turn ``linear`` into an :class:`LLMInt8Linear` in place; returns the weight's qparams.

    With ``outlier_weights="int8"`` the float weight is replaced by its dequantized int8
    values (what the model stores); with ``"float"`` it is kept for the outlier columns.
    ``qparams``: the per-channel scales of a weight already on its int8 grid (a loaded
    checkpoint), reused as they are instead of recomputed from the weight.
    """
    if outlier_weights not in ("int8", "float"):
        raise RecipeError(f"outlier_weights={outlier_weights!r}: expected 'int8' or 'float'")
    codes, scale = weight_codes(linear.weight, qparams)
    if outlier_weights == "int8":
        linear.weight.data.copy_((codes.float() * scale.unsqueeze(1)).to(linear.weight.dtype))
    linear.__class__ = LLMInt8Linear
    linear.register_buffer("int8_codes", codes, persistent=False)
    linear.register_buffer("int8_scale", scale, persistent=False)
    linear.threshold = float(threshold)
    linear.backend = backend
    linear.counters = new_counters(float(threshold), linear.in_features)
    return QParams(scale=scale.unsqueeze(1))


def llm_int8_stats(model: nn.Module) -> dict[str, dict]:
    """Counters of every LLM.int8() linear: calls and the share of outlier columns."""
    return {n: dict(m.counters) for n, m in model.named_modules() if isinstance(m, LLMInt8Linear)}


def reset_llm_int8_stats(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, LLMInt8Linear):
            m.counters.update(new_counters(m.threshold, m.in_features))


@dataclass(kw_only=True, frozen=True)
class LLMInt8:
    """LLM.int8() stage: ``threshold`` on |x| marks outlier feature columns (per call);
    ``backend`` picks the int8 GEMM (see :mod:`llmpress.runtime.int8`)."""

    threshold: float = 6.0
    outlier_weights: str = "int8"
    backend: str = "auto"

    def __post_init__(self):
        if self.threshold < 0:
            raise RecipeError(f"threshold={self.threshold!r}: expected a non-negative number")
        if self.outlier_weights not in ("int8", "float"):
            raise RecipeError(f"outlier_weights={self.outlier_weights!r}: expected 'int8' or 'float'")
        if self.backend not in BACKENDS:
            raise RecipeError(f"backend={self.backend!r}: expected one of {', '.join(BACKENDS)}")


@register("llm_int8", LLMInt8, summary="LLM.int8(): run-time outlier columns in float, the rest int8 vector-wise")
def llm_int8(ctx: ModuleContext, cfg: LLMInt8) -> None:
    qp = install_llm_int8(ctx.module, cfg.threshold, cfg.outlier_weights, cfg.backend)
    if cfg.outlier_weights == "int8":
        ctx.record.weight_args = QuantArgs(bits=8, granularity="channel")
        ctx.record.qparams = qp
    ctx.record.notes["activations"] = f"int8 per-token, float columns where |x| >= {cfg.threshold:g}"
    # the live counters: a report written after an evaluation shows the outlier shares
    ctx.record.notes["llm_int8"] = ctx.module.counters
