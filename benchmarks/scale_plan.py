"""Sizes that decide how llmpress runs on 8B to 405B models: per decoder block, the weights,
the calibration activations, the Hessians GPTQ/SparseGPT accumulate and what data-parallel
calibration all-reduces; per model, the weights. Arithmetic on the published shapes of the
Llama-3.1 family (hidden size, MLP width, layers, heads, KV heads), nothing downloaded.

    .venv/bin/python benchmarks/scale_plan.py [--windows 128] [--seqlen 512] [--ranks 8]

Prints the markdown table of docs/scale.md.
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


def rows(windows: int, seqlen: int, ranks: int) -> list[dict]:
    out = []
    for name, (h, inter, layers, heads, kv, vocab) in MODELS.items():
        p = block_params(h, inter, heads, kv)
        hess = sum(d * d for d in hessian_inputs(h, inter))
        tokens = windows * seqlen
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
            "solve_tflop_block": sum(o * i * i for o, i in ((h, h), (kv * h // heads, h), (kv * h // heads, h), (h, h), (inter, h), (inter, h), (h, inter))) / 1e12,
            "forward_tflop_block": 2 * p * tokens / 1e12,
            "gram_tflop_block": 2 * tokens * hess / 1e12,
        })  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--ranks", type=int, default=8)
    a = ap.parse_args()
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
