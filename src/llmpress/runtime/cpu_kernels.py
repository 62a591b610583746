"""llmpress's own CPU kernels for low-bit weights at small batch (decode), built on demand.

torch's int4 weight-only CPU kernel (``_weight_int4pack_mm_for_cpu``) is compute-bound on
AVX2 CPUs: slower than an fp32 GEMV at small models' shapes when the weights are in cache
(see benchmarks/serve_bench.py). ``csrc/lowbit_cpu.cpp`` holds AVX2/FMA kernels that
stream each packed weight once for up to 4 activation rows at a time and keep float32
activations (the arithmetic of dequantize-then-multiply, up to summation order):

- ``int4_mm(x, packed, scales, zeros, group_size, avx512=-1)``: x [M, K] float32 times int4
  weights in the "llmpress-int4-b16" layout (:func:`pack_int4`), ``w = (q - z) * s`` per
  group; on a CPU with AVX-512 a 16-lane path over the same layout (the activation rows
  permuted once per call to match it), 1.1-1.4x the AVX2 one per layer on a Xeon
  (``avx512=0`` forces AVX2; ``cpu_avx512()`` says which runs);
- ``int4_dequant(packed, scales, zeros, group_size)``: the float32 weight (for prefill:
  dequantize once per call, then one float GEMM);
- ``int8_mm(x, codes, scales, avx512=-1)``: x times int8 weights with one scale per output
  row (an AVX-512 path too, 1.2-1.5x);
- ``lut4_mm`` / ``lut4_dequant``: lookup-table (codebook) weights of at most 16 entries
  (:mod:`llmpress.runtime.lut_linear`), with an AVX-512 path chosen at run time;
- ``vq16_mm`` / ``vq8_mm(x, codes, tables, scale, row_groups=1, avx512=-1)`` (``csrc/vq_cpu.cpp``): vector-quantized weights
  with 16 (or 32..256) codewords, served by lookup tables of the activations at a few rows and
  by one weight lookup shared among the rows at more (``vq_direct_from`` reads and sets where);
  ``vq_quad_mm``: vectors of 4k coordinates by 128-bit codeword loads (AVX-512)
  (:class:`llmpress.runtime.vq_linear.LowbitVQLinear`).

The extension is compiled once per machine with torch's C++ extension builder (g++ and
ninja) into ``$LLMPRESS_CACHE/kernels`` (default ``~/.cache/llmpress``), parallelized
with the OpenMP runtime torch itself uses. Where it cannot be built (no compiler, no
AVX2, ``LLMPRESS_CPU_KERNELS=0``) :func:`kernels` returns None and the runtime uses
torch's kernels; the reason is logged once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
import time
from pathlib import Path

import torch

from .. import progress

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "lowbit_cpu.cpp"
SOURCES = (SOURCE, Path(__file__).parent / "csrc" / "vq_cpu.cpp")  # one extension; the module is defined in SOURCE
CAPABLE = ("AVX2", "AVX512")
BUILD_NOTICE = "building llmpress CPU kernels (first use, ~1 min)..."
SMALL_M = 8  # activation rows up to which the GEMV kernels run; above: dequantize + GEMM
_state: dict[str, object] = {}
_lock = threading.Lock()


def cache_dir() -> Path:
    root = os.environ.get("LLMPRESS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llmpress")
    return Path(root) / "kernels"


def unavailable_reason() -> str | None:
    """Why the kernels cannot be used here, or None."""
    if os.environ.get("LLMPRESS_CPU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return "disabled by LLMPRESS_CPU_KERNELS"
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in CAPABLE:
        return f"CPU capability {cap} (needs AVX2)"
    return None


def kernels():
    """The compiled extension module, or None (reason logged once)."""
    with _lock:
        if "module" in _state:
            return _state["module"]
        mod, why = None, unavailable_reason()
        if why is None:
            try:
                mod = _build()
            except Exception as e:  # compiler missing, build failure: fall back, say why
                why = f"build failed: {type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else e}"
                log.warning("llmpress CPU kernels not used (%s); torch's kernels serve low-bit layers", why)
        else:  # the platform has no use for them (no AVX2, kernels switched off): no warning
            log.info("llmpress CPU kernels not used (%s); torch's kernels serve low-bit layers", why)
        _state["module"], _state["reason"] = mod, why
        return mod


def _build():
    from torch.utils.cpp_extension import load

    # the ninja of the project's environment (a pip dependency) when the venv is not activated
    bindir = os.path.dirname(sys.executable)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    src = b"".join(p.read_bytes() for p in SOURCES)
    tag = hashlib.sha256(src + torch.__version__.encode()).hexdigest()[:12]
    build = cache_dir() / tag
    build.mkdir(parents=True, exist_ok=True)
    name = f"llmpress_lowbit_{tag}"
    flags = ["-O3", "-mavx2", "-mfma", "-fopenmp"]
    compiling = not (build / f"{name}.so").exists()  # else torch only loads the cached library
    if compiling:  # the one silent wait of a first `eval` / `bench`: say what it is
        progress.note(BUILD_NOTICE)
    t = time.perf_counter()
    mod = load(
        name=name,
        sources=[str(p) for p in SOURCES],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        build_directory=str(build),
        verbose=False,
    )
    if compiling:
        progress.note(f"llmpress CPU kernels built in {time.perf_counter() - t:.0f} s (cached in {build})")
    return mod


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 [N, K] (K % 16 == 0) -> uint8 [N, K/2] in the llmpress-int4-b16 layout:
    per block of 16 columns, byte j holds column j (low nibble) and j + 8 (high)."""
    N, K = q.shape
    if K % 16:
        raise ValueError(f"int4 packing needs K % 16 == 0, got K={K}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError("int4 codes must lie in 0..15")
    b = q.reshape(N, K // 16, 2, 8).to(torch.uint8)
    return (b[:, :, 0] | (b[:, :, 1] << 4)).reshape(N, K // 2).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 [N, K/2] -> int codes [N, K]."""
    N, KB = packed.shape
    b = packed.reshape(N, KB // 8, 1, 8)
    return torch.cat([b & 0xF, b >> 4], dim=2).reshape(N, KB * 2).to(torch.int32)
