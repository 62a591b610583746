"""Sizes that decide how llmpress runs on 8B to 405B models: per decoder block, the weights,
the calibration activations, the Hessians GPTQ/SparseGPT accumulate and what data-parallel
calibration all-reduces; per model, the weights. Arithmetic on the published shapes of the
Llama-3.1 family (hidden size, MLP width, layers, heads, KV heads), nothing downloaded.

    .venv/bin/python benchmarks/scale_plan.py [--windows 128] [--seqlen 512] [--ranks 8]
    .venv/bin/python benchmarks/scale_plan.py --times [--measured runs/bench/scale.json]

Prints the markdown tables of docs/scale.md. ``--times`` also measures this machine's
float32 matrix-product rate and GPTQ solve rate (llmpress's own ``gptq_quantize``), checks
the time model against a measured synthetic-model run when one is given, and prints the
expected time per block and per model on 1, 2 and 4 ranks next to llm-compressor's
published GPTQ figures for Llama-3-8B.
"""

from __future__ import annotations

import argparse

# name -> (hidden, intermediate, layers, heads, kv_heads, vocab)
MODELS = {
    "Llama-3.1-8B": (4096, 14336, 32, 32, 8, 128256),
    "Llama-3.1-70B": (8192, 28672, 80, 64, 8, 128256),
    "Llama-3.1-405B": (16384, 53248, 126, 128, 8, 128256),
}
GB = 1e9


def block_params(h: int, inter: int, heads: int, kv: int) -> int:
    hd = h // heads
    return h * h * 2 + h * kv * hd * 2 + h * inter * 3  # q, o; k, v; gate, up, down


def hessian_inputs(h: int, inter: int) -> list[int]:
    """Input widths with one Hessian each: q/k/v share one, o, gate/up share one, down."""
    return [h, h, h, inter]


def solve_flop(o: int, i: int) -> float:
    """GPTQ on one [o, i] weight: the damped Cholesky, its inverse and the upper factor of
    the inverse (about i^3/3 + i^3 + i^3/3), then the error feedback (about o * i^2)."""
    return o * i * i + 5 / 3 * i**3


def block_linears(h: int, inter: int, heads: int, kv: int) -> list[tuple[str, int, int]]:
    """(group, out, in) of a Llama block's seven linears, in the engine's group order."""
    kvd = kv * (h // heads)
    return [("qkv", h, h), ("qkv", kvd, h), ("qkv", kvd, h), ("o", h, h), ("gate_up", inter, h), ("gate_up", inter, h), ("down", h, inter)]


def block_flop(h: int, inter: int, heads: int, kv: int, tokens: int, seqlen: int) -> dict:
    """FLOP of one GPTQ block in the staged single pass: every linear's product once, the
    attention scores and mixing (causal: half of 4 * seqlen * h per token), the Gram
    products of the four Hessians, and the seven solves."""
    p = block_params(h, inter, heads, kv)
    return {
        "forward": 2 * p * tokens + 2 * seqlen * h * tokens,
        "gram": 2 * tokens * sum(d * d for d in hessian_inputs(h, inter)),
        "solves": [(g, solve_flop(o, i)) for g, o, i in block_linears(h, inter, heads, kv)],
    }


def block_seconds(f: dict, gemm: float, solve: float, ranks: int) -> float:
    """Expected seconds per block on ``ranks`` ranks: the forward and the Gram products
    split by windows; the solves of a group spread over ranks, one linear per rank (so a
    group of one, o or down, gains nothing), as the engine's bin packing does."""
    t = (f["forward"] + f["gram"]) / gemm / ranks
    for g in dict.fromkeys(x for x, _ in f["solves"]):
        costs = sorted((c for x, c in f["solves"] if x == g), reverse=True)
        loads = [0.0] * ranks
        for c in costs:
            loads[loads.index(min(loads))] += c
        t += max(loads) / solve
    return t


def measure_rates() -> dict:
    """This machine's float32 matmul rate (a 2048 x 2048 product) and GPTQ solve rate
    (``gptq_quantize`` on a [2048, 2048] weight, w4 group 64, act_order, in FLOP of
    :func:`solve_flop` per second), each the best of three."""
    import time

    import torch

    from llmpress.quant.args import QuantArgs
    from llmpress.quant.gptq import gptq_quantize

    g = torch.Generator().manual_seed(0)
    n = 2048
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    x = torch.randn(4 * n, n, generator=g)
    H = x.T @ x / x.shape[0]
    w = torch.randn(n, n, generator=g) / n**0.5
    args = QuantArgs(bits=4, granularity="group", group_size=64, full_range=True)
    best = {"gemm": float("inf"), "solve": float("inf")}
    for _ in range(3):
        t = time.perf_counter()
        a @ b
        best["gemm"] = min(best["gemm"], time.perf_counter() - t)
        t = time.perf_counter()
        gptq_quantize(w, H, args, act_order=True, damp=0.3)
        best["solve"] = min(best["solve"], time.perf_counter() - t)
    return {"gemm_flops": 2 * n**3 / best["gemm"], "solve_flops": solve_flop(n, n) / best["solve"], "threads": torch.get_num_threads()}


# llm-compressor's published GPTQ times for Llama-3-8B (W4A16) by number of GPUs
PEER_8B_SECONDS = {1: 745, 2: 372, 4: 264}


def times(windows: int, seqlen: int, measured: str | None) -> None:
    import json

    r = measure_rates()
    print(f"this machine ({r['threads']} threads): float32 matmul {r['gemm_flops'] / 1e9:.1f} GFLOP/s, "
          f"GPTQ solve {r['solve_flops'] / 1e9:.1f} GFLOP/s\n")  # fmt: skip
    if measured:
        s = json.loads(open(measured).read())["synth"]
        c = s["config"]
        h, inter = c["hidden_size"], c["intermediate_size"]
        heads = kv = h // 64  # the synthetic model: head dim 64, no grouped K/V (benchmarks/scale.py)
        for recipe in [k for k in s if k.startswith("gptq")]:
            n = s[recipe]["argv"][s[recipe]["argv"].index("--calib-samples") + 1] if "--calib-samples" in s[recipe]["argv"] else 128
            f = block_flop(h, inter, heads, kv, int(n) * 512, 512)
            print(f"check against {measured} ({recipe}, {h}x{inter}, {n} windows of 512): model "
                  f"{block_seconds(f, r['gemm_flops'], r['solve_flops'], 1):.1f} s per block, measured median "
                  f"{s[recipe]['block_seconds_median']:.1f} s\n")  # fmt: skip
    print(f"calibration: {windows} windows of {seqlen} tokens\n")
    print("| model | forward + Gram TFLOP per block | solves TFLOP per block | s per block here, 1 rank | hours per model here, 1 / 2 / 4 ranks |")
    print("|---|---|---|---|---|")
    for name, (h, inter, layers, heads, kv, _vocab) in MODELS.items():
        f = block_flop(h, inter, heads, kv, windows * seqlen, seqlen)
        per = {n: block_seconds(f, r["gemm_flops"], r["solve_flops"], n) for n in (1, 2, 4)}
        print(f"| {name} | {(f['forward'] + f['gram']) / 1e12:.1f} | {sum(c for _, c in f['solves']) / 1e12:.2f} | {per[1]:.0f} | "
              + " / ".join(f"{per[n] * layers / 3600:.1f}" for n in (1, 2, 4)) + " |")  # fmt: skip
    h, inter, layers, heads, kv, _ = MODELS["Llama-3.1-8B"]
    f = block_flop(h, inter, heads, kv, windows * seqlen, seqlen)
    big = block_flop(h, inter, heads, kv, 512 * 2048, 2048)  # llm-compressor's examples: 512 samples of 2048 tokens
    print("\nLlama-3-8B against llm-compressor's published GPTQ times (same shapes as 3.1-8B; their calibration set is not")
    print(f"part of the figures: the rate each implies is given for {windows} x {seqlen} tokens and for 512 x 2048):\n")
    print(f"| GPUs | llm-compressor s | implied TFLOP/s per GPU, {windows}x{seqlen} | ... 512x2048 | llm-compressor speed-up | "
          "llmpress model speed-up, this machine's rates |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for n, secs in PEER_8B_SECONDS.items():
        sp = block_seconds(f, r["gemm_flops"], r["solve_flops"], 1) / block_seconds(f, r["gemm_flops"], r["solve_flops"], n)
        rate = [block_seconds(x, 1.0, 1.0, 1) * layers / secs / n / 1e12 for x in (f, big)]
        print(f"| {n} | {secs} | {rate[0]:.1f} | {rate[1]:.1f} | {PEER_8B_SECONDS[1] / secs:.2f}x | {sp:.2f}x |")


def rows(windows: int, seqlen: int, ranks: int) -> list[dict]:
    out = []
    for name, (h, inter, layers, heads, kv, vocab) in MODELS.items():
        p = block_params(h, inter, heads, kv)
        hess = sum(d * d for d in hessian_inputs(h, inter))
        tokens = windows * seqlen
        f = block_flop(h, inter, heads, kv, tokens, seqlen)
        out.append({
            "model": name,
            "weights_gb_bf16": (p * layers + 2 * vocab * h) * 2 / GB,
            "block_gb_bf16": p * 2 / GB,
            "block_gb_fp32": p * 4 / GB,
            "acts_gb_fp32": tokens * h * 4 / GB,  # one block's inputs (outputs: the same again)
            "acts_gb_fp32_per_rank": tokens * h * 4 / GB / ranks,
            "hessians_gb_fp64": hess * 8 / GB,  # the running sums (llmpress keeps them in float64)
            "largest_hessian_gb_fp64": inter * inter * 8 / GB,
            "allreduce_gb_per_block": hess * 8 / GB,  # one all-reduce of every Hessian sum per block
            "allreduce_tb_model": hess * 8 * layers / 1e12,
            "solve_tflop_block": sum(c for _, c in f["solves"]) / 1e12,
            "forward_tflop_block": f["forward"] / 1e12,
            "gram_tflop_block": f["gram"] / 1e12,
        })  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--times", action="store_true", help="measure this machine's rates and print the time model")
    ap.add_argument("--measured", default=None, help="a benchmarks/scale.py JSON whose synthetic GPTQ run checks the time model")
    a = ap.parse_args()
    if a.times:
        times(a.windows, a.seqlen, a.measured)
        return
    print(f"calibration: {a.windows} windows of {a.seqlen} tokens; activations per rank with {a.ranks} ranks\n")
    cols = [
        ("model", "model", "{}"), ("weights_gb_bf16", "weights GB (bf16)", "{:.1f}"), ("block_gb_bf16", "one block GB (bf16)", "{:.2f}"),
        ("acts_gb_fp32", "block inputs GB (fp32)", "{:.2f}"), ("acts_gb_fp32_per_rank", f"... per rank of {a.ranks}", "{:.2f}"),
        ("hessians_gb_fp64", "Hessian sums per block GB (fp64)", "{:.2f}"), ("largest_hessian_gb_fp64", "down_proj Hessian GB", "{:.2f}"),
        ("allreduce_tb_model", "all-reduce volume per model TB", "{:.2f}"), ("forward_tflop_block", "block forward TFLOP", "{:.1f}"),
        ("gram_tflop_block", "Hessian products TFLOP", "{:.1f}"), ("solve_tflop_block", "GPTQ solves TFLOP", "{:.2f}"),
    ]  # fmt: skip
    print("| " + " | ".join(c[1] for c in cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows(a.windows, a.seqlen, a.ranks):
        print("| " + " | ".join(f.format(r[k]) for k, _, f in cols) + " |")


if __name__ == "__main__":
    main()
