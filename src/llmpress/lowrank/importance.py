"""Per-weight importance from calibration gradients, for the stages after it.

Before the engine, on the uncompressed model, the gradient of the next-token loss with
respect to each targeted weight is taken on ``windows`` calibration windows. A change
``dW`` costs about ``dL = g . dW`` to first order (the seeds' ``L(w) - L(w') ~ dL/dw (w - w')``)
and about ``1/2 dW^T F dW`` to second order with F the Fisher information, whose diagonal is
the mean squared gradient. So the weight of element (i, j) in a squared reconstruction error
is ``score: fisher``: ``F_ij = mean_b g_ij^2`` (default), or ``score: grad``:
``(mean_b |g_ij|)^2``, the seeds' first-order score ``a_ij = |dL/dW_ij|`` squared.

The result travels to the later stages of each linear as the setting ``importance`` (a
float32 tensor of the weight's shape; ``wsvd`` weighs its reconstruction error by it, ``asvd``
with ``scale: fisher`` scales input channels by its column sums; ``squeezellm`` with
``sensitivity: fisher`` weighs its k-means by it). Memory: one float32 copy of
every targeted weight, held until the engine ends (the model in memory needs its gradients
anyway: a model-scope stage, not for ``--stream``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import RecipeError
from ..registry import ModelStageOutput, register
from .core import stage_linears
from .grads import weight_grads


@dataclass(kw_only=True, frozen=True)
class WeightImportance:
    score: str = "fisher"  # "fisher": mean g^2; "grad": (mean |g|)^2
    windows: int = 16  # calibration windows for the gradients
    batch_size: int = 2

    def __post_init__(self):
        if self.score not in ("fisher", "grad"):
            raise RecipeError(f"weight_importance score {self.score!r}: expected fisher or grad")
        if self.windows < 1 or self.batch_size < 1:
            raise RecipeError("weight_importance windows and batch_size must be at least 1")


def importance(model: nn.Module, names: list[str], data: torch.Tensor, cfg: WeightImportance) -> dict[str, torch.Tensor]:
    """Each named linear's per-weight importance (see the module doc), float32."""
    acc: dict[str, torch.Tensor] = {}

    def consume(k: str, g: torch.Tensor) -> None:
        term = g.detach().float().pow(2) if cfg.score == "fisher" else g.detach().float().abs()
        acc[k] = term if k not in acc else acc[k].add_(term)

    n = weight_grads(model, names, data, cfg.windows, cfg.batch_size, consume)
    for v in acc.values():
        v.div_(n)
        if cfg.score == "grad":
            v.pow_(2)
    return acc


@register("weight_importance", WeightImportance, scope="model",
          summary="per-weight importance (Fisher diagonal or squared mean |gradient|) for the stages after it (wsvd, asvd fisher, squeezellm fisher)")  # fmt: skip
def weight_importance(model: nn.Module, spec, data, stage) -> ModelStageOutput:
    cfg: WeightImportance = stage.config
    shapes = stage_linears(model, spec, stage, data, "weight_importance")
    imp = importance(model, list(shapes), data, cfg)
    zero = sorted(n for n, v in imp.items() if not float(v.sum()) > 0)
    if zero:
        raise RecipeError(f"weight_importance: the loss has no gradient with respect to {zero[:3]} on the calibration windows")
    return ModelStageOutput(
        per_linear={n: {"importance": v} for n, v in imp.items()},
        summary={
            "score": cfg.score,
            "windows": min(cfg.windows, int(data.shape[0])),
            "linears": len(imp),
            "bytes": sum(v.numel() * 4 for v in imp.values()),
        },  # fmt: skip
    )
