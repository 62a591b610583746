"""Storage forms ``iq4_nl`` and ``iq4_xs``: GGUF's ``IQ4_NL`` / ``IQ4_XS`` grids
(:mod:`llmpress.quant.iq4`): a fixed table of 16 non-uniform levels scaled per block of 32
weights, a weight ``s * K[u]`` with ``u`` in 0..15.

Tensors, named after their role:

- ``codes``: ``u`` packed into int32 words with :func:`llmpress.storage.grid.pack_unsigned`
  along the input dimension ([out, in / 8]);
- ``d``: float16, per block [out, in / 32] (``iq4_nl``) or per super-block of 256 [out, in / 256]
  (``iq4_xs``);
- ``sc`` (``iq4_xs``): int8 [out, in / 256, 8], the blocks' 6-bit codes (-32..31); a block's
  scale is ``d * sc``.

Size, counted the same by the report and the checkpoint: 4 bits per weight and 16 bits per 32
(``iq4_nl``: 4.5 bits, GGUF's 18-byte block) or 16 bits per 256 and 6 per 32 (``iq4_xs``:
4.25 bits, GGUF's 136-byte block; the checkpoint keeps ``sc`` in whole bytes). The method
(:mod:`llmpress.quant.q4k`'s ``kquant``) hands over the grid (``record.payload``); the form
stores it only while the model's weight is exactly what it decodes to (checked bit for bit).
Runtime: the weight decoded once at load (:class:`DequantLinear`, exact); llama.cpp serves the
GGUF export with its own kernels. GGUF: ``IQ4_NL`` / ``IQ4_XS``, byte for byte.
"""

from __future__ import annotations

import torch

from ...quant.iq4 import BLOCK, SUPER, IQ4Params
from ...runtime.act_quant import ActQuantLinear
from ...runtime.qlinear import DequantLinear
from ..form import LinearSpec, register_form
from ..grid import pack_unsigned, unpack_unsigned, words
from .own_grid import OwnGridForm, fp16_valued


def params_of(spec: LinearSpec, tensors: dict[str, torch.Tensor]) -> IQ4Params:
    """The stored grid as :class:`IQ4Params` (float32 values)."""
    R, C = spec.out_features, spec.in_features
    sc = tensors.get("sc")
    return IQ4Params(
        codes=unpack_unsigned(tensors["codes"], 4, C).reshape(R, C).float(), d=tensors["d"].float(), sc=None if sc is None else sc.float()
    )


@register_form("iq4_nl")
class IQ4NL(OwnGridForm):
    @property
    def xs(self) -> bool:
        return self.name == "iq4_xs"

    @property
    def unit(self) -> int:
        """Input columns a row's length must be a multiple of."""
        return SUPER if self.xs else BLOCK

    def total_bits(self) -> float:
        return 4 + (16 / SUPER + 6 / BLOCK if self.xs else 16 / BLOCK)

    def check_spec(self, spec: LinearSpec) -> None:
        if spec.in_features % self.unit:
            raise ValueError(f"a {self.name} layer needs a multiple of {self.unit} input columns, found {spec.in_features}")

    def params_of(self, spec, tensors):
        return params_of(spec, tensors)

    def pack(self, payload, rows, cols):
        if payload.get("d") is None or (self.xs and payload.get("sc") is None):
            return None
        if cols % self.unit or tuple(payload["codes"].shape) != (rows, cols) or tuple(payload["d"].shape) != (rows, cols // self.unit):
            return None
        d = payload["d"].float()
        if not fp16_valued(d):
            return None
        tensors = {"codes": pack_unsigned(payload["codes"].long().clamp(0, 15), 4), "d": d.half().contiguous()}
        if self.xs:
            if tuple(payload["sc"].shape) != (rows, cols // SUPER, SUPER // BLOCK):
                return None
            tensors["sc"] = payload["sc"].clamp(-32, 31).to(torch.int8).contiguous()
        return tensors

    def expected_shapes(self, spec):
        R, C = spec.out_features, spec.in_features
        out = {"codes": (R, words(C, 4)), "d": (R, C // self.unit)}
        if self.xs:
            out["sc"] = (R, C // SUPER, SUPER // BLOCK)
        return out

    def build(self, spec, tensors, *, bias=None, backend="auto", device="cpu", act_dtype=None):
        """The weight decoded once (:class:`DequantLinear`, exact) for every backend: no IQ4 kernel here."""
        if backend not in ("auto", "torch", "dequant"):
            raise ValueError(f"backend {backend!r} unknown; expected auto, torch or dequant")
        mod = DequantLinear(self.decode(spec, tensors).to(device), bias)
        return ActQuantLinear(mod, spec.act_args) if spec.act_args else mod


@register_form("iq4_xs")
class IQ4XS(IQ4NL):
    """GGUF's ``IQ4_XS``: the ``iq4_nl`` table with two-level block scales (4.25 bits per weight)."""
