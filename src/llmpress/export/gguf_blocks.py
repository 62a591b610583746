"""llmpress integer grids as GGUF block types, exactly or not at all.

A compressed linear maps onto a GGUF block type only where the two grids coincide value
for value (byte layouts: :mod:`llmpress.export.gguf_layouts`; blocks run along a row, the
input dimension):

- ``Q4_0`` / ``Q5_0``: llmpress's symmetric int4 / int5 grid with groups of 32, ``d`` = its
  scale (``signed_scale``, llama.cpp's own ``d = x_m / -8`` or ``/ -16`` with ``d`` negative
  where the extreme is positive; ``full_range`` or plain: codes -8..7 / -16..15 each way);
- ``Q8_0``: symmetric int8, groups of 32 (llama.cpp's ``d = max|x| / 127`` is the plain
  symmetric grid, ``rtn-q8_0``);
- ``Q4_1`` / ``Q5_1``: asymmetric int4 / int5, groups of 32, ``d`` = scale,
  ``m = -zero_point * scale``;
- ``Q6_K``: symmetric int6 in groups of 16 with two-level scales in super-blocks of 256
  (``super_block: 256``): the group scales are ``d * sc`` with fp16 ``d`` and int8 ``sc``;
- ``Q3_K``: the same with int3 codes and 6-bit ``sc`` (``group_scale_bits: 6``);
- ``Q2_K`` / ``Q4_K`` / ``Q5_K``: the ``q2_k`` / ``q4_k`` / ``q5_k`` storage forms (the ``kquant`` method), whose
  grids are GGUF's own: their tensors are the block's fields;
- ``IQ4_NL`` / ``IQ4_XS``: the ``iq4_nl`` / ``iq4_xs`` storage forms (``kquant``), likewise.

Exact means: every stored scale (and ``m``; ``Q6_K``: ``d`` and ``sc``) is representable,
and the gguf package's own dequantization of the blocks equals llmpress's dequantized weight
bit for bit (checked for every tensor, :func:`to_blocks`). Quantizing with ``scale_dtype:
float16`` (the GGUF presets) makes the scales so. Anything else (other group sizes or bit
widths, act-order column groups, kept outliers, activation quantization, low-rank or
sparsity-only forms) has no exact block type: :func:`block_type` says why and which preset
exports.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError
from ..storage.form import LinearSpec, decode_weight
from ..storage.forms.iq4 import params_of as iq4_params_of
from ..storage.forms.q4_k import params_of
from ..storage.grid import decode_quant
from .gguf_layouts import (
    QK,
    QK_K,
    fp16_exact,
    iq4_nl_blocks,
    iq4_xs_blocks,
    q2_k_blocks,
    q3_k_blocks,
    q4_k_blocks,
    q5_k_blocks,
    q6_k_blocks,
    q6_k_scales,
    small_blocks,
)

# (bits, symmetric) of a group-32 grid -> its block type
SMALL = {(4, True): "Q4_0", (4, False): "Q4_1", (5, True): "Q5_0", (5, False): "Q5_1", (8, True): "Q8_0"}
K_FORMS = {"q2_k": ("Q2_K", q2_k_blocks), "q4_k": ("Q4_K", q4_k_blocks), "q5_k": ("Q5_K", q5_k_blocks)}  # storage form -> (block type, layout)
IQ4_FORMS = {"iq4_nl": "IQ4_NL", "iq4_xs": "IQ4_XS"}
OWN_GRIDS = {**{k: v[0] for k, v in K_FORMS.items()}, **IQ4_FORMS}  # forms whose tensors are a block type's fields
Q6_K_GRID = "bits: 6, group_size: 16, super_block: 256, signed_scale: true, scale_dtype: float16"
TWO_LEVEL = {(6, 8): "Q6_K", (3, 6): "Q3_K"}  # (bits, group_scale_bits) of a symmetric group-16 grid in runs of 256


def _qtype(name: str):
    from gguf import GGMLQuantizationType

    return getattr(GGMLQuantizationType, name)


def nearest_preset(spec: LinearSpec) -> str:
    """The preset whose grid exports, nearest to the layer's."""
    a = spec.weight_args
    if a is not None and a.kind == "int" and a.bits >= 7:
        return "rtn-q8_0"
    if a is not None and a.kind == "int" and a.bits >= 5:
        return "gptq-q5_0 (or rtn-q5_0)"
    if a is not None and a.kind == "int" and not a.symmetric:
        return "rtn-q4_1"
    return "gptq-q4_0 (or awq-gptq-q4_0, rtn-q4_0)"


def _why_not_grid(spec: LinearSpec) -> str | None:
    """Why a quantized layer's integer grid has no block type (None: it has one)."""
    a = spec.weight_args
    if a.super_block:
        if (a.symmetric, a.group_size, a.super_block) != (True, 16, QK_K) or (a.bits, a.group_scale_bits) not in TWO_LEVEL:
            return f"two-level scales map to Q6_K ({Q6_K_GRID}) or Q3_K (the same with bits: 3, group_scale_bits: 6) only"
        if spec.in_features % QK_K:
            return f"{TWO_LEVEL[(a.bits, a.group_scale_bits)]} needs rows of a multiple of {QK_K} weights"
    elif a.granularity != "group" or a.group_size != QK:
        return "GGUF blocks hold 32 weights with one scale each (Q6_K: 16 with two-level scales in super-blocks of 256)"
    if spec.has_g_idx:
        return "act-order column groups (use static_groups: true)"
    if spec.n_exceptions:
        return f"{spec.n_exceptions} full-precision outlier weights"
    if not a.super_block and (a.bits, a.symmetric) not in SMALL:
        return f"no {a.bits}-bit {'symmetric' if a.symmetric else 'asymmetric'} block type"
    return None


def _why_not(spec: LinearSpec) -> str | None:
    """Why the layer's stored form has no exact GGUF block type (None: it has one)."""
    a = spec.weight_args
    if spec.kind == "dense":
        if spec.act_args is not None and a is None:
            return f"activation quantization ({spec.act_args.describe()}) without weight quantization"
        return "weights stored dense, off their recorded grid"
    if spec.kind in OWN_GRIDS:
        return f"activation quantization ({spec.act_args.describe()}), which GGUF files do not carry" if spec.act_args else None
    if spec.kind != "quant":
        return {"lowrank": "low-rank factors", "sparse": "sparsity without a quantized grid"}.get(spec.kind, f"storage form {spec.kind!r}")
    if spec.act_args is not None:
        return f"activation quantization ({spec.act_args.describe()}), which GGUF files do not carry"
    if a.kind != "int":
        return f"{a.kind} codes"
    return _why_not_grid(spec)


def block_type(name: str, spec: LinearSpec) -> str:
    """``Q4_0`` / ``Q4_1`` / ``Q5_0`` / ``Q5_1`` / ``Q8_0`` / ``Q2_K`` / ``Q3_K`` / ``Q6_K`` / ``Q4_K`` / ``Q5_K`` /
    ``IQ4_NL`` / ``IQ4_XS`` for the layer, or a
    UserError naming it, its grid and the nearest preset that exports."""
    why = _why_not(spec)
    if why is not None:
        grid = spec.weight_args.describe() if spec.weight_args is not None else spec.kind
        raise UserError(f"layer {name} ({grid}) has no exact GGUF form: {why}; compress with a group-32 preset such as {nearest_preset(spec)}")
    if spec.kind in OWN_GRIDS:
        return OWN_GRIDS[spec.kind]
    a = spec.weight_args
    return TWO_LEVEL[(a.bits, a.group_scale_bits)] if a.super_block else SMALL[(a.bits, a.symmetric)]


def encode_blocks(spec: LinearSpec, tensors: dict[str, torch.Tensor], qtype: str) -> np.ndarray | None:
    """uint8 [out, blocks * block bytes] of the layer in ``qtype``; None when a scale (or a
    minimum, or ``Q6_K``'s ``d`` / ``sc``) is not representable."""
    out_f, in_f = spec.out_features, spec.in_features
    if spec.kind in IQ4_FORMS:
        p = iq4_params_of(spec, tensors)
        if p.sc is None:
            return iq4_nl_blocks(p.codes.reshape(out_f, in_f // QK, QK), p.d).reshape(out_f, -1)
        return iq4_xs_blocks(p.codes.reshape(out_f, in_f // QK_K, QK_K), p.d, p.sc).reshape(out_f, -1)
    if spec.kind in K_FORMS:
        p = params_of(spec, tensors)
        n = in_f // QK_K
        return K_FORMS[spec.kind][1](p.codes.reshape(out_f, n, QK_K), p.d, p.sc, p.dmin, p.m).reshape(out_f, -1)
    d = decode_quant(spec, tensors)
    if qtype in ("Q6_K", "Q3_K"):
        ds = q6_k_scales(d.qparams.scale.float().reshape(out_f, in_f // QK_K, QK_K // 16), spec.weight_args.group_scale_bits)
        if ds is None:
            return None
        layout = q6_k_blocks if qtype == "Q6_K" else q3_k_blocks
        return layout(d.codes.reshape(out_f, in_f // QK_K, QK_K), *ds).reshape(out_f, -1)
    scale = d.qparams.scale.float().reshape(out_f, in_f // QK)
    minimum = -d.qparams.zero_point.float().reshape(out_f, in_f // QK) * scale if qtype in ("Q4_1", "Q5_1") else None
    if not all(fp16_exact(p) for p in (scale, minimum) if p is not None):
        return None
    return small_blocks(qtype, d.codes.reshape(out_f, in_f // QK, QK), scale, minimum).reshape(out_f, -1)


def dequantize_blocks(data: np.ndarray, qtype: str) -> np.ndarray:
    """The gguf package's own dequantization of ``data`` (float32 [out, in])."""
    from gguf.quants import dequantize

    return dequantize(data, _qtype(qtype))


def _not_exact(name: str, spec: LinearSpec, qtype: str) -> UserError:
    grid = spec.weight_args.describe()
    if qtype in ("Q6_K", "Q3_K"):
        return UserError(
            f"layer {name} ({grid}): its group scales are not d x a {spec.weight_args.group_scale_bits}-bit code of one float16 d "
            f"per 256 weights, so {qtype} would change its weights; compress with weights {{{Q6_K_GRID}}} (Q3_K: bits 3, group_scale_bits 6)"
        )
    what = "scales or scale x zero point products" if qtype in ("Q4_1", "Q5_1") else "scales"
    return UserError(
        f"layer {name} ({grid}): its {what} are not float16 values, so {qtype} (fp16 scales) would change its weights; "
        f"compress with scale_dtype: float16, as the preset {nearest_preset(spec)} does"
    )


def to_blocks(name: str, spec: LinearSpec, tensors: dict[str, torch.Tensor]) -> tuple[str, np.ndarray]:
    """(block type, uint8 blocks) of a compressed linear, checked: the gguf package's
    dequantization of the blocks equals llmpress's dequantized weight bit for bit; a
    UserError naming the layer otherwise."""
    qtype = block_type(name, spec)
    data = encode_blocks(spec, tensors, qtype)
    ref = decode_weight(spec, tensors, torch.float32).numpy()
    if data is None or not np.array_equal(dequantize_blocks(data, qtype).view(np.int32), ref.view(np.int32)):
        raise _not_exact(name, spec, qtype)
    return qtype, data
