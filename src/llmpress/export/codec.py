"""The names of the packed checkpoint's per-layer codec, kept for callers of
``llmpress.export.codec``: the storage forms now hold the encodings
(:mod:`llmpress.storage.form` for the interface and :class:`LinearSpec`,
:mod:`llmpress.storage.grid` for the integer-grid maths, :mod:`llmpress.storage.forms`
for one file per form)."""

from __future__ import annotations

import torch

from ..storage.form import LinearSpec, decode_weight, encode_layer, form_names, get_form, structure_of
from ..storage.grid import (
    Decoded,
    code_offset,
    codes_of,
    decode_qparams,
    decode_quant,
    dequant,
    dequant_decoded,
    from_unsigned,
    pack,
    pack_unsigned,
    to_unsigned,
    unpack_unsigned,
    zero_code,
)

encode_linear = encode_layer

__all__ = [
    "Decoded",
    "LinearSpec",
    "code_offset",
    "codes_of",
    "decode_qparams",
    "decode_quant",
    "decode_sparse",
    "decode_weight",
    "dequant",
    "dequant_decoded",
    "encode_linear",
    "form_names",
    "from_unsigned",
    "pack",
    "pack_unsigned",
    "structure_of",
    "to_unsigned",
    "unpack_unsigned",
    "zero_code",
]


def decode_sparse(spec: LinearSpec, t: dict[str, torch.Tensor], dtype=None) -> torch.Tensor:
    return get_form("sparse").decode(spec, t, dtype)
