"""GGUF K-quant and IQ4 grids as a method: ``Q2_K``, ``Q4_K`` and ``Q5_K``
(:mod:`llmpress.quant.kquant`, stored in the ``q2_k`` / ``q4_k`` / ``q5_k`` forms), ``IQ4_NL`` and ``IQ4_XS`` (:mod:`llmpress.quant.iq4`,
the ``iq4_nl`` / ``iq4_xs`` forms), ``Q3_K`` and ``Q6_K`` (llmpress's two-level integer grids),
and llama.cpp's per-tensor type mixtures (``Q2_K``, ``Q2_K_S``, ``Q3_K_S`` / ``_M`` / ``_L``, ``Q4_K_S`` / ``_M``,
``Q5_K_S`` / ``_M``, ``IQ4_NL``, ``IQ4_XS``), solved with GPTQ.

``kquant`` quantizes each targeted linear onto one GGUF block type:

- ``Q2_K`` / ``Q4_K`` / ``Q5_K``: the grid of :func:`~llmpress.quant.kquant.k_params` (llama.cpp's
  search, with the input columns' ``diag(H)`` as its importance matrix when ``importance``
  is on), then, with ``solver: gptq``, GPTQ's column sweep onto that fixed grid (codes
  ``clamp(round((w + dmin*m) / (d*sc)), 0, 15)`` (31 for Q5_K), error feedback, activation
  order; the grid is fitted once on the weight before the sweep, as GPTQ's static groups);
- ``IQ4_NL`` / ``IQ4_XS``: likewise on the grid of :func:`~llmpress.quant.iq4.iq4_params`
  (llama.cpp's search of each block's scale), each weight to its nearest table level;
- ``Q4_0``, ``Q5_0``, ``Q5_1``, ``Q8_0``, ``Q3_K``, ``Q6_K``: llmpress's integer grids of the
  same name (the ``gptq-q4_0`` / ``gptq-q5_0`` / ``rtn-q8_0`` presets' grids, asymmetric int5
  with float16 scales and minimums, the two-level grids: int3 / int6 in groups of 16 whose
  scales are ``d * sc``, ``sc`` 6 / 8 bits), solved by the GPTQ solver (``solver: round``: no
  error feedback between columns).

Rows of a width that is not a multiple of 256 have no K-quant: like llama.cpp, such a layer
falls back to ``Q4_0`` (for ``Q2_K`` and ``Q3_K``), ``Q5_0`` (for ``Q4_K``), ``Q5_1`` (for ``Q5_K``),
``Q8_0`` (for ``Q6_K``) or ``IQ4_NL`` (for ``IQ4_XS``), and its record says so.

``gguf_mix`` (a model-scope stage before it) assigns each linear its type the way
llama.cpp's ``llama-quantize`` does for a file type (``llama_tensor_get_type``; every mix
gives the output head ``Q6_K``):

- ``q4_k_m`` / ``q5_k_m``: ``Q6_K`` for the value projections and MLP down projections of the
  layers that get more bits (the first and last eighth of the blocks and every third block
  between), ``Q4_K`` / ``Q5_K`` for everything else;
- ``q4_k_s``: ``Q5_K`` for the value projections of the first 4 blocks and the down
  projections of the first eighth, ``Q4_K`` elsewhere;
- ``q5_k_s``: ``Q5_K`` everywhere;
- ``q3_k_m``: ``Q5_K`` for the value projections of the first 2 blocks and the down
  projections of the first sixteenth, ``Q4_K`` for the other value and down projections and
  for every attention output projection, ``Q3_K`` elsewhere;
- ``q3_k_l``: ``Q5_K`` for every value, down and attention output projection, ``Q3_K``
  elsewhere; ``q3_k_s``: ``Q3_K`` everywhere;
- ``q2_k``: ``Q3_K`` for the value (``Q4_K`` at 4+ query heads per key/value head), down and
  attention output projections, ``Q2_K`` elsewhere; ``q2_k_s``: ``Q4_K`` for the down
  projections of the first eighth and (at 4+ query heads per key/value head) the value
  projections, ``Q2_K`` elsewhere;
- ``iq4_nl`` / ``iq4_xs``: that type everywhere, the value projections ``Q5_K`` where 4 or more
  query heads share a key/value head (llama.cpp's rule with an importance matrix, which the
  ``kquant`` stage always has).

The ``kquant`` stage after it reads that type (``ModuleContext.settings``); without it, every
layer takes the stage's ``type``. Figures: docs/checkpoint.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import RecipeError
from ..registry import ModelStageOutput, ModuleContext, register
from .args import QuantArgs
from .gptq_solve import GPTQResult, gptq_quantize, sweep_solve
from .hessian import prepare, regularize
from .iq4 import BLOCK as IQ4_BLOCK
from .iq4 import IQ4Params, iq4_params, levels, nearest_level
from .kquant import QK_K, KParams, k_params, nmax
from .sweep import SweepBlock, record_solver_notes, solver_threads, validate_regularizers, validate_solver_fields

K_BITS = {"Q2_K": 2, "Q4_K": 4, "Q5_K": 5}  # the K-quants of kquant.py's grids, by their code width
OWN_FORMS = {"Q2_K": "q2_k", "Q4_K": "q4_k", "Q5_K": "q5_k", "IQ4_NL": "iq4_nl", "IQ4_XS": "iq4_xs"}  # types with a storage form of their own
TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "Q4_0", "Q5_0", "Q5_1", "Q8_0")
FALLBACK = {
    "Q2_K": "Q4_0",
    "Q3_K": "Q4_0",
    "Q4_K": "Q5_0",
    "Q5_K": "Q5_1",
    "Q6_K": "Q8_0",
    "IQ4_XS": "IQ4_NL",
}  # llama.cpp's, for rows not a multiple of 256
MIXES = ("q2_k", "q2_k_s", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "iq4_nl", "iq4_xs")
SOLVERS = ("gptq", "round")


def grid_args(qtype: str, importance: bool) -> QuantArgs:
    """The integer grid of ``Q4_0`` / ``Q5_0`` / ``Q5_1`` / ``Q8_0`` / ``Q3_K`` / ``Q6_K``
    (float16 scales, as GGUF stores them; the symmetric 3- to 5-bit grids search their scales
    with ``diag(H)`` when ``importance`` is on, as llama.cpp's importance-matrix quantizers do)."""
    if qtype in ("Q4_0", "Q5_0"):
        return QuantArgs(
            bits=int(qtype[1]),
            symmetric=True,
            granularity="group",
            group_size=32,
            observer="lsq" if importance else "minmax",
            signed_scale=True,
            scale_dtype="float16",
        )
    if qtype == "Q5_1":  # min-max scales rounded so that scale and scale x zero point are float16 values (as rtn-q4_1)
        return QuantArgs(bits=5, symmetric=False, granularity="group", group_size=32, observer="minmax", scale_dtype="float16")
    if qtype == "Q8_0":  # llama.cpp: d = max|x| / 127, no search
        return QuantArgs(bits=8, symmetric=True, granularity="group", group_size=32, observer="minmax", scale_dtype="float16")
    if qtype == "Q6_K":
        return QuantArgs(
            bits=6, symmetric=True, granularity="group", group_size=16, super_block=QK_K, observer="minmax", signed_scale=True, scale_dtype="float16"
        )
    if qtype == "Q3_K":  # llama.cpp: d = s_m / -32, 6-bit sc
        return QuantArgs(
            bits=3,
            symmetric=True,
            granularity="group",
            group_size=16,
            super_block=QK_K,
            group_scale_bits=6,
            observer="lsq" if importance else "minmax",
            signed_scale=True,
            scale_dtype="float16",
        )
    raise ValueError(qtype)


def storable_type(qtype: str, in_features: int) -> str:
    """``qtype``, or llama.cpp's fallback when rows of ``in_features`` hold no K-quant block."""
    return FALLBACK[qtype] if qtype in FALLBACK and in_features % QK_K else qtype


def more_bits(block: int, n_blocks: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the blocks, every third between."""
    return block < n_blocks // 8 or block >= 7 * n_blocks // 8 or (block - n_blocks // 8) % 3 == 2


def mix_type(mix: str, role: str, block: int | None, n_blocks: int, gqa: int = 1) -> str:
    """The type ``mix`` gives a linear of ``role`` (``v``, ``down``, ``o``, ``head`` or
    ``other``) in ``block`` (llama.cpp's ``llama_tensor_get_type`` for that file type, with an
    importance matrix); ``gqa``: query heads per key/value head."""
    if role == "head":
        return "Q6_K"
    if mix.startswith("iq4"):
        return "Q5_K" if role == "v" and gqa >= 4 else mix.upper()
    if mix == "q2_k":
        if role == "v":
            return "Q4_K" if gqa >= 4 else "Q3_K"
        return "Q3_K" if role in ("down", "o") else "Q2_K"
    if mix == "q2_k_s":
        early_down = role == "down" and block is not None and block < n_blocks // 8
        return "Q4_K" if early_down or (role == "v" and gqa >= 4) else "Q2_K"
    base = {"3": "Q3_K", "4": "Q4_K", "5": "Q5_K"}[mix[1]]
    if mix == "q3_k_l" and role in ("v", "down", "o"):
        return "Q5_K"
    if mix == "q3_k_m" and role == "o":
        return "Q4_K"
    if block is None or role not in ("v", "down"):
        return base
    if mix == "q3_k_m":
        return "Q5_K" if block < (2 if role == "v" else n_blocks // 16) else "Q4_K"
    if mix in ("q4_k_m", "q5_k_m"):
        return "Q6_K" if more_bits(block, n_blocks) else base
    if mix == "q4_k_s" and (block < 4 if role == "v" else block < n_blocks // 8):
        return "Q5_K"
    return base


@dataclass(kw_only=True, frozen=True)
class GGUFMix:
    """``mix``: the llama.cpp file type whose per-tensor types the ``kquant`` stage after it
    takes: ``q2_k``, ``q2_k_s``, ``q3_k_s``, ``q3_k_m``, ``q3_k_l``, ``q4_k_s``, ``q4_k_m``, ``q5_k_s``, ``q5_k_m``,
    ``iq4_nl`` or ``iq4_xs``."""

    mix: str = "q4_k_m"

    def __post_init__(self):
        if self.mix not in MIXES:
            raise RecipeError(f"mix={self.mix!r}: expected one of {', '.join(MIXES)}")


_BLOCK = re.compile(r"\.(\d+)\.")


@register(
    "gguf_mix",
    GGUFMix,
    scope="model",
    summary="llama.cpp's per-tensor GGUF types of a file type (Q2_K, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, IQ4_NL, IQ4_XS), for the kquant stage after it",
)
def gguf_mix(model: nn.Module, spec, data, stage) -> ModelStageOutput:
    cfg: GGUFMix = stage.config
    n_blocks = len(model.get_submodule(spec.blocks))
    c = getattr(model.config, "get_text_config", lambda: model.config)()
    gqa = getattr(c, "num_attention_heads", 1) // (getattr(c, "num_key_value_heads", None) or getattr(c, "num_attention_heads", 1))
    per_linear, counts = {}, {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        in_blocks = name.startswith(spec.blocks + ".")
        if not stage.matches(name, in_blocks):
            continue
        block = None
        if in_blocks:
            block = int(_BLOCK.match(name[len(spec.blocks) :]).group(1))
        role = next((r for r, p in (("v", spec.v), ("down", spec.down), ("o", spec.o)) if name.endswith("." + p)), "other")
        role = "head" if name == spec.lm_head else role
        qtype = storable_type(mix_type(cfg.mix, role, block, n_blocks, gqa), mod.in_features)
        per_linear[name] = {"gguf_type": qtype}
        counts[qtype] = counts.get(qtype, 0) + 1
    if not per_linear:
        raise RecipeError(f"gguf_mix: no linear matches targets {list(stage.targets)}")
    return ModelStageOutput(per_linear=per_linear, summary={"mix": cfg.mix, "types": dict(sorted(counts.items()))})


@dataclass(kw_only=True, frozen=True)
class KQuant:
    """``type``: the GGUF block type of every targeted linear (``Q3_K``, ``Q4_K``, ``Q5_K``,
    ``Q6_K``, ``Q2_K``, ``IQ4_NL``, ``IQ4_XS``, ``Q4_0``, ``Q5_0``, ``Q5_1``, ``Q8_0``) unless a
    ``gguf_mix`` stage before it chose one; rows of a width that is not a multiple of 256 fall
    back to ``Q4_0`` / ``Q5_0`` / ``Q5_1`` / ``Q8_0`` / ``IQ4_NL`` as in llama.cpp. ``importance``: weight
    the grid searches by the input columns' ``diag(H)`` (llama.cpp's importance matrix).
    ``solver``: ``gptq`` (error feedback; ``block_size``, ``damp``, ``act_order``, ``shrink``,
    ``diag_floor`` as in GPTQ) or ``round`` (each weight to its nearest grid value)."""

    type: str = "Q4_K"
    importance: bool = True
    solver: str = "gptq"
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = True
    shrink: float = 0.0
    diag_floor: float = 0.0

    def __post_init__(self):
        if self.type not in TYPES:
            raise RecipeError(f"type={self.type!r}: expected one of {', '.join(TYPES)}")
        if self.solver not in SOLVERS:
            raise RecipeError(f"solver={self.solver!r}: expected one of {', '.join(SOLVERS)}")
        if not isinstance(self.importance, bool) or not isinstance(self.act_order, bool):
            raise RecipeError("importance and act_order are true or false")
        validate_solver_fields(self.block_size, self.damp)
        validate_regularizers(self.shrink, self.diag_floor)

    def check_layer(self, out_features: int, in_features: int, where: str) -> None:
        """Checked by the plan on every targeted linear before anything changes."""
        if in_features % 32:
            raise RecipeError(f"{where}: {in_features} input columns; GGUF blocks need a multiple of 32")


def _k_target(W: torch.Tensor, importance: torch.Tensor | None, bits: int):
    """The Q4_K / Q5_K grid fitted to ``W`` [R, C], its codes [C, R] and the sweep's target:
    each column's codes ``clamp(round((w + dmin*m) / (d*sc)), 0, 2^bits - 1)`` on that fixed
    grid (a group whose scale is 0 keeps the search's codes)."""
    R, C = W.shape
    p = k_params(W, importance=importance, bits=bits)
    top, group = nmax(bits), p.group
    s, mn = (t.reshape(R, C // group).t().contiguous() for t in p.scale_min())  # [groups, R]
    live = s > 0
    safe = torch.where(live, s, torch.ones_like(s))
    codes_t = p.codes.t().contiguous()

    def target(blk: SweepBlock, i: int, c: int, w: torch.Tensor, q: torch.Tensor) -> None:
        g = c // group
        u = torch.round((w + mn[g]) / safe[g]).clamp_(0, top)
        u = torch.where(live[g], u, codes_t[c])
        codes_t[c] = u
        torch.sub(s[g] * u, mn[g], out=q)

    return p, codes_t, target


def _iq4_target(W: torch.Tensor, importance: torch.Tensor | None, xs: bool):
    """The IQ4_NL / IQ4_XS grid fitted to ``W``, its codes [C, R] and the sweep's target: each
    column's nearest table level at its block's fixed scale."""
    p = iq4_params(W, importance, xs=xs)
    s = p.scales().t().contiguous()  # [blocks, R]
    inv = torch.where(s != 0, 1.0 / torch.where(s != 0, s, torch.ones_like(s)), torch.zeros_like(s))
    table = levels(W.device)
    codes_t = p.codes.t().contiguous()

    def target(blk: SweepBlock, i: int, c: int, w: torch.Tensor, q: torch.Tensor) -> None:
        g = c // IQ4_BLOCK
        u = nearest_level(w * inv[g])
        codes_t[c] = u
        torch.mul(s[g], table[u], out=q)

    return p, codes_t, target


def grid_gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    qtype: str = "Q4_K",
    importance: bool,
    block_size: int,
    damp: float,
    act_order: bool,
    shrink: float = 0.0,
    diag_floor: float = 0.0,
    name: str | None = None,
    hessian_owned: bool = False,
) -> tuple[GPTQResult, KParams | IQ4Params]:
    """GPTQ onto the ``Q4_K`` / ``Q5_K`` / ``IQ4_NL`` / ``IQ4_XS`` grid fitted to ``weight``
    [R, C] before the sweep (as GPTQ's static groups): (result with the dequantized weight, the
    grid with the sweep's codes; the importance is the regularized diag(H), as in ``gptq``:
    ``shrink`` keeps the diagonal, ``diag_floor`` raises it)."""
    with solver_threads(weight.device):
        W, H, dead = prepare(weight, hessian, name, owned=hessian_owned)
        del hessian
        regularize(H, shrink=shrink, diag_floor=diag_floor)
        imp = torch.diagonal(H).clone() if importance else None
        p, codes_t, target = _k_target(W, imp, K_BITS[qtype]) if qtype in K_BITS else _iq4_target(W, imp, qtype == "IQ4_XS")
        res = sweep_solve(W, H, dead, target, qparams=lambda: None, block_size=block_size, damp=damp, act_order=act_order, name=name)
        p.codes = codes_t.t().contiguous()
        return res, p


def own_grid(W: torch.Tensor, importance: torch.Tensor | None, qtype: str) -> KParams | IQ4Params:
    """The ``Q4_K`` / ``Q5_K`` / ``IQ4_NL`` / ``IQ4_XS`` grid of ``W`` by its search alone (``solver: round``)."""
    if qtype in K_BITS:
        return k_params(W, importance=importance, bits=K_BITS[qtype])
    return iq4_params(W, importance, xs=qtype == "IQ4_XS")


@register(
    "kquant",
    KQuant,
    needs=("hessian",),
    summary="GGUF K-quants and IQ4 (Q2_K-Q6_K, IQ4_NL, IQ4_XS; Q4_0/Q5_0/Q5_1/Q8_0 in llama.cpp's mixtures) with GPTQ and an importance matrix",
)
def kquant(ctx: ModuleContext, cfg: KQuant) -> None:
    hessian, owned = ctx.take("hessian")
    C = ctx.weight.shape[1]
    chosen = ctx.settings.get("gguf_type", cfg.type)
    qtype = storable_type(chosen, C)
    rec = ctx.record
    rec.notes.update(gguf_type=qtype, solver=cfg.solver, importance=cfg.importance)
    if qtype != chosen:
        rec.notes["gguf_fallback_from"] = chosen
    common = dict(block_size=cfg.block_size, damp=cfg.damp, act_order=cfg.act_order, name=ctx.name, hessian_owned=owned)
    reg = dict(shrink=1.0, diag_floor=0.0) if cfg.solver == "round" else dict(shrink=cfg.shrink, diag_floor=cfg.diag_floor)
    if qtype in OWN_FORMS:
        if cfg.solver == "round":
            W, H, _ = prepare(ctx.weight, hessian, ctx.name, owned=owned)  # dead inputs weigh as an average one
            p = own_grid(W, torch.diagonal(H).clone() if cfg.importance else None, qtype)
            ctx.set_weight(p.dequantize())
        else:
            res, p = grid_gptq(ctx.weight, hessian, qtype=qtype, importance=cfg.importance, **reg, **common)
            ctx.set_weight(res.weight)
            record_solver_notes(rec, res, "gptq_loss")
        rec.form = OWN_FORMS[qtype]
        rec.payload = {k: v for k, v in vars(p).items() if k in ("codes", "d", "dmin", "sc", "m") and v is not None}
        return
    args = grid_args(qtype, cfg.importance)
    res = gptq_quantize(ctx.weight, hessian, args, static_groups=True, **reg, **common)
    ctx.set_weight(res.weight)
    rec.weight_args = args
    rec.qparams = res.qparams
    record_solver_notes(rec, res, "gptq_loss")
