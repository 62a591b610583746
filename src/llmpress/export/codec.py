"""Encode one compressed linear into storage tensors and back, exactly (pure functions).

A compressed linear is described by a :class:`LinearSpec` (shape, weight/activation
quantization arguments, sparsity) and stored as a few tensors, named after their role:

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
  (SpQR-style outliers): flat positions (int64, sorted) and their exact values; their
  codes are the zero code, so the weight is ``dequant(codes)`` with those entries set.

A linear with sparsity but no quantization (``kind="sparse"``) stores ``mask`` (1-bit
codes packed the same way, 1 = kept) and ``values`` (the kept weights in row-major
order, at the weight's dtype).

Quantized sparse weights need no mask: a pruned weight is the zero code. Every
encoding is checked on the spot: the weight rebuilt from the tensors must equal the
model's weight bit for bit, or :func:`encode_linear` returns None (the caller then
stores that weight dense, and says so).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from ..errors import UserError
from ..prune.masks import is_nm
from ..quant.args import QuantArgs
from ..quant.core import QParams, compute_qparams, dequantize, quantize
from ..quant.pack import pack_codes, unpack_codes
from ..registry import ModuleRecord

# more off-grid weights than this share of a layer means the weight was changed after
# quantization (not an outlier list): store the layer dense instead
MAX_EXCEPTIONS = 0.05
NM_PATTERNS = ((2, 4), (4, 8))
KINDS = ("quant", "sparse", "dense")


@dataclass(kw_only=True)
class LinearSpec:
    """How one linear is stored (the JSON side of the checkpoint; tensors hold the data)."""

    kind: str  # "quant", "sparse", or "dense" (weight kept as is, e.g. activation quantization only)
    out_features: int
    in_features: int
    weight_args: QuantArgs | None = None
    act_args: QuantArgs | None = None
    sparsity: float = 0.0
    structure: str | None = None  # "2:4", "4:8" or "unstructured" when sparse
    has_g_idx: bool = False
    n_exceptions: int = 0
    methods: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "shape": [self.out_features, self.in_features],
            "weights": self.weight_args.to_dict() if self.weight_args else None,
            "activations": self.act_args.to_dict() if self.act_args else None,
            "sparsity": self.sparsity,
            "structure": self.structure,
            "g_idx": self.has_g_idx,
            "exceptions": self.n_exceptions,
            "methods": list(self.methods),
        }

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "LinearSpec":
        try:
            kind = d["kind"]
            out_f, in_f = (int(v) for v in d["shape"])
            if kind not in KINDS:
                raise ValueError(f"kind {kind!r} unknown (this llmpress reads {', '.join(KINDS)})")
            if kind == "quant" and not d.get("weights"):
                raise ValueError("a quantized layer needs 'weights'")
            return cls(
                kind=kind, out_features=out_f, in_features=in_f, weight_args=QuantArgs.from_dict(d["weights"], f"{where}.weights") if d.get("weights") else None, act_args=QuantArgs.from_dict(d["activations"], f"{where}.activations") if d.get("activations") else None, sparsity=float(d.get("sparsity", 0.0)), structure=d.get("structure"), has_g_idx=bool(d.get("g_idx", False)), n_exceptions=int(d.get("exceptions", 0)), methods=list(d.get("methods", [])),
            )
        except UserError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"checkpoint config {where}: malformed layer entry ({e})") from None

    @property
    def n_groups(self) -> int:
        a = self.weight_args
        if a.granularity in ("tensor", "channel"):
            return 1
        return self.in_features // a.group_size

    @property
    def scale_shape(self) -> tuple[int, int]:
        a = self.weight_args
        return (1, 1) if a.granularity == "tensor" else (self.out_features, self.n_groups)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every tensor this layer stores (``exc_*`` / ``values``: by count)."""
        o, i = self.out_features, self.in_features
        if self.kind == "dense":
            return {}
        if self.kind == "sparse":
            return {"mask": (o, _words(i, 1))}
        a = self.weight_args
        shapes = {"qweight": (o, _words(i, a.bits)), "scale": self.scale_shape}
        if a.has_zero_point:
            r, g = self.scale_shape
            shapes["zero_point"] = (g, _words(r, a.bits))
        if self.has_g_idx:
            shapes["g_idx"] = (i,)
        if self.n_exceptions:
            shapes["exc_index"] = (self.n_exceptions,)
            shapes["exc_value"] = (self.n_exceptions,)
        return shapes


def _words(n: int, bits: int) -> int:
    return -(-n // 32) * bits


# ---- integer codes <-> unsigned storage codes ------------------------------------------


def code_offset(args: QuantArgs) -> int:
    """What :func:`pack_codes` adds to make a code unsigned (binary is mapped separately)."""
    if args.kind == "ternary":
        return 1
    if args.kind == "binary":
        return 0
    return -args.qmin


def to_unsigned(codes: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    c = codes.to(torch.int64)
    return (c + 1) // 2 if args.kind == "binary" else c + code_offset(args)


def from_unsigned(u: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    return 2 * u - 1 if args.kind == "binary" else u - code_offset(args)


def pack(codes: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    return pack_unsigned(to_unsigned(codes, args), args.bits)


def pack_unsigned(u: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`pack_codes` of unsigned codes; byte-level fast path for 1/2/4/8 bits (same words)."""
    if bits not in (1, 2, 4, 8) or sys.byteorder != "little":
        return pack_codes(u, bits)
    if u.numel() and (int(u.min()) < 0 or int(u.max()) >= 2**bits):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    *lead, n = u.shape
    u = torch.nn.functional.pad(u.to(torch.uint8), (0, (-n) % 32))
    per = 8 // bits
    parts = u.reshape(*lead, -1, per)
    byte = parts[..., 0].clone()
    for i in range(1, per):
        byte |= parts[..., i] << (i * bits)
    return byte.contiguous().view(torch.int32)


def unpack_unsigned(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Unsigned codes [..., n] (int16) of :func:`pack_codes` words; byte-split fast path
    for 1/2/4/8 bits (the stream is little-endian, code i at bit i*bits)."""
    if bits in (1, 2, 4, 8) and sys.byteorder == "little" and packed.dtype == torch.int32:
        per = 8 // bits
        b = packed.contiguous().view(torch.uint8).to(torch.int16)  # [..., 4 * words]
        shifts = torch.arange(0, 8, bits, dtype=torch.int16)
        u = (b.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [..., bytes, per]
        u = u.reshape(*packed.shape[:-1], packed.shape[-1] * 4 * per)
        if u.shape[-1] < n:
            raise ValueError(f"packed tensor holds {u.shape[-1]} codes, fewer than n={n}")
        return u[..., :n]
    return unpack_codes(packed, bits, n).to(torch.int16)


# ---- quantization grid with an optional column -> group index ---------------------------


def _columns(t: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """Per-group params [R, G] -> per-column [R, in] following ``g_idx``."""
    return t[:, g_idx.long()]


def codes_of(weight: torch.Tensor, qp: QParams, args: QuantArgs, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Integer codes (float tensor) of an already quantized weight."""
    if g_idx is None:
        return quantize(weight, QParams(scale=qp.scale, zero_point=qp.zero_point), args)
    w = weight.float()
    s = _columns(qp.scale, g_idx)
    if args.kind == "binary":
        return torch.where(w >= 0, 1.0, -1.0)
    if args.kind == "ternary":
        return torch.round(w / s).clamp(-1, 1)
    z = 0 if qp.zero_point is None else _columns(qp.zero_point, g_idx)
    return torch.clamp(torch.round(w / s) + z, args.qmin, args.qmax)


def dequant(codes: torch.Tensor, qp: QParams, args: QuantArgs, g_idx: torch.Tensor | None = None, dtype=torch.float32) -> torch.Tensor:
    """The weight of ``codes`` (same arithmetic as :func:`llmpress.quant.core.dequantize`)."""
    if g_idx is None:
        return dequantize(codes, qp, args, dtype)
    q = codes.float()
    if qp.zero_point is not None:
        q = q - _columns(qp.zero_point, g_idx)
    return (q * _columns(qp.scale, g_idx)).to(dtype)


def zero_code(qp: QParams, args: QuantArgs, shape: tuple[int, int]) -> torch.Tensor:
    """Per-weight code whose value is exactly 0 (0, or the zero point)."""
    if qp.zero_point is None:
        return torch.zeros(shape)
    g = {"tensor": shape[0] * shape[1], "channel": shape[1]}.get(args.granularity, args.group_size)
    return qp.zero_point.unsqueeze(-1).expand(*qp.zero_point.shape, g).reshape(shape)


def structure_of(weight: torch.Tensor) -> str | None:
    """N:M pattern the zeros of ``weight`` follow, "unstructured", or None (dense)."""
    if not bool((weight == 0).any()):
        return None
    for n, m in NM_PATTERNS:
        if weight.shape[1] % m == 0 and is_nm(weight, n, m):
            return f"{n}:{m}"
    return "unstructured"


# ---- encode / decode --------------------------------------------------------------------


def encode_linear(weight: torch.Tensor, record: ModuleRecord) -> tuple[LinearSpec, dict[str, torch.Tensor]] | None:
    """Storage tensors of one compressed linear, or None when it cannot be stored exactly.

    ``weight`` is the model's (fake-quantized / pruned) weight [out, in]; ``record`` says
    how it was compressed. Returns None for a layer that has neither quantization nor
    sparsity, or whose weight is not on its recorded grid.
    """
    w = weight.detach()
    out_f, in_f = w.shape
    pruned = record.sparsity > 0  # zeros a pruning method made (not a grid's natural zero codes)
    spec_kw = dict(act_args=record.act_args, sparsity=record.sparsity, structure=structure_of(w) if pruned else None, methods=list(record.methods))
    args = record.weight_args
    if args is None:
        if not pruned:
            return None
        mask = w != 0
        spec = LinearSpec(kind="sparse", out_features=out_f, in_features=in_f, **spec_kw)
        return spec, {"mask": pack_unsigned(mask.to(torch.uint8), 1), "values": w[mask].contiguous()}
    g_idx = record.notes.get("g_idx")
    if g_idx is not None:
        g_idx = torch.as_tensor(g_idx, dtype=torch.int32).reshape(-1)
    qp = record.qparams
    if qp is None:
        qp = compute_qparams(w, args)
    qp = QParams(scale=qp.scale.detach().float().cpu(), zero_point=None if qp.zero_point is None else qp.zero_point.detach().float().cpu())
    w = w.cpu()
    if args.granularity == "token" or (args.granularity == "group" and in_f % args.group_size):
        return None
    if tuple(qp.scale.shape) != LinearSpec(kind="quant", out_features=out_f, in_features=in_f, weight_args=args).scale_shape:
        return None
    codes = codes_of(w, qp, args, g_idx)
    rebuilt = dequant(codes, qp, args, g_idx, w.dtype)
    off = rebuilt != w
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
    spec = LinearSpec(kind="quant", out_features=out_f, in_features=in_f, weight_args=args, has_g_idx=g_idx is not None, n_exceptions=n_exc, **spec_kw)
    dec = decode_weight(spec, tensors, w.dtype)
    if not torch.equal(dec, w):  # the stored form must give back the very same weight
        return None
    return spec, tensors


@dataclass(kw_only=True)
class Decoded:
    """A quantized linear in compute-friendly form: int8 codes and float32 qparams."""

    codes: torch.Tensor  # int8 [out, in] (signed codes, binary as -1/1)
    qparams: QParams  # scale [R, G] float32, zero_point [R, G] float32 or None
    args: QuantArgs
    g_idx: torch.Tensor | None = None  # int32 [in]
    exc_index: torch.Tensor | None = None  # int64 flat positions
    exc_value: torch.Tensor | None = None


def decode_qparams(spec: LinearSpec, t: dict[str, torch.Tensor]) -> QParams:
    zp = None
    if spec.weight_args.has_zero_point:
        r, _ = spec.scale_shape
        zp = unpack_unsigned(t["zero_point"], spec.weight_args.bits, r).t().float().contiguous()
    return QParams(scale=t["scale"].float(), zero_point=zp)


def decode_quant(spec: LinearSpec, t: dict[str, torch.Tensor]) -> Decoded:
    a = spec.weight_args
    u = unpack_unsigned(t["qweight"], a.bits, spec.in_features)
    codes = from_unsigned(u, a).to(torch.int8 if a.bits < 8 or a.symmetric else torch.int16)
    return Decoded(codes=codes, qparams=decode_qparams(spec, t), args=a, g_idx=t.get("g_idx"), exc_index=t.get("exc_index"), exc_value=t.get("exc_value"))


def dequant_decoded(d: Decoded, dtype=torch.float32) -> torch.Tensor:
    w = dequant(d.codes, d.qparams, d.args, d.g_idx, dtype)
    if d.exc_index is not None:
        w.view(-1)[d.exc_index] = d.exc_value.to(dtype)
    return w


def decode_sparse(spec: LinearSpec, t: dict[str, torch.Tensor], dtype=None) -> torch.Tensor:
    mask = unpack_unsigned(t["mask"], 1, spec.in_features).bool()
    values = t["values"]
    if int(mask.sum()) != values.numel():
        raise UserError(f"sparse layer: mask keeps {int(mask.sum())} weights but {values.numel()} values are stored")
    w = torch.zeros(mask.shape, dtype=dtype or values.dtype)
    w[mask] = values.to(w.dtype)
    return w


def decode_weight(spec: LinearSpec, t: dict[str, torch.Tensor], dtype=torch.float32) -> torch.Tensor:
    """The dense weight [out, in] of a stored linear (what the fake-quantized model holds)."""
    if spec.kind == "sparse":
        return decode_sparse(spec, t, dtype)
    return dequant_decoded(decode_quant(spec, t), dtype)
