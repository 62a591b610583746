"""QuaRot (Ashkboos et al., 2024) as a model-scope method (KV-cache quantization: :mod:`llmpress.transform.kv_cache`).

The rotations themselves (norm fusion, residual/value/online rotations, the plan that
applies them) are in :mod:`llmpress.transform.rotation`, shared with DuQuant and SpinQuant.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch.nn as nn

from ..arch import ArchSpec
from ..errors import UserError
from ..registry import register
from .hadamard import orthogonal_matrix
from .rotation import apply_plan, check_uniform_blocks, hidden_size, residual_rotatable, standard_plan

log = logging.getLogger(__name__)


@dataclass(kw_only=True, frozen=True)
class QuaRot:
    """QuaRot (Ashkboos et al. 2024): Hadamard rotations everywhere they fit.

    ``rotation``: the residual rotation, ``random_hadamard`` (H times random signs, the
    paper's choice), ``hadamard``, ``random`` (Haar orthogonal) or ``identity``.
    ``online_down`` / ``online_o``: online Hadamard on the down_proj / o_proj inputs.
    ``rotate_values``: per-head Hadamard on values (folded into v_proj / o_proj).
    ``rotate_qk``: online per-head Hadamard of q and k after RoPE (for a quantized key cache).
    ``residual``: ``offline`` (llama family: norms fused, the residual stream rotated, no
    run-time cost) or ``online`` (a Hadamard on each input_layernorm / post-attention norm
    output at run time, gains kept; always the case for gemma3). Online costs an
    O(d log d) transform per token and norm, and keeps a channel the norm scales down
    small where it is quantized (fused, such a channel reaches the rotation at full size).
    """

    rotation: str = "random_hadamard"
    seed: int = 0
    residual: str = "offline"
    online_down: bool = True
    online_o: bool = True
    rotate_values: bool = True
    rotate_qk: bool = True

    def __post_init__(self):
        if self.rotation not in ("random_hadamard", "hadamard", "random", "identity"):
            raise UserError(f"rotation {self.rotation!r} unknown; expected random_hadamard, hadamard, random or identity")
        if self.residual not in ("offline", "online"):
            raise UserError(f"quarot.residual {self.residual!r}: expected offline or online")


@register("quarot", QuaRot, scope="model", summary="QuaRot: Hadamard rotations of the residual stream, values, o/down inputs and q/k")
def quarot(model: nn.Module, spec: ArchSpec, calib_windows, stage) -> None:
    cfg: QuaRot = stage.config
    check_uniform_blocks(model, spec, "quarot")
    residual = None
    kind = cfg.rotation
    if residual_rotatable(spec) and cfg.residual == "offline":
        residual, kind = orthogonal_matrix(hidden_size(model, spec), cfg.rotation, cfg.seed, "residual")
    plan = standard_plan(model, spec, cfg, residual, "hadamard" if cfg.rotation != "random" else "random", cfg.seed)
    plan.notes["method"] = "quarot"
    plan.notes["residual_kind"] = kind
    summary = apply_plan(model, spec, plan)
    log.info("quarot: %s", summary)
