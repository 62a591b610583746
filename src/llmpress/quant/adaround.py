"""AdaRound / AdaQuant: learned rounding (and optionally learned group scales) per linear,
from the layer Hessian the engine accumulates (no stored activations). The maths is in
:mod:`llmpress.quant.adaround_core`; this is the method's config and handler.

Cost: ``iters`` steps of Adam, each one product ``(W - W_hat) H`` ([out, in] x [in, in];
the gradient reuses it) and some twenty element-wise passes over the weight. On random
layers of SmolLM2-135M's shapes (``benchmarks/learned_layers.py``: one decoder block's
seven linears, 4-bit g64, one thread) a step of a block takes 0.17 s of CPU time and the
set-up 0.5 s, so the default 100 steps over the 210 linears take about 9 minutes of one
core (19 minutes of wall time on the shared 2-core machine at a load average of 7.5);
``iters: 50`` halves it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..errors import RecipeError
from ..registry import ModuleContext, register
from .adaround_core import AdaRoundOptions, adaround_quantize, check_options
from .args import QuantArgs


@dataclass(kw_only=True, frozen=True)
class AdaRound(AdaRoundOptions):
    """``weights``: the grid (its observer gives the starting scales: ``minmax`` or
    ``mse`` or ``lsq``, the latter two weighted by diag(H)). ``iters``/``lr``: Adam on the rounding
    variables; ``lam``: weight of the rounding regularizer (the layer error is normalized
    to 1 at nearest rounding); ``beta_start``/``beta_end``: its annealed exponent;
    ``warmup``: share of the steps without it. ``learn_scale`` (AdaQuant): learn each
    group's scale too (``scale_lr``), only ever narrowed, down to ``scale_min`` times the
    starting scale. ``damp``: fraction of the Hessian's mean diagonal added to its diagonal
    (as GPTQ's), a plain weight-error term that keeps the rounding from fitting the
    calibration text's correlations alone."""

    weights: QuantArgs = field(default_factory=QuantArgs)
    activations: QuantArgs | None = None

    def __post_init__(self):
        check_options(self, RecipeError)
        if self.weights is None:
            raise RecipeError("weights: adaround needs weight quantization arguments")
        if self.weights.kind != "int":
            raise RecipeError(f"weights.kind: adaround learns the rounding of integer grids, not {self.weights.kind!r}")
        if self.weights.granularity == "token":
            raise RecipeError("weights.granularity: 'token' is for activations; use tensor, channel or group")
        if self.learn_scale and self.weights.scale_dtype != "float32":
            raise RecipeError("learn_scale: the learned scales are float32; set weights.scale_dtype: float32")

    def options(self) -> AdaRoundOptions:
        """The optimization's own settings (the fields this config inherits)."""
        return AdaRoundOptions(**{f.name: getattr(self, f.name) for f in fields(AdaRoundOptions)})


@register("adaround", AdaRound, needs=("hessian",), summary="AdaRound/AdaQuant: learned rounding (and group scales) per linear from its Hessian")
def adaround(ctx: ModuleContext, cfg: AdaRound) -> None:
    hessian, owned = ctx.take("hessian")
    res = adaround_quantize(ctx.weight, hessian, cfg.weights, options=cfg.options(), name=ctx.name, hessian_owned=owned)
    ctx.set_weight(res.weight)
    rec = ctx.record
    rec.weight_args = cfg.weights
    rec.qparams = res.qparams
    rec.notes["adaround_error_rtn"] = res.error_rtn
    rec.notes["adaround_error"] = res.error
    rec.notes["adaround_flipped"] = res.flipped
    rec.notes["adaround_undecided"] = res.undecided
    if res.kept_rtn:
        rec.notes["adaround_kept_rtn"] = True
    if cfg.activations is not None:
        rec.act_args = cfg.activations
