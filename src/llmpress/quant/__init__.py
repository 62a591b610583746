"""Quantization primitives and weight solvers."""

from .args import QuantArgs
from .core import compute_qparams, dequantize, fake_quantize, quantize, quantize_weight
from .pack import pack_codes, unpack_codes

__all__ = [
    "QuantArgs",
    "compute_qparams",
    "quantize",
    "dequantize",
    "fake_quantize",
    "quantize_weight",
    "pack_codes",
    "unpack_codes",
]
