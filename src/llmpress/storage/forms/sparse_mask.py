"""Storage form ``sparse``: a pruned linear without quantization (unstructured or N:M).

Tensors: ``mask`` (1-bit codes packed like the integer grids' words, 1 = kept, [out,
ceil(in/32)]) and ``values`` (the kept weights in row-major order, at the weight's dtype).
The N:M pattern the zeros follow is recorded in the spec's ``structure``. A pruned *and*
quantized linear is an integer grid instead (a pruned weight is the zero code).

Runtime: the dense weight in :class:`~llmpress.runtime.qlinear.DequantLinear` (no sparse
kernel). Size accounting: at ``dense_bits`` per weight like an uncompressed linear (the
runtime gains nothing from the zeros); the checkpoint holds 1 mask bit per weight plus the
kept values. compressed-tensors 0.20 has no sparse format: the layer exports dense.
"""

from __future__ import annotations

import torch

from ...errors import UserError
from ...runtime.act_quant import ActQuantLinear
from ...runtime.qlinear import DequantLinear
from ..form import StorageForm, register_form
from ..grid import pack_unsigned, unpack_mask, words


@register_form("sparse")
class SparseMask(StorageForm):
    counts_as_compressed = False
    decodes_at_load = True

    def encode(self, state):
        w = state.weight
        mask = w != 0
        return self.spec(state), {"mask": pack_unsigned(mask.to(torch.uint8), 1), "values": w[mask].contiguous()}

    def decode(self, spec, tensors, dtype=None):
        mask = unpack_mask(tensors["mask"], spec.in_features)
        values = tensors["values"]
        kept = int(torch.count_nonzero(mask))
        if kept != values.numel():
            raise UserError(f"sparse layer: mask keeps {kept} weights but {values.numel()} values are stored")
        return torch.zeros(mask.shape, dtype=dtype or values.dtype).masked_scatter_(mask, values.to(dtype or values.dtype))

    def expected_shapes(self, spec):
        return {"mask": (spec.out_features, words(spec.in_features, 1)), "values": None}

    def bits_per_weight(self, state, dense_bits=16):
        return float(dense_bits) + state.extra_bits / state.n_params

    def stored_bits(self, spec, nbytes, scale_bits):
        return spec.out_features * spec.in_features + 8 * nbytes["values"]

    def build(self, spec, tensors, *, bias=None, backend="auto", device="cpu", act_dtype=None):
        mod = DequantLinear(self.decode(spec, tensors), bias)
        return ActQuantLinear(mod, spec.act_args) if spec.act_args else mod

    def ct_scheme(self, name, spec):
        if spec.act_args is not None:
            raise UserError(f"layer {name}: activation quantization without weight quantization has no compressed-tensors form")
        return None  # written as its dense weight
