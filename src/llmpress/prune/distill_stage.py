"""The recipe stage ``distill``: recovery after every pruning stage before it, towards the
model as the recipe received it (a structured stage's own ``recover_steps`` distils towards
the model before that one stage). :func:`llmpress.api.compress` keeps a frozen copy of the
model it received while the model-scope stages run when a stage's config says
``keeps_original``; the copy is released before the engine runs.
"""

from __future__ import annotations

import torch.nn as nn

from ..errors import RecipeError
from ..registry import ModelStageOutput, register
from .distill import Distill, current_original, distill


@register("distill", Distill, scope="model", summary="knowledge distillation towards the model as the recipe received it (recovery after pruning)")
def distill_stage(model: nn.Module, spec, data, stage) -> ModelStageOutput:
    """Train the model, as the stages before this one left it, towards the model the recipe
    started from (KL on next-token distributions of the calibration windows, :func:`distill`)."""
    teacher = current_original()
    if teacher is None:
        raise RecipeError("distill: no teacher; the stage runs inside compress(), which keeps the model it received")
    if data is None:
        raise RecipeError("distill needs calibration data")
    return ModelStageOutput(summary={"recovery": distill(model, teacher, data, stage.config), "teacher": "the model before the recipe"})
