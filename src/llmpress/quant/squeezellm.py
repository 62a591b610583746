"""SqueezeLLM-style non-uniform quantization (Kim et al., 2023): per output row (or per group
of columns) a float16 table of 2^b values fitted by sensitivity-weighted k-means, each weight
stored as its b-bit index; dense-and-sparse keeps the weights the tables would serve worst in
float16. ``solver: gptq`` quantizes onto the same tables with GPTQ's error feedback instead of
to nearest. The maths is :mod:`llmpress.quant.nuq`; the layer is stored in the ``codebook``
form (:mod:`llmpress.storage.forms.codebook`). Formulas and figures: docs/codebooks.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import RecipeError, UserError
from ..registry import ModuleContext, register
from .kmeans import check_bits
from .nuq import SENSITIVITIES, check_shape, column_sensitivity, nuq_gptq, nuq_round, weight_sensitivity
from .sweep import validate_solver_fields

SOLVERS = ("round", "gptq")
MAX_OUTLIER_FRACTION = 0.05


@dataclass(kw_only=True, frozen=True)
class SqueezeLLM:
    """``bits``: 2^bits table entries per row (``group_size`` None) or per group of
    ``group_size`` input columns. ``sensitivity``: ``hessian_diag`` (k-means weighted by the
    input's mean square H_jj), ``fisher`` (by each weight's Fisher information, SqueezeLLM's
    choice: needs a ``weight_importance`` stage before it) or ``uniform``. ``outlier_fraction``: share of the layer's weights
    kept in float16 off the tables (dense-and-sparse; SqueezeLLM keeps 0.05-0.45%).
    ``solver``: ``round`` (nearest entry) or ``gptq`` (column sweep with error feedback onto
    the tables; ``block_size``, ``damp``, ``act_order`` as in GPTQ)."""

    bits: int = 3
    group_size: int | None = None
    sensitivity: str = "hessian_diag"
    outlier_fraction: float = 0.0
    solver: str = "round"
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = True

    def __post_init__(self):
        try:
            check_bits(self.bits)
        except UserError as e:
            raise RecipeError(str(e)) from None
        g = self.group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 2):
            raise RecipeError(f"group_size={g!r}: expected an integer >= 2, or null for one table per row")
        if g is not None and g < (1 << self.bits):
            raise RecipeError(f"group_size={g}: a group needs at least 2^bits = {1 << self.bits} weights")
        if self.sensitivity not in SENSITIVITIES:
            raise RecipeError(f"sensitivity={self.sensitivity!r}: expected one of {', '.join(SENSITIVITIES)}")
        f = self.outlier_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f <= MAX_OUTLIER_FRACTION:
            raise RecipeError(f"outlier_fraction={f!r}: expected a fraction in [0, {MAX_OUTLIER_FRACTION}]")
        if self.solver not in SOLVERS:
            raise RecipeError(f"solver={self.solver!r}: expected one of {', '.join(SOLVERS)}")
        validate_solver_fields(self.block_size, self.damp)

    @property
    def requires_stage(self) -> str | None:
        """The plan refuses ``sensitivity: fisher`` without a weight_importance stage before it."""
        return "weight_importance" if self.sensitivity == "fisher" else None

    def check_layer(self, out_features: int, in_features: int, where: str) -> None:
        """Checked by the plan on every targeted linear before anything changes."""
        check_shape(in_features, self.bits, self.group_size, f"{where}: ")


@register(
    "squeezellm",
    SqueezeLLM,
    needs=("hessian",),
    summary="non-uniform codebook quantization (weighted k-means tables, dense-and-sparse, optional GPTQ sweep)",
)
def squeezellm(ctx: ModuleContext, cfg: SqueezeLLM) -> None:
    hessian, _ = ctx.take("hessian")
    C = ctx.weight.shape[1]
    check_shape(C, cfg.bits, cfg.group_size, f"layer {ctx.name}: ")
    if cfg.sensitivity == "fisher":
        imp = ctx.settings.get("importance")
        if imp is None:
            raise UserError(f"{ctx.name}: sensitivity fisher needs a weight_importance stage before it targeting this linear")
        s = weight_sensitivity(imp.to(ctx.weight.device), ctx.name)
    else:
        s = column_sensitivity(hessian, cfg.sensitivity, C)
    common = dict(group_size=cfg.group_size, col_weights=s, outlier_fraction=cfg.outlier_fraction)
    if cfg.solver == "gptq":
        res = nuq_gptq(ctx.weight, hessian, cfg.bits, block_size=cfg.block_size, damp=cfg.damp, act_order=cfg.act_order, name=ctx.name, **common)
    else:
        res = nuq_round(ctx.weight, cfg.bits, **common)
    ctx.set_weight(res.weight)
    rec = ctx.record
    rec.form = "codebook"
    rec.payload = {"codes": res.codes, "table": res.table, **({"exc_index": res.outliers} if res.outliers.numel() else {})}
    nnz = int(res.outliers.numel())
    rec.notes.update(bits=cfg.bits, group_size=cfg.group_size, solver=cfg.solver, sensitivity=cfg.sensitivity)
    if cfg.outlier_fraction:
        rec.notes["outliers"] = {"nnz": nnz, "fraction": nnz / rec.n_params}
    if res.loss is not None:
        rec.notes.update(gptq_loss=res.loss, damp=res.damp)
