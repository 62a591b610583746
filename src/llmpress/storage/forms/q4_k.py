"""Storage forms ``q4_k``, ``q5_k`` and ``q2_k``: GGUF's ``Q4_K`` / ``Q5_K`` / ``Q2_K`` grids
(:mod:`llmpress.quant.kquant`): asymmetric 4-bit (5-bit) groups of 32 (2-bit groups of 16)
whose scale and minimum are both two-level, so a weight is ``d * sc * u - dmin * m`` (``u`` in
0..15 / 0..31 / 0..3; one float16 ``d`` and ``dmin`` per super-block of 256 weights along the
row, 6-bit (Q2_K: 4-bit) ``sc`` and ``m`` per group).

Tensors, named after their role:

- ``codes``: ``u`` packed into int32 words with :func:`llmpress.storage.grid.pack_unsigned`
  along the input dimension ([out, in * b / 32], b = 4 or 5);
- ``d``, ``dmin``: float16 [out, in / 256];
- ``sc``, ``m``: uint8 [out, in / 256, 8] (values 0..63).

Size, counted the same by :meth:`Q4K.bits_per_weight` (the report) and :meth:`Q4K.stored_bits`
(the checkpoint): b bits per weight, 2 x 16 bits per 256 weights and 2 x 6 bits per 32, i.e.
4.5 (5.5) bits per weight, what a GGUF ``Q4_K`` (``Q5_K``) block of 144 (176) bytes per 256
weights holds (``Q2_K``: 2 + 0.125 + 8 / 16 = 2.625, 84 bytes); the checkpoint keeps ``sc`` and
``m`` in whole bytes.

The method (:mod:`llmpress.quant.q4k`) hands over ``codes`` [out, in] and the four grid
tensors (``record.payload``); the form stores them only while the model's weight is still
exactly what they decode to (checked bit for bit; otherwise the writer stores the layer dense
and says so). Runtime (:meth:`Q4K.build`): ``q4_k`` through llmpress's CPU int4 kernel with a
float offset per group, else (and ``q5_k`` always) the weight decoded once at load
(:class:`DequantLinear`, exact); llama.cpp serves the GGUF export with its own K-quant
kernels. GGUF: ``Q4_K`` / ``Q5_K``, byte for byte (:mod:`llmpress.export.gguf_blocks`);
compressed-tensors has no such grid and refuses, naming the layer.
"""

from __future__ import annotations

import torch

from ...quant.args import QuantArgs
from ...quant.core import QParams
from ...quant.kquant import GROUP, QK_K, KParams, group_of, nmax, smax_of
from ...runtime.act_quant import ActQuantLinear
from ...runtime.qlinear import DequantLinear, LowbitInt4Linear
from ..form import LinearSpec, register_form
from ..grid import Decoded, pack_unsigned, unpack_unsigned, words
from .own_grid import OwnGridForm, fp16_valued

CODE_BITS = {"q2_k": 2, "q4_k": 4, "q5_k": 5}


def grid_bits(bits: int) -> float:
    """``d``, ``dmin`` per 256 and ``sc``, ``m`` per group: 0.5 bits per weight for Q4_K / Q5_K
    (6-bit codes per 32), 0.625 for Q2_K (4-bit codes per 16)."""
    return (16 + 16) / QK_K + 2 * smax_of(bits).bit_length() / group_of(bits)


PAYLOAD = ("codes", "d", "dmin", "sc", "m")
KERNEL_ARGS = QuantArgs(bits=4, symmetric=False, granularity="group", group_size=GROUP)  # the int4 kernel's view: (u - z) * s


def params_of(spec: LinearSpec, tensors: dict[str, torch.Tensor]) -> KParams:
    """The stored grid (``spec.kind`` ``q4_k`` or ``q5_k``) as :class:`KParams` (float32
    ``d``/``dmin``, float32 codes)."""
    R, C = spec.out_features, spec.in_features
    bits = CODE_BITS[spec.kind]
    return KParams(
        d=tensors["d"].float(),
        dmin=tensors["dmin"].float(),
        sc=tensors["sc"].float(),
        m=tensors["m"].float(),
        codes=unpack_unsigned(tensors["codes"], bits, C).reshape(R, C).float(),
        bits=bits,
    )


@register_form("q4_k")
class Q4K(OwnGridForm):
    @property
    def code_bits(self) -> int:
        return CODE_BITS[self.name]

    def check_spec(self, spec: LinearSpec) -> None:
        if spec.in_features % QK_K:
            raise ValueError(f"a {self.name} layer needs a multiple of {QK_K} input columns, found {spec.in_features}")

    def params_of(self, spec, tensors):
        return params_of(spec, tensors)

    def total_bits(self) -> float:
        return self.code_bits + grid_bits(self.code_bits)

    def pack(self, payload, rows, cols):
        if any(payload.get(k) is None for k in PAYLOAD):
            return None
        n, per = cols // QK_K, QK_K // group_of(self.code_bits)
        shapes = {"codes": (rows, cols), "d": (rows, n), "dmin": (rows, n), "sc": (rows, n, per), "m": (rows, n, per)}
        if cols % QK_K or any(tuple(payload[k].shape) != v for k, v in shapes.items()):
            return None
        d, dmin = payload["d"].float(), payload["dmin"].float()
        if not (fp16_valued(d) and fp16_valued(dmin)):
            return None
        top = smax_of(self.code_bits)
        return {
            "codes": pack_unsigned(payload["codes"].long().clamp(0, nmax(self.code_bits)), self.code_bits),
            "d": d.half().contiguous(),
            "dmin": dmin.half().contiguous(),
            "sc": payload["sc"].clamp(0, top).to(torch.uint8).contiguous(),
            "m": payload["m"].clamp(0, top).to(torch.uint8).contiguous(),
        }

    def expected_shapes(self, spec):
        R, C = spec.out_features, spec.in_features
        n = C // QK_K
        per = QK_K // group_of(self.code_bits)
        return {"codes": (R, words(C, self.code_bits)), "d": (R, n), "dmin": (R, n), "sc": (R, n, per), "m": (R, n, per)}

    def build(self, spec, tensors, *, bias=None, backend="auto", device="cpu", act_dtype=None):
        """``backend="auto"`` on CPU, ``q4_k``: llmpress's int4 kernel (the packed codes, a float
        scale and offset per group: 6 bits per weight in memory; within float rounding of the
        exact weight); otherwise (``q5_k``: no 5-bit kernel), or where a group's scale is 0 with
        a nonzero minimum, the weight decoded once (:class:`DequantLinear`, exact)."""
        if backend not in ("auto", "torch", "dequant"):
            raise ValueError(f"backend {backend!r} unknown; expected auto, torch or dequant")
        kernel = backend == "auto" and self.code_bits == 4 and torch.device(device).type == "cpu"
        mod = _kernel_linear(spec, tensors, bias) if kernel else None
        if mod is None:
            mod = DequantLinear(self.decode(spec, tensors).to(device), bias)
        return ActQuantLinear(mod, spec.act_args) if spec.act_args else mod


@register_form("q5_k")
class Q5K(Q4K):
    """GGUF's ``Q5_K``: the ``q4_k`` form with 5-bit codes (5.5 bits per weight)."""


@register_form("q2_k")
class Q2K(Q4K):
    """GGUF's ``Q2_K``: 2-bit codes in groups of 16 with 4-bit ``sc`` / ``m`` (2.625 bits per weight)."""


def _kernel_linear(spec: LinearSpec, tensors: dict[str, torch.Tensor], bias) -> LowbitInt4Linear | None:
    """The int4 kernel's module: ``d*sc*u - dmin*m = (u - z) * s`` with ``s = d*sc``, ``z = dmin*m / s``."""
    from ...runtime.cpu_kernels import kernels

    if kernels() is None:
        return None
    p = params_of(spec, tensors)
    R, C = spec.out_features, spec.in_features
    s, mn = (t.reshape(R, C // GROUP) for t in p.scale_min())
    if bool(((s == 0) & (mn != 0)).any()):  # a constant group: no (u - z) * s form
        return None
    z = torch.where(s > 0, mn / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))
    decoded = Decoded(codes=p.codes.to(torch.int8), qparams=QParams(scale=s, zero_point=z), args=KERNEL_ARGS)
    return LowbitInt4Linear(decoded, GROUP, bias)
