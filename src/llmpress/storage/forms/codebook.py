"""Storage form ``codebook``: b-bit indices into float16 tables, one table of 2^b entries per
output row or per group of input columns (non-uniform quantization: SqueezeLLM, GPTQ onto
tables), with optional weights kept off the tables in CSR.

Tensors, named after their role:

- ``codes``: the indices, packed into int32 words with :func:`llmpress.storage.grid.pack_unsigned`
  along the input dimension ([out, ceil(in/32) * bits], the bit stream of
  :mod:`llmpress.quant.pack`);
- ``table``: float16 [out, G, 2^bits], ascending; column j of a row uses table j // (in / G);
- ``exc_rowptr`` int32 [out + 1], ``exc_col`` int16 [nnz] (the column as an unsigned 16-bit
  number), ``exc_value`` float16 [nnz] (optional): the kept weights, as CSR; their codes are
  ignored.

``meta``: ``{"bits": b, "groups": G}``; ``exceptions`` (the spec's field) = nnz.

Size, counted the same by :meth:`Codebook.bits_per_weight` (the report) and by the bytes the
checkpoint holds (when ``in`` is a multiple of 32): out * in * b + out * G * 2^b * 16 +
nnz * (16 + 16) + (out + 1) * 32 (the last two only with kept weights).

The indices, tables and kept positions come from the method (``record.payload``: ``codes``
uint8 [out, in], ``table``, ``exc_index`` int64 flat positions); the form stores them only
while the model's weight is still exactly what they decode to (checked bit for bit; otherwise
the writer stores the layer dense and says so).

Runtime (:mod:`llmpress.runtime.lut_linear`): ``backend="dequant"`` :class:`LutLinear` (table
lookup, then one GEMM: exact); ``"auto"`` on CPU :class:`LowbitLutLinear` (llmpress's
lookup-table kernel, up to 16 entries, groups of a multiple of 32 columns) where it applies.
compressed-tensors and GGUF have no such form: exporting refuses, naming the layer.
"""

from __future__ import annotations

import torch

from ...quant.kmeans import MAX_BITS
from ...quant.nuq import codebook_bits
from ...runtime.act_quant import ActQuantLinear
from ...runtime.lut_linear import LowbitLutLinear, LutLinear, lut_kernel_applies, lut_weight
from ..form import LinearSpec, StorageForm, register_form
from ..grid import pack_unsigned, unpack_unsigned, words

MAX_COLUMNS = 1 << 16  # columns of kept weights are stored as unsigned 16-bit numbers


def _csr(flat: torch.Tensor, values: torch.Tensor, rows: int, cols: int) -> dict[str, torch.Tensor]:
    r, c = flat // cols, flat % cols
    rowptr = torch.nn.functional.pad(torch.bincount(r, minlength=rows).cumsum(0), (1, 0))
    col16 = torch.where(c >= 1 << 15, c - (1 << 16), c).to(torch.int16)
    return {"exc_rowptr": rowptr.to(torch.int32), "exc_col": col16, "exc_value": values.half()}


def _flat(tensors: dict[str, torch.Tensor], rows: int, cols: int) -> torch.Tensor | None:
    if "exc_rowptr" not in tensors:
        return None
    counts = tensors["exc_rowptr"].long().diff()
    r = torch.repeat_interleave(torch.arange(rows), counts)
    return r * cols + (tensors["exc_col"].long() & 0xFFFF)


@register_form("codebook")
class Codebook(StorageForm):
    def check_spec(self, spec: LinearSpec) -> None:
        b, g = spec.meta.get("bits"), spec.meta.get("groups")
        if not isinstance(b, int) or not 1 <= b <= MAX_BITS:
            raise ValueError(f"a codebook layer needs meta.bits in 1..{MAX_BITS}, found {b!r}")
        if not isinstance(g, int) or g < 1 or spec.in_features % g:
            raise ValueError(f"a codebook layer needs meta.groups dividing its {spec.in_features} input columns, found {g!r}")

    def encode(self, state):
        p, w = state.payload, state.weight
        codes, table = p.get("codes"), p.get("table")
        if codes is None or table is None or w is None:
            return None
        w = w.detach().cpu()
        R, C = w.shape
        G, K = table.shape[1], table.shape[2]
        bits = K.bit_length() - 1
        if tuple(codes.shape) != (R, C) or table.shape[0] != R or C % G or K != 1 << bits or not 1 <= bits <= MAX_BITS:
            return None
        tensors = {"codes": pack_unsigned(codes.cpu().long(), bits), "table": table.cpu().half().contiguous()}
        exc = p.get("exc_index")
        nnz = 0 if exc is None else int(exc.numel())
        if nnz:
            if C > MAX_COLUMNS:
                return None
            flat = exc.cpu().long().sort().values
            tensors.update(_csr(flat, w.reshape(-1)[flat], R, C))
        spec = self.spec(state, meta={"bits": bits, "groups": G}, n_exceptions=nnz)
        if not torch.equal(self.decode(spec, tensors, w.dtype), w):
            return None
        return spec, tensors

    def _parts(self, spec, tensors):
        R, C, b = spec.out_features, spec.in_features, spec.meta["bits"]
        codes = unpack_unsigned(tensors["codes"], b, C).to(torch.uint8)
        flat = _flat(tensors, R, C)
        return codes, tensors["table"], flat, None if flat is None else tensors["exc_value"]

    def decode(self, spec, tensors, dtype=torch.float32):
        return lut_weight(*self._parts(spec, tensors), dtype)

    def expected_shapes(self, spec):
        R, C, b, G = spec.out_features, spec.in_features, spec.meta["bits"], spec.meta["groups"]
        shapes = {"codes": (R, words(C, b)), "table": (R, G, 1 << b)}
        if spec.n_exceptions:
            shapes.update(exc_rowptr=(R + 1,), exc_col=(spec.n_exceptions,), exc_value=(spec.n_exceptions,))
        return shapes

    def bits_per_weight(self, state, dense_bits=16):
        table = state.payload.get("table")
        if table is None:  # no tables handed over: counted as the dense weight
            return float(dense_bits) + state.extra_bits / state.n_params
        exc = state.payload.get("exc_index")
        G, K = table.shape[1], table.shape[2]
        bits = codebook_bits(state.out_features, state.in_features, K.bit_length() - 1, G, 0 if exc is None else int(exc.numel()))
        return (bits + state.extra_bits) / state.n_params

    def stored_bits(self, spec, nbytes, scale_bits):
        codes = spec.out_features * spec.in_features * spec.meta["bits"]
        return codes + sum(8 * nbytes[k] for k in ("table", "exc_rowptr", "exc_col", "exc_value") if k in nbytes)

    def payload(self, spec, tensors):
        if not tensors:
            return {}
        codes, table, flat, _ = self._parts(spec, tensors)
        return {"codes": codes, "table": table, **({"exc_index": flat} if flat is not None else {})}

    def build(self, spec, tensors, *, bias=None, backend="auto", device="cpu", act_dtype=None):
        if backend not in ("auto", "torch", "dequant"):
            raise ValueError(f"backend {backend!r} unknown; expected auto, torch or dequant")
        codes, table, flat, values = self._parts(spec, tensors)
        dev = torch.device(device)
        cls = LutLinear
        if backend == "auto" and dev.type == "cpu" and lut_kernel_applies(spec.in_features, table.shape[1], table.shape[2]):
            from ...runtime.cpu_kernels import kernels

            cls = LowbitLutLinear if kernels() is not None else LutLinear
        mod = cls(
            codes.to(dev),
            table.to(dev),
            exc_index=None if flat is None else flat.to(dev),
            exc_value=None if values is None else values.to(dev),
            bias=bias,
        )
        return ActQuantLinear(mod, spec.act_args) if spec.act_args else mod
