"""llmpress integer grids as GGUF block types, exactly or not at all.

A compressed linear maps onto a GGUF block type only where the two grids coincide value
for value (``ggml-common.h`` layouts; 32 weights of a row per block, along the input
dimension):

- ``Q4_0`` (18 bytes): fp16 ``d``, 16 bytes of 4-bit codes (byte j: weight j in the low
  nibble, weight j + 16 in the high one), value ``(q - 8) * d``: llmpress's symmetric int4
  grid with groups of 32 (``signed_scale``, llama.cpp's own ``d = x_m / -8`` with ``d``
  negative where the extreme is positive, ``full_range`` or plain: codes -8..7 each way),
  ``d`` = its scale;
- ``Q8_0`` (34 bytes): fp16 ``d``, 32 int8 codes, value ``q * d``: symmetric int8, groups of 32
  (llama.cpp's ``d = max|x| / 127`` is the plain symmetric grid, ``rtn-q8_0``);
- ``Q4_1`` (20 bytes): fp16 ``d``, fp16 ``m``, 16 bytes of codes 0..15 as ``Q4_0``, value
  ``q * d + m``: asymmetric int4, groups of 32, ``d`` = scale, ``m = -zero_point * scale``.

Exact means: every stored scale (and ``m``) is a float16 value, and the gguf package's own
dequantization of the blocks equals llmpress's dequantized weight bit for bit (checked for
every tensor, :func:`to_blocks`). Quantizing with ``scale_dtype: float16`` (the ``*-q4_0``,
``rtn-q8_0``, ``rtn-q4_1`` presets) makes the scales so. Anything else (other group sizes
or bit widths, act-order column groups, kept outliers, activation quantization, low-rank or
sparsity-only forms) has no exact block type: :func:`block_type` says why and which preset
exports.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError
from ..storage.form import LinearSpec, decode_weight
from ..storage.grid import decode_quant

QK = 32  # weights per block of Q4_0 / Q4_1 / Q8_0


def _qtypes():
    from gguf import GGMLQuantizationType as T

    return {"Q4_0": T.Q4_0, "Q4_1": T.Q4_1, "Q8_0": T.Q8_0}


def nearest_preset(spec: LinearSpec) -> str:
    """The preset whose grid exports, nearest to the layer's."""
    a = spec.weight_args
    if a is not None and a.kind == "int" and a.bits >= 6:
        return "rtn-q8_0"
    if a is not None and a.kind == "int" and not a.symmetric:
        return "rtn-q4_1"
    return "gptq-q4_0 (or awq-gptq-q4_0, rtn-q4_0)"


def _why_not(spec: LinearSpec) -> str | None:
    """Why the layer's stored form has no exact GGUF block type (None: it has one)."""
    a = spec.weight_args
    if spec.kind == "dense":
        if spec.act_args is not None and a is None:
            return f"activation quantization ({spec.act_args.describe()}) without weight quantization"
        return "weights stored dense, off their recorded grid"
    if spec.kind != "quant":
        return {"lowrank": "low-rank factors", "sparse": "sparsity without a quantized grid"}.get(spec.kind, f"storage form {spec.kind!r}")
    if spec.act_args is not None:
        return f"activation quantization ({spec.act_args.describe()}), which GGUF files do not carry"
    if a.kind != "int":
        return f"{a.kind} codes"
    if a.granularity != "group" or a.group_size != QK:
        return "GGUF blocks hold 32 weights with one scale each"
    if spec.has_g_idx:
        return "act-order column groups (use static_groups: true)"
    if spec.n_exceptions:
        return f"{spec.n_exceptions} full-precision outlier weights"
    if not ((a.bits == 4) or (a.bits == 8 and a.symmetric)):
        return f"no {a.bits}-bit {'symmetric' if a.symmetric else 'asymmetric'} block type"
    return None


def block_type(name: str, spec: LinearSpec) -> str:
    """``Q4_0`` / ``Q8_0`` / ``Q4_1`` for the layer, or a UserError naming it, its grid and the
    nearest preset that exports."""
    why = _why_not(spec)
    if why is not None:
        grid = spec.weight_args.describe() if spec.weight_args is not None else spec.kind
        raise UserError(f"layer {name} ({grid}) has no exact GGUF form: {why}; compress with a group-32 preset such as {nearest_preset(spec)}")
    a = spec.weight_args
    return "Q8_0" if a.bits == 8 else ("Q4_0" if a.symmetric else "Q4_1")


def _fp16_bytes(x: torch.Tensor) -> np.ndarray:
    """float32 [R, G] -> uint8 [R, G, 2] of its float16 values (little-endian)."""
    return x.to(torch.float16).contiguous().numpy().view(np.uint8).reshape(*x.shape, 2)


def _nibbles(u: torch.Tensor) -> np.ndarray:
    """uint8 codes 0..15 [R, G, 32] -> [R, G, 16]: weight j low nibble, j + 16 high."""
    u = u.to(torch.uint8)
    return (u[..., : QK // 2] | (u[..., QK // 2 :] << 4)).contiguous().numpy()


def _fp16_exact(x: torch.Tensor) -> bool:
    h = x.to(torch.float16)
    return bool(torch.isfinite(h).all()) and torch.equal(h.float(), x.float())


def encode_blocks(spec: LinearSpec, tensors: dict[str, torch.Tensor], qtype: str) -> np.ndarray | None:
    """uint8 [out, in/32 * block bytes] of the layer in ``qtype``; None when a scale (or
    ``Q4_1``'s minimum) is not a float16 value."""
    d = decode_quant(spec, tensors)
    out_f, in_f = spec.out_features, spec.in_features
    scale = d.qparams.scale.float().reshape(out_f, in_f // QK)
    codes = d.codes.to(torch.int16).reshape(out_f, in_f // QK, QK)
    parts = [scale]
    if qtype == "Q4_1":
        parts.append(-d.qparams.zero_point.float().reshape(out_f, in_f // QK) * scale)
    if not all(_fp16_exact(p) for p in parts):
        return None
    heads = [_fp16_bytes(p) for p in parts]
    if qtype == "Q8_0":
        body = codes.to(torch.int8).contiguous().numpy().view(np.uint8)
    else:
        body = _nibbles(codes + (8 if qtype == "Q4_0" else 0))
    return np.concatenate([*heads, body], axis=-1).reshape(out_f, -1)


def dequantize_blocks(data: np.ndarray, qtype: str) -> np.ndarray:
    """The gguf package's own dequantization of ``data`` (float32 [out, in])."""
    from gguf.quants import dequantize

    return dequantize(data, _qtypes()[qtype])


def to_blocks(name: str, spec: LinearSpec, tensors: dict[str, torch.Tensor]) -> tuple[str, np.ndarray]:
    """(block type, uint8 blocks) of a compressed linear, checked: the gguf package's
    dequantization of the blocks equals llmpress's dequantized weight bit for bit; a
    UserError naming the layer otherwise."""
    qtype = block_type(name, spec)
    data = encode_blocks(spec, tensors, qtype)
    ref = decode_weight(spec, tensors, torch.float32).numpy()
    if data is None or not np.array_equal(dequantize_blocks(data, qtype).view(np.int32), ref.view(np.int32)):
        grid = spec.weight_args.describe()
        what = "scales" if qtype != "Q4_1" else "scales or scale x zero point products"
        raise UserError(
            f"layer {name} ({grid}): its {what} are not float16 values, so {qtype} (fp16 scales) would change its weights; "
            f"compress with scale_dtype: float16, as the preset {nearest_preset(spec)} does"
        )
    return qtype, data
