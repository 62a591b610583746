"""Vector quantization (GPTVQ) against scalar grids and scalar codebooks on the synthetic layer of
benchmarks/codebooks_layer.py: relative output error tr((W - Q) H (W - Q)^T) / tr(W H W^T) at
about 2 and 3 bits per weight (tables and scales counted), on the layer as it is (rows of one
distribution) and with its rows scaled by exp(N(0, 0.5^2)) (rows of uneven scale, as in real
layers). No model is run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vq_layer.py
"""

import sys
from pathlib import Path

import torch

from llmpress.quant.args import QuantArgs
from llmpress.quant.core import bits_per_weight, fake_quantize
from llmpress.quant.gptq_solve import gptq_quantize
from llmpress.quant.hessian import layer_error
from llmpress.quant.nuq import codebook_bits, column_sensitivity, nuq_gptq
from llmpress.quant.vq import vq_bits, vq_gptq, vq_round

sys.path.insert(0, str(Path(__file__).parent))
from codebooks_layer import problem, timed  # noqa: E402

VQ = {2: [(2, 64), (4, None)], 3: [(2, 64)]}  # bits -> (dim, group_size): the presets gptvq-2d-w2, -4d-w2, -2d-w3


def rows_for(W, H, bits):
    R, C = W.shape
    a = QuantArgs(bits=bits, symmetric=True, granularity="group", group_size=64, full_range=True)
    grid_bits = bits_per_weight(a, C, R)
    q, dt = timed(lambda: fake_quantize(W, a))
    yield f"RTN W{bits} g64", grid_bits, q, dt
    r, dt = timed(lambda: gptq_quantize(W, H, a, act_order=True, damp=0.01))
    yield f"GPTQ W{bits} g64", grid_bits, r.weight, dt
    s = column_sensitivity(H, "hessian_diag", C)
    res, dt = timed(lambda: nuq_gptq(W, H, bits, col_weights=s, damp=0.01))
    yield f"GPTQ onto the W{bits} per-row tables", codebook_bits(R, C, bits, 1, 0) / (R * C), res.weight, dt
    for d, g in VQ[bits]:
        G = 1 if g is None else C // g
        b = vq_bits(R, C, d, bits, G, True) / (R * C)
        tag = f"VQ d={d} W{bits} {'one table' if g is None else f'g{g}'} ({2 ** (d * bits)} codewords), row scales"
        rnd, dt0 = timed(lambda d=d, g=g: vq_round(W, H, d, bits, group_size=g, row_scale=True))
        yield f"{tag}: nearest codeword", b, rnd.weight, dt0
        fb, dt = timed(lambda d=d, g=g, t=rnd.table: vq_gptq(W, H, d, bits, group_size=g, table=t, refine_iters=0, row_scale=True))
        yield f"{tag}: error feedback", b, fb.weight, dt0 + dt
        full, dt = timed(lambda d=d, g=g: vq_gptq(W, H, d, bits, group_size=g, refine_iters=10, row_scale=True))
        yield f"{tag}: error feedback + 10 refinement steps (GPTVQ)", b, full.weight, dt
        plain, dt = timed(lambda d=d, g=g: vq_gptq(W, H, d, bits, group_size=g, refine_iters=10))
        yield f"{tag.replace(', row scales', '')}: GPTVQ without row scales", vq_bits(R, C, d, bits, G) / (R * C), plain.weight, dt


def main():
    torch.set_num_threads(1)
    W0, H = problem()
    rows = torch.exp(torch.randn(W0.shape[0], 1, generator=torch.Generator().manual_seed(5)) * 0.5)
    for title, W in (("rows of one distribution", W0), ("rows of uneven scale", W0 * rows)):
        base = layer_error(W, torch.zeros_like(W), H)
        print(f"\n{title}\n\n| method | bits/weight | relative output error | seconds |\n|---|---|---|---|")
        for bits in (2, 3):
            for name, b, q, dt in rows_for(W, H, bits):
                print(f"| {name} | {b:.3f} | {layer_error(W, q, H) / base:.5f} | {dt:.2f} |")


if __name__ == "__main__":
    main()
