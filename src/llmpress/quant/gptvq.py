"""GPTVQ-style vector quantization (van Baalen et al., 2024): vectors of ``dim`` consecutive
input columns of a row, one float16 codebook of 2^(dim * bits) codewords per group of
``group_size`` input columns (all rows), initialized by Hessian-diagonal-weighted k-means,
codes assigned with GPTQ's error feedback (d columns at once, under the inverse-Hessian
distance), tables refined by least squares on the layer error. The maths is
:mod:`llmpress.quant.vq`; the layer is stored in the ``vq`` form
(:mod:`llmpress.storage.forms.vq`). Formulas and figures: docs/codebooks.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import RecipeError, UserError
from ..registry import ModuleContext, register
from .sweep import validate_solver_fields
from .vq import auto_group_size, check_table_bits, check_vq, check_vq_shape, vq_gptq

MAX_ITERS = 1000
MAX_EM_ROUNDS = 20
MAX_TABLE_BUDGET = 4.0  # bits per weight


@dataclass(kw_only=True, frozen=True)
class GPTVQ:
    """``dim``: weights per vector (2, 4, 8); ``bits``: bits per weight (index of dim * bits
    bits, 2^(dim * bits) codewords per table); ``group_size``: input columns sharing one table
    (null: one column group; ``auto``: per layer the smallest group whose tables cost at most
    ``table_budget`` bits per weight, so layers of any width get tables at one overhead);
    ``row_group_size``: output rows sharing each column group's
    table (null: all rows; a divisor gives every block of that many rows tables of its own,
    more local codewords at 2^(d b) d 16 bits each); ``kmeans_iters``: Lloyd iterations of the H-diagonal-weighted k-means start;
    ``row_scale``: divide each row by its float16 RMS before fitting the shared tables
    (GPTVQ's normalization; one float16 per row more); ``refine_iters``: least-squares (conjugate-gradient) steps on the tables after assignment
    (0: none); ``em_rounds``: sweep + refinement rounds, each on the previous round's tables
    (1: GPTVQ's one pass; the lowest-error round is kept); ``table_bits``: 16 (float16 tables)
    or 8 (int8 entries and a float16 scale per table: half the table bytes, so more local
    tables fit a budget); ``block_size``, ``damp``: as in GPTQ (the sweep runs in the natural column
    order); ``seed``: the k-means start."""

    dim: int = 2
    bits: int = 2
    group_size: int | str | None = 64
    table_budget: float = 0.1
    row_group_size: int | None = None
    row_scale: bool = True
    kmeans_iters: int = 25
    refine_iters: int = 10
    em_rounds: int = 1
    table_bits: int = 16
    block_size: int = 128
    damp: float = 0.01
    seed: int = 0

    def __post_init__(self):
        try:
            check_vq(self.dim, self.bits)
            check_table_bits(self.table_bits)
        except UserError as e:
            raise RecipeError(str(e)) from None
        g = self.group_size
        if g == "auto":
            b = self.table_budget
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b <= MAX_TABLE_BUDGET:
                raise RecipeError(f"table_budget={b!r}: expected bits per weight for the tables in (0, {MAX_TABLE_BUDGET}]")
        elif g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
            raise RecipeError(f"group_size={g!r}: expected a positive integer, auto (the table_budget rule), or null for one table per layer")
        elif g is not None and g % self.dim:
            raise RecipeError(f"group_size={g}: the vector size {self.dim} does not divide the group")
        rg = self.row_group_size
        if rg is not None and (isinstance(rg, bool) or not isinstance(rg, int) or rg < 1):
            raise RecipeError(f"row_group_size={rg!r}: expected a positive integer, or null for tables shared by all rows")
        if isinstance(self.em_rounds, bool) or not isinstance(self.em_rounds, int) or not 1 <= self.em_rounds <= MAX_EM_ROUNDS:
            raise RecipeError(f"em_rounds={self.em_rounds!r}: expected an integer in [1, {MAX_EM_ROUNDS}]")
        for field in ("kmeans_iters", "refine_iters", "seed"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0 or (field != "seed" and v > MAX_ITERS):
                raise RecipeError(
                    f"{field}={v!r}: expected an integer in [0, {MAX_ITERS}]" if field != "seed" else f"seed={v!r}: expected a non-negative integer"
                )
        if not isinstance(self.row_scale, bool):
            raise RecipeError(f"row_scale={self.row_scale!r}: expected true or false")
        validate_solver_fields(self.block_size, self.damp)

    def layer_group_size(self, out_features: int, in_features: int) -> int | None:
        """The group of input columns a [out, in] linear gets (``auto``: :func:`auto_group_size`)."""
        if self.group_size != "auto":
            return self.group_size
        return auto_group_size(
            out_features, in_features, self.dim, self.bits, table_bits=self.table_bits, budget=self.table_budget, row_group_size=self.row_group_size
        )

    def check_layer(self, out_features: int, in_features: int, where: str) -> None:
        """Checked by the plan on every targeted linear before anything changes."""
        g = self.layer_group_size(out_features, in_features)
        check_vq_shape(out_features, in_features, self.dim, self.bits, g, f"{where}: ", row_group_size=self.row_group_size)


@register(
    "gptvq",
    GPTVQ,
    needs=("hessian",),
    summary="vector quantization (GPTVQ: d-dim codebooks per column group, GPTQ error feedback, least-squares table refinement)",
)
def gptvq(ctx: ModuleContext, cfg: GPTVQ) -> None:
    hessian, _ = ctx.take("hessian")
    group_size = cfg.layer_group_size(*ctx.weight.shape)
    res = vq_gptq(
        ctx.weight,
        hessian,
        cfg.dim,
        cfg.bits,
        group_size=group_size,
        row_scale=cfg.row_scale,
        block_size=cfg.block_size,
        damp=cfg.damp,
        kmeans_iters=cfg.kmeans_iters,
        refine_iters=cfg.refine_iters,
        seed=cfg.seed,
        name=ctx.name,
        row_group_size=cfg.row_group_size,
        em_rounds=cfg.em_rounds,
        table_bits=cfg.table_bits,
    )
    ctx.set_weight(res.weight)
    rec = ctx.record
    rec.form = "vq"
    # the codes wait in the record until the save: in the smallest integer type that holds them
    # (uint8 up to 256 codewords: 1 byte per vector instead of int64's 8)
    codes = res.codes.to(torch.uint8 if res.table.shape[1] <= 256 else torch.int16)
    rec.payload = {"codes": codes, "table": res.table, "row_groups": res.row_groups, **({"scale": res.scale} if res.scale is not None else {})}
    if res.table_q is not None:
        rec.payload.update(table_q=res.table_q, table_scale=res.table_scale)
    rec.notes.update(dim=cfg.dim, bits=cfg.bits, group_size=group_size, row_group_size=cfg.row_group_size, row_scale=cfg.row_scale)
    rec.notes.update(em_rounds=cfg.em_rounds, table_bits=cfg.table_bits)
    rec.notes.update(layer_error=res.loss, damp=res.damp)
