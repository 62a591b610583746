"""W8A8 inference with integer matrix multiplication.

``Int8Linear`` holds int8 weight codes with one scale per output channel and quantizes its
input per token at run time (dynamic, symmetric: ``s_t = max_j |x_tj| / 127``). The
product of the codes is accumulated in int32 and rescaled once:

    y_to = s_t * s_o * sum_j qx_tj * qw_oj   (+ bias)

which equals the fake-quant W8A8 linear (``rtn`` W8 per-channel + A8 per-token) up to
float rounding of the final rescale.

Integer GEMM backends (:func:`int8_mm`), all exact:

- ``int_mm``: ``torch._int_mm`` (int8 x int8 -> int32). Some builds restrict shapes
  (CUDA: M > 16, K and N multiples of 8); on a failure it falls back to ``int32`` with a
  warning. On x86 CPUs without an int8 GEMM path in this torch build it is a scalar
  loop, far slower than float GEMM (see benchmarks/w8a8_prefill.py).
- ``int32``: ``torch.mm`` on int32 tensors (int32 accumulate).
- ``fp32_exact``: float32 GEMM on the codes in chunks of at most 1024 along K: every
  partial sum is an integer of magnitude <= 1024 * 128^2 = 2^24, exactly representable
  in float32, so each chunk is exact; chunks are summed in int32. Same integers as the
  others, at float GEMM speed (for evaluating W8A8 models on CPUs).
- ``auto``: ``int_mm`` on CUDA; on CPU whichever of ``int_mm`` / ``fp32_exact`` is faster
  on a small probe (measured once per process, logged). On CPU, for at most
  ``cpu_kernels.SMALL_M`` rows (decode), :class:`Int8Linear` uses llmpress's own int8
  GEMV kernel (:mod:`llmpress.runtime.cpu_kernels`) on the activation codes: float32
  FMAs over integer products, equal to the integer sum up to float32 rounding (partial
  sums can pass 2^24 for K > 1040), streaming each weight byte once.
"""

from __future__ import annotations

import logging
import time
import warnings

import torch
import torch.nn as nn

from ..quant.core import QParams
from .act_quant import ActQuantLinear

log = logging.getLogger(__name__)

BACKENDS = ("auto", "int_mm", "int32", "fp32_exact")
_EXACT_CHUNK = 1024
_state: dict[str, object] = {}


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes per row of ``x`` [M, K] and the row scales [M, 1]."""
    xf = x.float()
    scale = (xf.abs().amax(1, keepdim=True) / 127.0).clamp_min(1e-12)
    codes = torch.round(xf / scale).clamp_(-128, 127).to(torch.int8)
    return codes, scale


def _mm_int32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.mm(a.to(torch.int32), b.to(torch.int32))


def _mm_fp32_exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    K = a.shape[1]
    acc = None
    for k0 in range(0, K, _EXACT_CHUNK):
        part = (a[:, k0 : k0 + _EXACT_CHUNK].float() @ b[k0 : k0 + _EXACT_CHUNK].float()).to(torch.int32)
        acc = part if acc is None else acc.add_(part)
    return acc


def _mm_int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    try:
        return torch._int_mm(a, b)
    except (RuntimeError, NotImplementedError) as e:
        key = ("int_mm_failed", a.device.type)
        if key not in _state:
            _state[key] = True
            warnings.warn(
                f"torch._int_mm failed for shapes {tuple(a.shape)} x {tuple(b.shape)} ({e}); using the int32-accumulate path",
                RuntimeWarning,
                stacklevel=3,
            )
        return _mm_int32(a, b)


def _probe_cpu() -> str:
    """Faster exact backend on this CPU: time int_mm against fp32_exact once."""
    if "cpu_auto" in _state:
        return _state["cpu_auto"]  # type: ignore[return-value]
    a = torch.randint(-127, 128, (64, 512), dtype=torch.int8)
    b = torch.randint(-127, 128, (512, 256), dtype=torch.int8)
    times = {}
    for name, fn in (("int_mm", torch._int_mm), ("fp32_exact", _mm_fp32_exact)):
        try:
            fn(a, b)
            t = time.perf_counter()
            for _ in range(3):
                fn(a, b)
            times[name] = time.perf_counter() - t
        except (RuntimeError, NotImplementedError):
            times[name] = float("inf")
    choice = min(times, key=times.get)
    log.info("int8 GEMM backend on this CPU: %s (probe: %s)", choice, {k: f"{v * 1e3:.2f} ms" for k, v in times.items()})
    _state["cpu_auto"] = choice
    return choice


def resolve_backend(backend: str, device: torch.device | str = "cpu") -> str:
    if backend not in BACKENDS:
        raise ValueError(f"int8 backend {backend!r} unknown; expected one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    return "int_mm" if torch.device(device).type == "cuda" else _probe_cpu()


def int8_mm(a: torch.Tensor, b: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """int8 [M, K] x int8 [K, N] -> int32 [M, N], exactly."""
    be = resolve_backend(backend, a.device)
    if be == "int_mm":
        return _mm_int_mm(a, b)
    if be == "int32":
        return _mm_int32(a, b)
    return _mm_fp32_exact(a, b)


def weight_codes(weight: torch.Tensor, qparams: QParams | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes [out, in] and per-output-channel scales [out] of a weight.

    With ``qparams`` (symmetric per-channel, e.g. from ``rtn`` W8) the codes are the exact
    integers of the already-quantized weight; otherwise scales are max|W_o| / 127.
    """
    w = weight.detach().float()
    if qparams is not None and qparams.zero_point is None and qparams.scale.shape == (w.shape[0], 1):
        scale = qparams.scale[:, 0].float()
    else:
        scale = (w.abs().amax(1) / 127.0).clamp_min(1e-12)
    codes = torch.round(w / scale.unsqueeze(1)).clamp_(-128, 127).to(torch.int8)
    return codes, scale


def int8_linear(
    x: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None, backend: str = "auto"
) -> torch.Tensor:
    """Per-token dynamic int8 activations times int8 weights, int32 accumulate, float out."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    codes, s = quantize_rows(x2)
    acc = int8_mm(codes, w_codes.t(), backend)
    y = acc.float() * s * w_scale.unsqueeze(0)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], w_codes.shape[0])


class Int8Linear(nn.Module):
    """A W8A8 linear: int8 weight codes + per-channel scales, per-token int8 activations."""

    def __init__(self, w_codes: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None, backend: str = "auto"):
        super().__init__()
        self.register_buffer("weight_codes", w_codes.to(torch.int8).contiguous())
        self.register_buffer("weight_scale", w_scale.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.backend = backend
        self.out_features, self.in_features = w_codes.shape

    @classmethod
    def from_linear(cls, linear: nn.Linear, qparams: QParams | None = None, backend: str = "auto") -> Int8Linear:
        codes, scale = weight_codes(linear.weight, qparams)
        return cls(codes, scale, linear.bias, backend)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_codes.float() * self.weight_scale.unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "auto" and x.device.type == "cpu" and self.in_features % 16 == 0:
            from .cpu_kernels import SMALL_M, kernels

            x2 = x.reshape(-1, self.in_features)
            ext = kernels() if x2.shape[0] <= SMALL_M else None
            if ext is not None:
                codes, s = quantize_rows(x2)
                y = ext.int8_mm(codes.float(), self.weight_codes, self.weight_scale) * s
                if self.bias is not None:
                    y = y + self.bias.float()
                return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return int8_linear(x, self.weight_codes, self.weight_scale, self.bias, self.backend)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, W8A8 per-channel/per-token, backend={self.backend}"


def _is_a8_token(args) -> bool:
    # the integer kernels take s_t = max|x_t| / 127: other grids stay fake-quantized
    return (
        args.kind == "int"
        and args.bits == 8
        and args.symmetric
        and args.granularity == "token"
        and args.observer == "minmax"
        and not args.full_range
        and not args.signed_scale
        and args.clip_ratio == 1.0
    )


def convert_to_int8(
    model: nn.Module, backend: str = "auto", all_linears: bool = False, skip: tuple[str, ...] = ("lm_head",), records: dict | None = None
) -> list[str]:
    """Replace W8A8 fake-quant linears by :class:`Int8Linear`; returns the converted names.

    Converts every ``ActQuantLinear`` with symmetric 8-bit per-token activations (what
    ``rtn`` / ``smoothquant`` + ``rtn`` W8A8 recipes install), using the weight's recorded
    per-channel qparams when present (``records``: ``report.result.records`` of the compress,
    or those of a loaded packed checkpoint). With ``all_linears`` also plain ``nn.Linear``
    modules (weights quantized per channel here: RTN W8A8).
    """
    records = records if records is not None else getattr(model, "llmpress_records", None) or {}
    done = []
    from ..arch import set_module

    for name, mod in list(model.named_modules()):
        if any(name == s or name.endswith("." + s) for s in skip):
            continue
        if isinstance(mod, ActQuantLinear) and _is_a8_token(mod.args):
            rec = records.get(name)
            qp = rec.qparams if rec is not None and rec.weight_args is not None and rec.weight_args.bits == 8 else None
            set_module(model, name, Int8Linear.from_linear(mod.linear, qp, backend))
            done.append(name)
        elif all_linears and type(mod) is nn.Linear and not any(name.startswith(d + ".") for d in done):
            set_module(model, name, Int8Linear.from_linear(mod, None, backend))
            done.append(name)
    return done
