"""Storage form ``quant``: integer grids (symmetric or not; per tensor, channel or group;
ternary and binary sign grids), with optional act-order groups and kept outliers.

Tensors, named after their role:

- ``qweight``: the integer codes, made unsigned and packed into int32 words with
  :func:`llmpress.quant.pack.pack_codes` along the input dimension
  ([out, ceil(in/32) * bits]);
- ``scale``: float32 [R, G] (one per tensor, output channel or group, as in
  :class:`~llmpress.quant.core.QParams`);
- ``zero_point`` (asymmetric only): unsigned codes of the zero points, transposed to
  [G, R] and packed along R (the grouping compressed-tensors uses, compact for both
  per-channel and per-group scales);
- ``g_idx`` (optional, int32 [in]): group of each input column, when a method assigned
  columns to groups out of order (act-order without static groups); absent otherwise;
- ``exc_index`` / ``exc_value`` (optional): weights kept off the grid at full precision
  (SpQR-style outliers, counted as CSR by the method): flat positions (int64, sorted) and
  their exact values; their codes are the zero code, so the weight is ``dequant(codes)``
  with those entries set.

Quantized sparse weights need no mask: a pruned weight is the zero code. Every encoding is
checked on the spot: the weight rebuilt from the tensors must equal the model's weight bit
for bit, or :meth:`IntGrid.encode` returns None (the writer then stores that weight dense,
and says so). The int8 output head is this form too (8-bit per-channel codes, served by
the int8 kernels; a tied embedding gathers rows of its codes, see export/packed_load.py).

Runtime (:meth:`IntGrid.build`): the fastest kernel of :mod:`llmpress.runtime.qlinear` that
applies, else :class:`~llmpress.runtime.qlinear.DequantLinear` (exact). compressed-tensors:
``pack-quantized`` (weight-only) or ``int-quantized`` (W8A8); ternary / binary codes,
act-order groups, kept outliers and unsupported activation schemes are refused.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ...errors import UserError
from ...quant.args import QuantArgs
from ...quant.core import QParams, bits_per_weight, compute_qparams
from ...runtime.act_quant import ActQuantLinear
from ...runtime.qlinear import (
    BACKENDS,
    KERNEL_ACT_DTYPE,
    DequantLinear,
    Int4Linear,
    Int8WeightOnlyLinear,
    LowbitInt4Linear,
    LowbitInt8Linear,
    int4_group_size,
    lowbit_int4_group_size,
)
from ..form import LayerState, LinearSpec, StorageForm, register_form
from ..grid import Decoded, codes_of, decode_qparams, decode_quant, dequant, dequant_decoded, pack, words, zero_code

# more off-grid weights than this share of a layer means the weight was changed after
# quantization (not an outlier list): store the layer dense instead
MAX_EXCEPTIONS = 0.05


@register_form("quant")
class IntGrid(StorageForm):
    ties_embedding = True

    def check_spec(self, spec: LinearSpec) -> None:
        if spec.weight_args is None:
            raise ValueError("a quantized layer needs 'weights'")

    def encode(self, state: LayerState):
        w = state.weight
        out_f, in_f = w.shape
        args, g_idx = state.weight_args, state.g_idx
        qp = state.qparams
        if qp is None:
            qp = compute_qparams(w, args)
        qp = QParams(scale=qp.scale.detach().float().cpu(), zero_point=None if qp.zero_point is None else qp.zero_point.detach().float().cpu())
        spec = self.spec(state, weight_args=args, has_g_idx=g_idx is not None)
        w = w.cpu()
        if args.granularity == "token" or (args.granularity == "group" and in_f % args.group_size):
            return None
        if tuple(qp.scale.shape) != spec.scale_shape:
            return None
        codes = codes_of(w, qp, args, g_idx)
        off = dequant(codes, qp, args, g_idx, w.dtype) != w
        n_exc = int(off.sum())
        tensors: dict[str, torch.Tensor] = {}
        if n_exc:
            if n_exc > MAX_EXCEPTIONS * w.numel():
                return None
            codes = torch.where(off, zero_code(qp, args, w.shape), codes)
            flat = off.reshape(-1).nonzero().reshape(-1)
            tensors["exc_index"] = flat.to(torch.int64)
            tensors["exc_value"] = w.reshape(-1)[flat].contiguous()
        tensors["qweight"] = pack(codes, args)
        tensors["scale"] = qp.scale.contiguous()
        if args.has_zero_point:
            tensors["zero_point"] = pack(qp.zero_point.t().contiguous(), args)
        if g_idx is not None:
            tensors["g_idx"] = g_idx.contiguous()
        spec.n_exceptions = n_exc
        if not torch.equal(self.decode(spec, tensors, w.dtype), w):  # the stored form must give back the very same weight
            return None
        return spec, tensors

    def decode(self, spec, tensors, dtype=torch.float32):
        return dequant_decoded(decode_quant(spec, tensors), dtype)

    def expected_shapes(self, spec):
        o, i = spec.out_features, spec.in_features
        a = spec.weight_args
        shapes = {"qweight": (o, words(i, a.bits)), "scale": spec.scale_shape}
        if a.has_zero_point:
            r, g = spec.scale_shape
            shapes["zero_point"] = (g, words(r, a.bits))
        if spec.has_g_idx:
            shapes["g_idx"] = (i,)
        if spec.n_exceptions:
            shapes["exc_index"] = (spec.n_exceptions,)
            shapes["exc_value"] = (spec.n_exceptions,)
        return shapes

    def bits_per_weight(self, state, dense_bits=16):
        """Codes, scales at ``scale_bits`` and zero points at ``bits``, plus what the method
        accounted beside them (kept outliers as CSR: 16-bit value + 16-bit column per weight,
        32-bit row pointers)."""
        return bits_per_weight(state.weight_args, state.in_features, state.out_features) + state.extra_bits / state.n_params

    def stored_bits(self, spec, nbytes, scale_bits):
        a = spec.weight_args
        groups = spec.scale_shape[0] * spec.scale_shape[1]
        n = spec.out_features * spec.in_features
        grid = n * a.bits + groups * (scale_bits + (a.bits if a.has_zero_point else 0))
        if a.super_block and scale_bits < 32:  # two-level scales as GGUF's Q6_K / Q3_K hold them (the file: float32 products)
            grid = n * a.bits + groups * a.group_scale_bits + n // a.super_block * scale_bits
        return grid + sum(8 * nbytes[k] for k in ("g_idx", "exc_index", "exc_value") if k in nbytes)

    def qparams(self, spec, tensors):
        return decode_qparams(spec, tensors)

    def build(self, spec, tensors, *, bias=None, backend="auto", device="cpu", act_dtype=None):
        """``backend="dequant"``: :class:`DequantLinear` (exact); ``"auto"``: the fastest kernel
        for the scheme on ``device`` (llmpress's CPU kernels where they build, else torch's);
        ``"torch"``: torch's kernels only. W8A8 runs the integer GEMM (it quantizes the
        activations itself); other activation schemes wrap the module in ActQuantLinear."""
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r} unknown; expected one of {', '.join(BACKENDS)}")
        act_dtype = act_dtype or KERNEL_ACT_DTYPE
        d = decode_quant(spec, tensors)
        mod = None
        if backend != "dequant" and d.g_idx is None and d.exc_index is None:
            w8a8 = _w8a8_linear(d, spec, bias)
            if w8a8 is not None:
                return w8a8
            mod = _kernel_linear(d, spec, bias, backend, torch.device(device).type == "cpu", act_dtype)
        if mod is None:
            mod = DequantLinear(d, bias)
        return ActQuantLinear(mod, spec.act_args) if spec.act_args else mod

    def ct_scheme(self, name, spec):
        a, act = spec.weight_args, spec.act_args
        why = None
        if a.kind != "int":
            why = f"{a.kind} weights"
        elif spec.has_g_idx:
            why = "a column group index (act-order groups)"
        elif spec.n_exceptions:
            why = f"{spec.n_exceptions} full-precision outlier weights"
        elif act is not None and (act.kind != "int" or act.granularity not in ("token", "tensor", "group")):
            why = f"activations {act.describe()}"
        elif act is not None and (act.clip_ratio != 1.0 or act.observer != "minmax"):
            why = f"activations {act.describe()} (dynamic quantization there takes the plain min/max range)"
        if why:
            raise UserError(f"layer {name}: {why} cannot be stored in compressed-tensors; export a scheme without it")
        scheme = {"weights": _ct_args(a, False), "input_activations": _ct_args(act, True) if act else None, "output_activations": None}
        return scheme, ("int-quantized" if act is not None else "pack-quantized")

    def ct_tensors(self, name, spec, tensors, fmt, dtype):
        a = spec.weight_args
        out, inp = spec.out_features, spec.in_features
        scale = tensors["scale"].to(dtype)
        scale = scale.reshape(1) if a.granularity == "tensor" else scale
        res = {f"{name}.weight_scale": scale.contiguous()}
        half = 1 << (a.bits - 1)
        if fmt == "pack-quantized":
            res[f"{name}.weight_packed"] = tensors["qweight"][:, : -(-inp * a.bits // 32)].contiguous()
            res[f"{name}.weight_shape"] = torch.tensor([out, inp], dtype=torch.int64)
            if a.has_zero_point and a.granularity == "tensor":  # not packed for per-tensor scales
                zp = decode_qparams(spec, tensors).zero_point.reshape(1) - half
                res[f"{name}.weight_zero_point"] = zp.to(torch.int8)
            elif a.has_zero_point:  # ours: [G, words(out)] packed along out; theirs: [ceil(out*bits/32), G]
                res[f"{name}.weight_zero_point"] = tensors["zero_point"][:, : -(-out * a.bits // 32)].t().contiguous()
        else:
            d = decode_quant(spec, tensors)
            codes = d.codes.to(torch.int16) - (0 if a.symmetric else half)
            res[f"{name}.weight"] = codes.to(torch.int8).contiguous()
            if a.has_zero_point:
                zp = d.qparams.zero_point - half
                res[f"{name}.weight_zero_point"] = (zp.reshape(1) if a.granularity == "tensor" else zp).to(torch.int8).contiguous()
        return res


def _kernel_linear(d, spec: LinearSpec, bias, backend: str, cpu: bool, act_dtype) -> nn.Module | None:
    """The integer kernel module for a plain grid (no act-order groups, no outliers), or None."""
    a = spec.weight_args
    own = None
    if backend == "auto" and cpu:
        from ...runtime.cpu_kernels import kernels

        own = kernels()
    if own is not None and _is_int(a, 4) and lowbit_int4_group_size(spec):
        return LowbitInt4Linear(d, lowbit_int4_group_size(spec), bias)
    if own is not None and _is_int(a, 8) and a.symmetric and a.granularity in ("channel", "tensor") and spec.in_features % 16 == 0:
        return LowbitInt8Linear(d, bias)
    if cpu and _is_int(a, 4) and spec.out_features % 16 == 0 and int4_group_size(spec):
        return Int4Linear(d, int4_group_size(spec), bias, act_dtype)
    if cpu and _is_int(a, 8) and a.symmetric and a.granularity in ("channel", "tensor"):
        return Int8WeightOnlyLinear(d, bias, act_dtype)
    return None


def _is_int(a: QuantArgs | None, bits: int) -> bool:
    return a is not None and a.kind == "int" and a.bits == bits


def _w8a8_linear(d: Decoded, spec: LinearSpec, bias):
    """runtime/int8.py's Int8Linear for W8A8, or None (not applicable / not installed)."""
    a, act = spec.weight_args, spec.act_args
    if not (_is_int(a, 8) and a.symmetric and a.granularity in ("channel", "tensor")):
        return None
    if not (_is_int(act, 8) and act.symmetric and act.granularity == "token"):
        return None
    try:
        from ...runtime.int8 import Int8Linear
    except ImportError:
        return None
    scale = d.qparams.scale.float().reshape(-1).expand(spec.out_features).contiguous()
    return Int8Linear(d.codes.to(torch.int8), scale, bias)


def _ct_args(a: QuantArgs, dynamic: bool) -> dict:
    strategy = {"group": "group", "channel": "channel", "tensor": "tensor", "token": "token"}[a.granularity]
    return {
        "num_bits": a.bits,
        "type": "int",
        "symmetric": a.symmetric,
        "group_size": a.group_size if strategy == "group" else None,
        "strategy": strategy,
        "dynamic": dynamic,
    }
