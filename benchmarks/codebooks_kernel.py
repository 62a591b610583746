"""Decode-time matmul of the lookup-table kernel against llmpress's int4 kernel and float32, at
SmolLM2-135M's linear shapes, on random weights (no model is run): median microseconds per
call for 1 and 8 activation rows, each a raw kernel call on the modules' buffers (no module
overhead: like for like with the int4 column), for 1, 8 and 16 activation rows. LUT: per-row
tables, the default path (AVX-512 where the CPU has it) and the AVX2 path. VQ, all with row
scales, through the call the module makes (lookup tables of the activations at a few rows, the
direct path at more, ``vq_quad_mm`` for 4-d vectors from 2 rows): 2-bit 2-d, 16 codewords per
64 input columns (`gptvq-2d-w2`'s layout, ``vq16_mm``); 2-bit 4-d, 256-codeword tables per
column group as ``group_size: auto`` picks them (`gptvq-4d-w2`); 3-bit 2-d, 64 codewords per 64
columns (`gptvq-2d-w3`, ``vq8_mm``).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/codebooks_kernel.py [--threads 1]
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from llmpress.quant.nuq import nuq_round
from llmpress.runtime import cpu_kernels
from llmpress.runtime.lut_linear import LowbitLutLinear
from llmpress.runtime.vq_linear import LowbitVQLinear

SHAPES = ((576, 576), (192, 576), (1536, 576), (576, 1536))  # q/o, k/v, gate/up, down


def median_us(fn, reps=200):
    for _ in range(10):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1e6 * statistics.median(ts)


def lut_call(ext, mod: LowbitLutLinear):
    return lambda x: ext.lut4_mm(x, mod.packed, mod.table, mod.group_size, mod.entries, mod.layout)


def cells(ext, layer: dict, x: torch.Tensor) -> list[float]:
    """Median microseconds of each implementation on activation rows ``x``."""
    w, packed4, sc, zp = layer["w"], layer["packed4"], layer["sc"], layer["zp"]
    return [
        median_us(lambda: F.linear(x, w)),
        median_us(lambda: ext.int4_mm(x, packed4, sc, zp, 64)),
        *(median_us(lambda k=k: lut_call(ext, layer[k])(x)) for k in ("lut4", "lut3", "lut4_avx2", "lut3_avx2")),
        *(median_us(lambda k=k: vq_call(ext, layer[k])(x)) for k in ("vq2", "vq2_4d", "vq3")),
    ]


def vq_call(ext, mod: LowbitVQLinear):
    """The kernel call the module makes for a few rows (``_small``: the activation tables, the
    direct path or ``vq_quad_mm``, by the rows and the layout), without the module's reshapes."""
    return lambda x: mod._small(ext, x)


def vq4d_groups(n: int, k: int, budget: float = 0.2) -> int:
    """Column groups of gptvq-4d-w2's ``group_size: auto`` on an n x k layer: the smallest group
    (a multiple of 4 dividing k) whose 8-bit 256 x 4 tables cost at most ``budget`` bits a weight."""
    g = next(g for g in range(4, k + 1, 4) if k % g == 0 and (256 * 4 * 8 + 16) / (n * g) <= budget)
    return k // g


def layer_of(n: int, k: int) -> dict:
    w = torch.randn(n, k) * 0.05
    r4, r3 = nuq_round(w, 4), nuq_round(w, 3)
    return {
        "w": w,
        "packed4": cpu_kernels.pack_int4(torch.randint(0, 16, (n, k))),
        "sc": torch.rand(n, k // 64) * 0.01,
        "zp": torch.full((n, k // 64), 8.0),
        "lut4": LowbitLutLinear(r4.codes, r4.table),
        "lut3": LowbitLutLinear(r3.codes, r3.table),
        "lut4_avx2": LowbitLutLinear(r4.codes, r4.table, avx512=False),
        "lut3_avx2": LowbitLutLinear(r3.codes, r3.table, avx512=False),
        "vq2": LowbitVQLinear(torch.randint(0, 16, (n, k // 2)), torch.randn(k // 64, 16, 2).half(), scale=torch.rand(n).half()),
        "vq2_4d": LowbitVQLinear(torch.randint(0, 256, (n, k // 4)), torch.randn(vq4d_groups(n, k), 256, 4).half(), scale=torch.rand(n).half()),
        "vq3": LowbitVQLinear(torch.randint(0, 64, (n, k // 2)), torch.randn(k // 64, 64, 2).half(), scale=torch.rand(n).half()),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ext = cpu_kernels.kernels()
    assert ext is not None, cpu_kernels._state.get("reason")
    print(f"AVX-512 lookup path: {bool(ext.lut_avx512())}")
    print(
        "| shape (out x in) | rows | fp32 F.linear | int4 g64 kernel | LUT 4-bit | LUT 3-bit | LUT 4-bit AVX2 | LUT 3-bit AVX2 | VQ 2-bit 2-d/16 | VQ 2-bit 4-d/256 | VQ 3-bit 2-d/64 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n, k in SHAPES:
        layer = layer_of(n, k)
        for m in (1, 8, 16):
            row = cells(ext, layer, torch.randn(m, k))
            print(f"| {n} x {k} | {m} | " + " | ".join(f"{c:.1f}" for c in row) + " |")


if __name__ == "__main__":
    main()
