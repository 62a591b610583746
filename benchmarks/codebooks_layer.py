"""Codebook (non-uniform) against uniform grids on one synthetic layer: relative output error
tr((W - Q) H (W - Q)^T) / tr(W H W^T) at about 3 and 4 bits per weight (tables, scales and
kept outliers counted). No model is run: a [256, 512] Student-t (5 degrees) weight and the
Hessian of 2048 correlated inputs with log-normal channel scales.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/codebooks_layer.py
"""

import time

import torch

from llmpress.quant.args import QuantArgs
from llmpress.quant.core import bits_per_weight, fake_quantize
from llmpress.quant.gptq_solve import gptq_quantize
from llmpress.quant.hessian import layer_error
from llmpress.quant.nuq import codebook_bits, column_sensitivity, nuq_gptq, nuq_round


def problem(R=256, C=512, N=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    W = torch.distributions.StudentT(5.0).sample((R, C)) * 0.02
    scales = torch.exp(torch.randn(C, generator=g) * 0.8)
    mix = torch.randn(C, C, generator=g) * 0.1 + torch.eye(C)
    X = (torch.randn(N, C, generator=g) @ mix) * scales
    return W, 2 / N * X.t() @ X


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def rows_for(W, H, bits):
    R, C = W.shape
    a = QuantArgs(bits=bits, symmetric=True, granularity="group", group_size=64, full_range=True)
    grid_bits = bits_per_weight(a, C, R)
    s = column_sensitivity(H, "hessian_diag", C)
    q, dt = timed(lambda: fake_quantize(W, a))
    yield f"RTN W{bits} g64", grid_bits, q, dt
    r, dt = timed(lambda: gptq_quantize(W, H, a, act_order=True, damp=0.01))
    yield f"GPTQ W{bits} g64", grid_bits, r.weight, dt
    for name, kw in (("uniform", {}), ("H-diag", {"col_weights": s}), ("H-diag, 0.45% sparse", {"col_weights": s, "outlier_fraction": 0.0045})):
        res, dt = timed(lambda kw=kw: nuq_round(W, bits, **kw))
        yield f"k-means W{bits} per row, {name}", codebook_bits(R, C, bits, 1, res.outliers.numel()) / (R * C), res.weight, dt
    res, dt = timed(lambda: nuq_gptq(W, H, bits, col_weights=s, damp=0.01))
    yield f"GPTQ onto the W{bits} per-row tables", codebook_bits(R, C, bits, 1, 0) / (R * C), res.weight, dt


def main():
    torch.set_num_threads(1)
    W, H = problem()
    base = layer_error(W, torch.zeros_like(W), H)
    print("| method | bits/weight | relative output error | seconds |\n|---|---|---|---|")
    for bits in (3, 4):
        for name, b, q, dt in rows_for(W, H, bits):
            print(f"| {name} | {b:.3f} | {layer_error(W, q, H) / base:.5f} | {dt:.2f} |")


if __name__ == "__main__":
    main()
