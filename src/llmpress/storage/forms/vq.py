"""Storage form ``vq``: vector quantization (GPTVQ). Each vector of d consecutive input columns
of a row is stored as the (d b)-bit index of its codeword in the float16 table of its group of
input columns.

Tensors:

- ``codes``: the indices [out, in / d], packed into int32 words with
  :func:`llmpress.storage.grid.pack_unsigned` at d b bits each ([out, ceil(in / d / 32) * d b]);
- ``table``: float16 [G, 2^(d b), d]; with Gr = ``meta.row_groups`` (default 1) blocks of
  out / Gr rows and Gc = G / Gr groups of input columns, vector v (columns v d .. v d + d - 1)
  of row o uses table (o // (out / Gr)) Gc + v d // (in / Gc);
- ``scale``: float16 [out] (only with ``meta.row_scale``): row o's codewords are multiplied by it;
- with ``meta.table_bits`` = 8: ``table`` holds int8 entries and ``table_scale`` float16 [G]
  one scale per table (entry = int8 value times its table's scale).

``meta``: ``{"dim": d, "bits": b, "groups": G}`` (b: bits per weight), plus ``"row_scale": true``
when rows are scaled and ``"row_groups": Gr`` when Gr > 1.

Size, counted the same by :meth:`VQForm.bits_per_weight` (the report) and by the bytes the
checkpoint holds (when in / d is a multiple of 32): out * in * b + G * 2^(d b) * d * 16
(8-bit tables: G * (2^(d b) * d * 8 + 16)) (+ out * 16 with row scales).

The indices and tables come from the method (``record.payload``: ``codes`` [out, in / d],
``table``, optional ``scale``); they are stored only while the model's weight is still exactly what they decode to
(checked bit for bit; otherwise the writer stores the layer dense and says so). Runtime:
:class:`llmpress.runtime.vq_linear.VQLinear` (table lookup, then one GEMM: exact; ``backend``
``torch`` / ``dequant``), or for 16 to 256 codewords and rows in blocks of 16 on a CPU with llmpress's
kernels (``backend="auto"``) :class:`llmpress.runtime.vq_linear.LowbitVQLinear` (lookup tables
of the activations; equal up to float32 summation order).
compressed-tensors and GGUF have no such form: exporting refuses, naming the layer.
"""

from __future__ import annotations

import torch

from ...quant.vq import DIMS, MAX_BITS, MAX_INDEX_BITS, TABLE_BITS, TABLE_BITS_CHOICES, dequantize_tables, vq_bits, vq_lookup
from ...runtime.act_quant import ActQuantLinear
from ...runtime.vq_linear import LowbitVQLinear, VQLinear, vq_kernel_applies
from ..form import StorageForm, register_form
from ..grid import pack_unsigned, unpack_unsigned, words


@register_form("vq")
class VQForm(StorageForm):
    def check_spec(self, spec) -> None:
        d, b, g = (spec.meta.get(k) for k in ("dim", "bits", "groups"))
        if d not in DIMS or spec.in_features % d:
            raise ValueError(f"a vq layer needs meta.dim in {DIMS} dividing its {spec.in_features} input columns, found {d!r}")
        if not isinstance(b, int) or not 1 <= b <= MAX_BITS or d * b > MAX_INDEX_BITS:
            raise ValueError(f"a vq layer needs meta.bits in 1..{MAX_BITS} with dim * bits <= {MAX_INDEX_BITS}, found {b!r}")
        rg = spec.meta.get("row_groups", 1)
        if isinstance(rg, bool) or not isinstance(rg, int) or rg < 1 or spec.out_features % rg:
            raise ValueError(f"a vq layer's meta.row_groups divides its {spec.out_features} output rows, found {rg!r}")
        if not isinstance(g, int) or g < 1 or g % rg or spec.in_features % (g // rg) or (spec.in_features // (g // rg)) % d:
            raise ValueError(
                f"a vq layer needs meta.groups (row groups x column groups) dividing its {spec.in_features} input columns into whole vectors, found {g!r}"
            )
        if spec.meta.get("row_scale", False) not in (True, False):
            raise ValueError(f"a vq layer's meta.row_scale is true or false, found {spec.meta['row_scale']!r}")
        tb = spec.meta.get("table_bits", TABLE_BITS)
        if isinstance(tb, bool) or tb not in TABLE_BITS_CHOICES:
            raise ValueError(f"a vq layer's meta.table_bits is 16 or 8, found {tb!r}")

    def encode(self, state):
        p, w = state.payload, state.weight
        codes, table = p.get("codes"), p.get("table")
        if codes is None or table is None or w is None or table.dim() != 3:
            return None
        w = w.detach().cpu()
        R, C = w.shape
        G, K, d = table.shape
        ib = K.bit_length() - 1
        rg = p.get("row_groups", 1)
        if d not in DIMS or K != 1 << ib or ib % d or tuple(codes.shape) != (R, C // d) or G % rg or R % rg:
            return None
        gc = G // rg
        if C % gc or (C // gc) % d:
            return None
        tensors = {"codes": pack_unsigned(codes.cpu().long(), ib), "table": table.cpu().half().contiguous()}
        tq, ts = p.get("table_q"), p.get("table_scale")
        if tq is not None:  # 8-bit tables: int8 entries, a float16 scale per table
            if ts is None or tuple(tq.shape) != (G, K, d) or tuple(ts.shape) != (G,):
                return None
            tensors.update(table=tq.cpu().to(torch.int8).contiguous(), table_scale=ts.cpu().half().contiguous())
        scale = p.get("scale")
        if scale is not None:
            if tuple(scale.shape) != (R,):
                return None
            tensors["scale"] = scale.cpu().half().contiguous()
        meta = {
            "dim": d,
            "bits": ib // d,
            "groups": G,
            **({"row_scale": True} if scale is not None else {}),
            **({"row_groups": rg} if rg > 1 else {}),
            **({"table_bits": 8} if tq is not None else {}),
        }
        spec = self.spec(state, meta=meta)
        if not torch.equal(self.decode(spec, tensors, w.dtype), w):
            return None
        return spec, tensors

    def _codes(self, spec, tensors):
        d, b = spec.meta["dim"], spec.meta["bits"]
        return unpack_unsigned(tensors["codes"], d * b, spec.in_features // d).to(torch.int32)

    @staticmethod
    def _table(spec, tensors) -> torch.Tensor:
        """The tables as numbers: float16 as stored, or int8 entries times their scales (float32)."""
        if spec.meta.get("table_bits", TABLE_BITS) == 8:
            return dequantize_tables(tensors["table"], tensors["table_scale"])
        return tensors["table"]

    def decode(self, spec, tensors, dtype=torch.float32):
        return vq_lookup(self._table(spec, tensors), self._codes(spec, tensors), tensors.get("scale"), spec.meta.get("row_groups", 1)).to(dtype)

    def expected_shapes(self, spec):
        R, C = spec.out_features, spec.in_features
        d, b, G = spec.meta["dim"], spec.meta["bits"], spec.meta["groups"]
        shapes = {"codes": (R, words(C // d, d * b)), "table": (G, 1 << (d * b), d)}
        if spec.meta.get("table_bits", TABLE_BITS) == 8:
            shapes["table_scale"] = (G,)
        return {**shapes, "scale": (R,)} if spec.meta.get("row_scale") else shapes

    def bits_per_weight(self, state, dense_bits=16):
        table = state.payload.get("table")
        if table is None:  # no tables handed over: counted as the dense weight
            return float(dense_bits) + state.extra_bits / state.n_params
        G, K, d = table.shape
        scaled = state.payload.get("scale") is not None
        tb = 8 if state.payload.get("table_q") is not None else TABLE_BITS
        bits = vq_bits(state.out_features, state.in_features, d, (K.bit_length() - 1) // d, G, scaled, tb)
        return (bits + state.extra_bits) / state.n_params

    def stored_bits(self, spec, nbytes, scale_bits):
        return spec.out_features * spec.in_features * spec.meta["bits"] + 8 * (
            nbytes["table"] + nbytes.get("scale", 0) + nbytes.get("table_scale", 0)
        )

    def payload(self, spec, tensors):
        if not tensors:
            return {}
        out = {"codes": self._codes(spec, tensors), "table": self._table(spec, tensors), "row_groups": spec.meta.get("row_groups", 1)}
        if "table_scale" in tensors:
            out.update(table_q=tensors["table"], table_scale=tensors["table_scale"])
        return {**out, "scale": tensors["scale"]} if "scale" in tensors else out

    def build(self, spec, tensors, *, bias=None, backend="auto", device="cpu", act_dtype=None):
        if backend not in ("auto", "torch", "dequant"):
            raise ValueError(f"backend {backend!r} unknown; expected auto, torch or dequant")
        dev = torch.device(device)
        scale = tensors.get("scale")
        cls, rg = VQLinear, spec.meta.get("row_groups", 1)
        if backend == "auto" and dev.type == "cpu" and vq_kernel_applies(spec.out_features, tensors["table"].shape[1], rg):
            from ...runtime.cpu_kernels import kernels

            cls = LowbitVQLinear if kernels() is not None else VQLinear
        codes, table = self._codes(spec, tensors).to(dev), self._table(spec, tensors).to(dev)
        mod = cls(codes, table, scale=None if scale is None else scale.to(dev), bias=bias, row_groups=rg)
        return ActQuantLinear(mod, spec.act_args) if spec.act_args else mod
