"""Wanda (Sun et al., 2024): prune by weight magnitude times input activation norm.

Score S_oj = |W_oj| * ||X_j||_2 (the L2 norm of input feature j over the calibration
tokens). Scores are compared within each output row (the paper's "per output" group):
each row loses its ``round(sparsity * in)`` lowest-scored weights; or, with N:M, each run
of ``m`` consecutive input columns of a row keeps its ``n`` highest scores. No weight
update. Run by the sequential engine, each block's norms come from inputs that already
went through the pruned earlier blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from ..registry import ModuleContext, register
from .masks import describe_pattern, effective_sparsity, nm_prune_mask, row_prune_mask, sparsity_of, validate_pattern


def wanda_scores(weight: torch.Tensor, channel_l2: torch.Tensor) -> torch.Tensor:
    """|W_oj| * ||X_j||_2, shaped like the weight."""
    if channel_l2.shape[-1] != weight.shape[1]:
        raise UserError(f"channel norms of length {channel_l2.shape[-1]} do not match the weight's {weight.shape[1]} input columns")
    return weight.abs().float() * channel_l2.float().to(weight.device).unsqueeze(0)


def wanda_mask(weight: torch.Tensor, channel_l2: torch.Tensor, sparsity: float = 0.5, n: int = 0, m: int = 0) -> torch.Tensor:
    """Prune mask (True = removed): per-row unstructured, or N:M when ``m`` is set."""
    validate_pattern(sparsity, n, m)
    s = wanda_scores(weight, channel_l2)
    return nm_prune_mask(s, n, m) if m else row_prune_mask(s, sparsity)


@dataclass(kw_only=True, frozen=True)
class Wanda:
    """Wanda stage: ``sparsity`` per output row, or ``n`` kept of every ``m`` (2:4)."""

    sparsity: float = 0.5
    n: int = 0
    m: int = 0

    def __post_init__(self):
        validate_pattern(self.sparsity, self.n, self.m)


@register("wanda", Wanda, needs=("channel_stats",), summary="Wanda: prune |w| * ||x_j|| per output row (unstructured or N:M)")
def wanda(ctx: ModuleContext, cfg: Wanda) -> None:
    sparsity = effective_sparsity(cfg.sparsity, ctx.settings.get("sparsity_offset"), cfg.m)
    mask = wanda_mask(ctx.weight, ctx.stats["channel_stats"]["l2"], sparsity, cfg.n, cfg.m)
    ctx.set_weight(ctx.weight.masked_fill(mask, 0))
    ctx.record.sparsity = sparsity_of(ctx.weight)
    ctx.record.notes["pattern"] = describe_pattern(sparsity, cfg.n, cfg.m)
