"""Storage form ``dense``: the weight is kept as is, under its usual name ``NAME.weight``
(a layer with activation quantization only, or a quantized layer whose weight left its
grid after quantization). The form stores no tensors of its own; the spec keeps the
activation quantizer, which the loader wraps around the plain linear."""

from __future__ import annotations

from ...errors import UserError
from ..form import StorageForm, register_form


@register_form("dense")
class Dense(StorageForm):
    counts_as_compressed = False

    def encode(self, state):
        return None  # never chosen for a layer: the writer falls back to it

    def expected_shapes(self, spec):
        return {}

    def bits_per_weight(self, state, dense_bits=16):
        return float(dense_bits) + state.extra_bits / state.n_params

    def ct_scheme(self, name, spec):
        if spec.act_args is not None:
            raise UserError(f"layer {name}: activation quantization without weight quantization has no compressed-tensors form")
        return None
