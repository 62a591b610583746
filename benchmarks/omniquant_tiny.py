"""OmniQuant-style LWC + LET (``omniquant``) and DuQuant's smoothing step on tiny random models
(no real model): whole-model relative logit error on held-out windows against RTN, GPTQ and
``blockwise`` (weight-only), and against RTN with and without a rotation (W4A4); the same on
tiny models with planted outlier channels (three norm gains x25 per norm); DuQuant W4A4
with and without smoothing; the CPU time of one step on a block of SmolLM2-135M's shapes.

    OMP_NUM_THREADS=1 PYTHONPATH=src:tests .venv/bin/python benchmarks/omniquant_tiny.py [--part weights|acts|duquant|time|all]

The tiny models are those of tests/conftest.py (hidden 64, MLP 128, random weights, 4 blocks).
Metric: mean((z - z_fp)^2) / mean(z_fp^2) over the logits of 16 held-out windows of 32 tokens;
32 calibration windows of 32 tokens.
"""

import argparse
import time

import torch
from conftest import random_windows, tiny_gemma3, tiny_llama

from llmpress import compress, stage
from llmpress.calib.engine import EngineOptions
from llmpress.quant import QuantArgs

QUIET = EngineOptions(progress=False)
LAYERS = 4
A4 = QuantArgs(bits=4, granularity="token")
KV4 = QuantArgs(bits=4, symmetric=False, granularity="token")


def planted(make):
    def build(**kw):
        m = make(**kw)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for layer in m.model.layers:
                gemma = hasattr(layer, "pre_feedforward_layernorm")  # gain 1 + w
                for norm in (layer.input_layernorm, layer.pre_feedforward_layernorm if gemma else layer.post_attention_layernorm):
                    idx = torch.randperm(norm.weight.numel(), generator=g)[:3]
                    norm.weight[idx] = (1.0 + norm.weight[idx]) * 25.0 - 1.0 if gemma else norm.weight[idx] * 25.0
        return m

    build.__name__ = f"{make.__name__} planted"
    return build


MODELS = (tiny_llama, tiny_gemma3, planted(tiny_llama), planted(tiny_gemma3))


def rel_error(make, recipe) -> tuple[float, float]:
    calib, held = random_windows(32, 32, seed=0), random_windows(16, 32, seed=7)
    with torch.no_grad():
        ref = make(layers=LAYERS)(held).logits
    m = make(layers=LAYERS)
    t = time.perf_counter()
    compress(m, recipe, data=calib, engine=QUIET)
    dt = time.perf_counter() - t
    with torch.no_grad():
        got = m(held).logits
    return float((got - ref).pow(2).mean() / ref.pow(2).mean()), dt


def table(title: str, columns: dict, rows):
    print(f"\n{title}\n| model | grid | " + " | ".join(columns) + " |\n|---|---|" + "---|" * len(columns))
    for make in MODELS:
        for label, args in rows:
            cells = [f"{rel_error(make, build(args))[0]:.2e}" for build in columns.values()]
            print(f"| {make.__name__.replace('_', ' ')} | {label} | " + " | ".join(cells) + " |", flush=True)


def part_weights():
    cols = {
        "RTN": lambda a: stage("rtn", weights=a),
        "GPTQ": lambda a: stage("gptq", weights=a),
        "blockwise": lambda a: stage("blockwise", weights=a),
        "omniquant LWC": lambda a: stage("omniquant", weights=a, let=False),
        "omniquant LWC+LET": lambda a: stage("omniquant", weights=a),
    }
    rows = [("W4 g32", QuantArgs(bits=4, group_size=32, full_range=True)), ("W3 g32", QuantArgs(bits=3, group_size=32, full_range=True))]
    table("weight-only", cols, rows)


def part_acts():
    def rot(*rest):
        return [stage("quarot", rotation="random_hadamard", residual="online"), stage("kv_quant", keys=KV4, values=KV4), *rest]

    lin = {"targets": ["Linear"], "ignore": ["lm_head"]}
    cols = {
        "RTN": lambda a: stage("rtn", weights=a, activations=A4, **lin),
        "omniquant LWC": lambda a: stage("omniquant", weights=a, activations=A4, let=False, **lin),
        "omniquant LWC+LET": lambda a: stage("omniquant", weights=a, activations=A4, **lin),
        "omniquant +shift": lambda a: stage("omniquant", weights=a, activations=A4, shift=True, **lin),
        "QuaRot KV4 + RTN": lambda a: rot(stage("rtn", weights=a, activations=A4, **lin)),
        "QuaRot KV4 + omniquant": lambda a: rot(stage("omniquant", weights=a, activations=A4, **lin)),
    }
    table("W4A4 (per-token int4 activations)", cols, [("W4 g32", QuantArgs(bits=4, group_size=32))])


def part_duquant():
    lin = {"targets": ["Linear"], "ignore": ["lm_head"]}

    def duq(smooth, alpha=0.6):
        return lambda a: [
            stage("duquant", block_size=16, steps=16, windows=16, residual="online", smooth=smooth, smooth_alpha=alpha),
            stage("rtn", weights=a, activations=A4, **lin),
        ]

    cols = {"no smoothing": duq(False), "alpha 0.5": duq(True, 0.5), "alpha 0.6 (default)": duq(True), "alpha auto": duq(True, "auto")}
    table("DuQuant (online, block 16) + RTN W4A4", cols, [("W4 g32", QuantArgs(bits=4, group_size=32))])


def part_time():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=576, intermediate_size=1536, num_hidden_layers=1, num_attention_heads=9, num_key_value_heads=3)
    torch.manual_seed(0)
    ids = torch.randint(0, 512, (16, 512))
    for amp in (False, True):
        cpu = {}
        for iters in (2, 12):
            torch.manual_seed(0)
            m = LlamaForCausalLM(cfg).eval()
            t = time.process_time()
            st = stage("omniquant", weights=QuantArgs(bits=4, group_size=64), iters=iters, amp=amp, **{"targets": ["re:.*layers.*"]})
            compress(m, st, data=ids, engine=QUIET)
            cpu[iters] = time.process_time() - t
        step = (cpu[12] - cpu[2]) / 10
        kind = "bfloat16 steps (amp: true)" if amp else "float32 steps (amp: false)"
        print(
            f"SmolLM2-135M-shaped block, 2 windows x 512 tokens per step, {kind}: {step:.3f} s CPU per step; the rest of a block: {cpu[2] - 2 * step:.2f} s"
        )


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("weights", "acts", "duquant", "time", "all"), default="all")
    a = ap.parse_args()
    for name, fn in (("weights", part_weights), ("acts", part_acts), ("duquant", part_duquant), ("time", part_time)):
        if a.part in (name, "all"):
            fn()
