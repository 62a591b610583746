"""Magnitude pruning: the data-free baseline. Zero the smallest |w| of each output row
(``per_row``, the comparison group Wanda uses), of the whole layer, or N:M."""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import ModuleContext, register
from .masks import describe_pattern, effective_sparsity, magnitude_prune, sparsity_of, validate_pattern


@dataclass(kw_only=True, frozen=True)
class Magnitude:
    """Magnitude stage: ``sparsity`` (per row, or per layer with ``per_row: false``), or
    ``n`` kept of every ``m``."""

    sparsity: float = 0.5
    n: int = 0
    m: int = 0
    per_row: bool = True

    def __post_init__(self):
        validate_pattern(self.sparsity, self.n, self.m)


@register("magnitude", Magnitude, summary="magnitude pruning: smallest |w| per row, per layer, or N:M (no data)")
def magnitude(ctx: ModuleContext, cfg: Magnitude) -> None:
    sparsity = effective_sparsity(cfg.sparsity, ctx.settings.get("sparsity_offset"), cfg.m)
    ctx.set_weight(magnitude_prune(ctx.weight, sparsity, cfg.n, cfg.m, cfg.per_row))
    ctx.record.sparsity = sparsity_of(ctx.weight)
    ctx.record.notes["pattern"] = describe_pattern(sparsity, cfg.n, cfg.m) + ("" if cfg.m or cfg.per_row else " per layer")
