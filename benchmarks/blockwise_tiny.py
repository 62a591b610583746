"""Block-wise reconstruction (``blockwise``) on tiny random models (no real model): the block
output error against nearest rounding on calibration and held-out windows, whole-model
logit errors of RTN / GPTQ / blockwise sequential / parallel, and the CPU time of one step
on a random block of SmolLM2-135M's shapes.

    OMP_NUM_THREADS=1 PYTHONPATH=src:tests .venv/bin/python benchmarks/blockwise_tiny.py [--part block|model|time|all]

The tiny models are those of tests/conftest.py (hidden 64, MLP 128, random weights), learned
with float32 matmuls (`amp: false`); the timing part measures both.
"""

import argparse
import time

import torch
from conftest import random_windows, tiny_gemma3, tiny_llama

from llmpress import compress, stage
from llmpress.calib.engine import EngineOptions
from llmpress.quant import QuantArgs
from llmpress.quant.blockwise import BlockwiseOptions, LearnedQuant, block_error, learn_block

QUIET = EngineOptions(progress=False)


def block_calls(model, windows, index=0, batch=4):
    """Inputs, call arguments and outputs of block ``index`` per batch of ``windows``."""
    block = model.model.layers[index]
    xs, calls, ys = [], [], []

    def pre(_m, args, kwargs):
        xs.append(args[0].detach())
        calls.append((tuple(args[1:]), dict(kwargs)))

    def post(_m, _a, _k, out):
        ys.append((out[0] if isinstance(out, tuple) else out).detach())

    hs = [block.register_forward_pre_hook(pre, with_kwargs=True), block.register_forward_hook(post, with_kwargs=True)]
    try:
        with torch.no_grad():
            for ids in windows.split(batch):
                model(input_ids=ids, use_cache=False)
    finally:
        for h in hs:
            h.remove()
    return block, xs, calls, ys


def quants_of(block, args):
    return {n: LearnedQuant(m.weight.data, args, learn_clip=True, name=n) for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}


def part_block():
    grids = {"int4 sym full range": QuantArgs(bits=4, group_size=32, full_range=True), "int3 sym": QuantArgs(bits=3, group_size=32),
             "int2 sym": QuantArgs(bits=2, group_size=32)}  # fmt: skip
    print("| model | grid | calibration | held out |\n|---|---|---|---|")
    for make in (tiny_llama, tiny_gemma3):
        for label, args in grids.items():
            m = make()
            block, xs, calls, ys = block_calls(m, random_windows(16, 32, seed=0))
            _, hx, hc, hy = block_calls(m, random_windows(16, 32, seed=7))
            q = quants_of(block, args)
            res = learn_block(block, q, xs, calls, ys, BlockwiseOptions(amp=False))
            held = block_error(block, q, hx, hc, hy)
            for v in q.values():
                v.reset()
            held_rtn = block_error(block, q, hx, hc, hy)
            print(f"| {make.__name__.replace('_', ' ')} | {label} | {res.error / res.error_rtn:.3f} | {held / held_rtn:.3f} |", flush=True)


def part_model(layers: int):
    calib, held = random_windows(32, 32, seed=0), random_windows(16, 32, seed=7)
    print(f"layers={layers}\n| model | grid | RTN | GPTQ | blockwise sequential | blockwise parallel |\n|---|---|---|---|---|---|")
    for make in (tiny_llama, tiny_gemma3):
        with torch.no_grad():
            ref = make(layers=layers)(held).logits
        for bits in (4, 3, 2):
            args = QuantArgs(bits=bits, group_size=32, full_range=True)
            row = []
            for st in (
                stage("rtn", weights=args),
                stage("gptq", weights=args),
                stage("blockwise", weights=args, amp=False),
                stage("blockwise", weights=args, mode="parallel", amp=False),
            ):
                m = make(layers=layers)
                compress(m, st, data=calib, engine=QUIET)
                with torch.no_grad():
                    got = m(held).logits
                row.append(f"{float((got - ref).pow(2).mean() / ref.pow(2).mean()):.2e}")
            print(f"| {make.__name__.replace('_', ' ')} | W{bits} | " + " | ".join(row) + " |", flush=True)


def part_time():
    """CPU seconds per learning step on a block of SmolLM2-135M's shapes: 2 and 8 windows of
    512 tokens per step, float32 and bfloat16 (``amp``) matmuls; and the final comparison
    with nearest rounding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=576, intermediate_size=1536, num_hidden_layers=1, num_attention_heads=9, num_key_value_heads=3)
    m = LlamaForCausalLM(cfg).eval()
    block, xs, calls, ys = block_calls(m, torch.randint(0, 512, (16, 512)), batch=8)
    args = QuantArgs(bits=4, group_size=64, full_range=True)
    for amp in (False, True):
        for wps in (2, 8):
            cpu = {}
            for iters in (2, 12):
                q = quants_of(block, args)
                t = time.process_time()
                learn_block(block, q, xs, calls, ys, BlockwiseOptions(iters=iters, windows_per_step=wps, amp=amp))
                cpu[iters] = time.process_time() - t
            step = (cpu[12] - cpu[2]) / 10
            print(f"SmolLM2-135M-shaped block, {wps} windows x 512 tokens per step, {'bfloat16' if amp else 'float32'} matmuls: "
                  f"{step:.3f} s CPU per step; final comparison with RTN over 2 batches of 8 windows: {cpu[2] - 2 * step:.2f} s")  # fmt: skip


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("block", "model", "time", "all"), default="all")
    a = ap.parse_args()
    if a.part in ("block", "all"):
        part_block()
    if a.part in ("model", "all"):
        part_model(2)
        part_model(4)
    if a.part in ("time", "all"):
        part_time()
