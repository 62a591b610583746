"""Layer removal (ShortGPT, Men et al. 2024): remove the decoder blocks that change the
residual stream least.

Importance per block, from the calibration windows on the dense model:
- ``block_influence`` (the paper's BI): ``1 - mean cosine(block input, block output)`` over
  all calibration tokens (:func:`llmpress.prune.importance.block_influence`);
- ``ppl``: the calibration perplexity with that one block skipped (a measured comparison;
  one forward pass of the calibration windows per block).
The ``count`` (or ``round(fraction * blocks)``) least important blocks go in one shot; the
kept blocks are renumbered (:func:`llmpress.prune.structure.drop_blocks`) so the config,
the KV cache of ``generate()`` and a saved checkpoint all see the smaller model.

A model-scope stage: it runs before the engine, and the stages after it are planned on the
smaller model (``reshapes_model``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch.nn as nn

from ..arch import get_module
from ..errors import RecipeError, UserError
from ..registry import ModelStageOutput, register
from .distill import Recovery
from .importance import block_influence, drop_one_perplexity
from .structure import drop_blocks

log = logging.getLogger(__name__)

IMPORTANCE = ("block_influence", "ppl")


@dataclass(kw_only=True, frozen=True)
class DropLayers(Recovery):
    """drop_layers stage: ``fraction`` of the decoder blocks (rounded to the nearest count) or
    ``count`` blocks, chosen by ``importance`` (block_influence or ppl) measured on
    ``windows`` calibration windows in batches of ``batch_size``."""

    fraction: float | None = None
    count: int | None = None
    importance: str = "block_influence"
    windows: int = 32
    batch_size: int = 4
    reshapes_model: ClassVar[bool] = True  # the stages after it are planned on the smaller model

    def __post_init__(self):
        if (self.fraction is None) == (self.count is None):
            raise RecipeError("drop_layers: set exactly one of fraction or count")
        if self.fraction is not None and not 0.0 <= self.fraction < 1.0:
            raise RecipeError(f"fraction={self.fraction!r}: expected a value in [0, 1) (the share of decoder blocks removed)")
        if self.count is not None and self.count < 0:
            raise RecipeError(f"count={self.count!r}: expected a number of blocks >= 0")
        if self.importance not in IMPORTANCE:
            raise RecipeError(f"importance={self.importance!r}: expected one of {', '.join(IMPORTANCE)}")
        if self.windows < 1 or self.batch_size < 1:
            raise RecipeError("windows and batch_size must be at least 1")
        self.check_recovery()

    def check_model(self, model: nn.Module, spec) -> None:
        """Refuse, when the recipe is planned, a count that removes every block."""
        self.n_removed(len(get_module(model, spec.blocks)))

    def n_removed(self, blocks: int) -> int:
        """How many of ``blocks`` decoder blocks go (refused when that is all of them)."""
        n = self.count if self.count is not None else round(self.fraction * blocks)
        if n >= blocks:
            raise UserError(f"drop_layers: removing {n} of {blocks} decoder blocks leaves none; remove fewer")
        return int(n)


def least_important(scores: list[float], n: int) -> list[int]:
    """Indices of the ``n`` lowest scores (ties: the later block first), ascending."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i], -i))
    return sorted(order[:n])


@register("drop_layers", DropLayers, scope="model", summary="ShortGPT: drop the decoder blocks of lowest Block Influence or drop-one ppl")
def drop_layers(model: nn.Module, spec, data, stage) -> ModelStageOutput:
    cfg: DropLayers = stage.config
    n_blocks = len(get_module(model, spec.blocks))
    n = cfg.n_removed(n_blocks)
    if data is None:
        raise RecipeError("drop_layers needs calibration data")
    summary: dict = {"importance": cfg.importance, "blocks_before": n_blocks}
    if cfg.importance == "block_influence":
        scores = block_influence(model, spec, data, windows=cfg.windows, batch_size=cfg.batch_size)
    else:
        base, scores = drop_one_perplexity(model, spec, data, windows=cfg.windows, batch_size=cfg.batch_size)
        summary["calibration_ppl"] = base
    removed = least_important(scores, n)
    teacher = cfg.teacher(model, changed=bool(removed))
    if removed:
        drop_blocks(model, spec, removed)
    log.info("drop_layers: removed blocks %s of %d (%s)", removed, n_blocks, cfg.importance)
    summary.update(scores={i: s for i, s in enumerate(scores)}, removed=removed, blocks_after=n_blocks - len(removed))
    rec = cfg.recover(model, teacher, data, cfg.batch_size)
    if rec is not None:
        summary["recovery"] = rec
    return ModelStageOutput(summary=summary)
