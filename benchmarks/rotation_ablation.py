"""Where a rotated W4A4KV4 model loses its quality, on SmolLM2-135M (or another model).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rotation_ablation.py [--sections budget,rtn_layers]

- budget: QuaRot + GPTQ W4 g64 weights (weight-only, once), then on copies of that model
  the 4-bit KV cache alone, 4-bit per-token activations alone, both, and both with
  QuaRot's clipping (activations 0.9, KV 0.95) or 0.85 for activations: perplexity of each
  on ``--eval-windows`` test windows. Answers "is it the weights, the activations or the
  cache?".
- rtn_layers: the relative output error ||x (Q(W) - W)^T|| / ||x W^T|| of round-to-nearest
  W4 g64 on one test window, per kind of linear, without rotation and after QuaRot (the
  full-precision outputs are the same, so the errors compare directly), plus the relative
  weight error ||Q(W) - W|| / ||W||. Answers "why is QuaRot + RTN worse than no rotation
  at W4A8?".
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import time

import torch

from llmpress import models
from llmpress.api import CalibConfig, EvalConfig, calibration_windows, compress, evaluation_windows
from llmpress.eval.perplexity import perplexity
from llmpress.quant import QuantArgs
from llmpress.quant.core import fake_quantize
from llmpress.recipe import stage

W4 = QuantArgs(bits=4, symmetric=True, granularity="group", group_size=64)
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def a4(clip: float = 1.0) -> QuantArgs:
    return QuantArgs(bits=4, symmetric=True, granularity="token", clip_ratio=clip)


def kv4(clip: float = 1.0) -> QuantArgs:
    return QuantArgs(bits=4, symmetric=False, granularity="token", clip_ratio=clip)


def budget(base, ev, cal, seed: int, residual: str = "offline") -> None:
    fp = perplexity(base, ev, 4)
    m = copy.deepcopy(base)
    compress(m, [stage("quarot", seed=seed, residual=residual)], data=cal)
    t = time.perf_counter()
    compress(m, [stage("gptq", weights=W4)], data=cal)
    w_only = perplexity(m, ev, 4)
    print(f"full precision ppl {fp:.3f}; QuaRot + GPTQ W4 g64 weights only {w_only:.3f} ({w_only / fp:.3f}x; GPTQ {time.perf_counter() - t:.0f}s)")
    print()
    print("| added to QuaRot + GPTQ W4 | ppl | x fp |")
    print("|---|---|---|")
    print(f"| nothing (weights only) | {w_only:.3f} | {w_only / fp:.3f} |")
    variants = {
        "int4 KV cache": (None, kv4()),
        "int4 per-token activations": (a4(), None),
        "int4 activations + int4 KV cache": (a4(), kv4()),
        "the same, clipped (activations 0.9, KV 0.95)": (a4(0.9), kv4(0.95)),
        "int4 activations clipped at 0.9, 16-bit KV": (a4(0.9), None),
        "activations clipped at 0.85, KV at 0.95": (a4(0.85), kv4(0.95)),
    }
    for label, (act, kv) in variants.items():
        q = copy.deepcopy(m)
        st = []
        if kv is not None:
            st.append(stage("kv_quant", keys=kv, values=kv))
        if act is not None:
            st.append(stage("rtn", weights=None, activations=act))
        compress(q, st, data=cal)
        p = perplexity(q, ev, 4)
        print(f"| {label} | {p:.3f} | {p / fp:.3f} |", flush=True)
        del q


@torch.no_grad()
def _rtn_errors(model, ids) -> dict[str, tuple[float, float]]:
    out: dict[str, tuple[float, float]] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and "lm_head" not in name:

            def hook(m, inp, _n=name):
                x = inp[0].reshape(-1, inp[0].shape[-1]).float()
                w = m.weight.float()
                e = fake_quantize(w, W4) - w
                out[_n] = (float((x @ e.T).norm() / (x @ w.T).norm()), float(e.norm() / w.norm()))

            handles.append(mod.register_forward_pre_hook(hook))
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    # "model.layers.3.mlp.down_proj(.linear)" -> "3.down_proj": online rotations wrap some linears
    return {re.sub(r"\.linear$", "", re.sub(r"^.*layers\.(\d+)\.(?:self_attn|mlp)\.", r"\1.", k)): v for k, v in out.items()}


def rtn_layers(base, ev, seed: int, residual: str = "offline") -> None:
    rot = copy.deepcopy(base)
    compress(rot, [stage("quarot", seed=seed, residual=residual)], data=ev[:2])
    a, b = _rtn_errors(base, ev[:1]), _rtn_errors(rot, ev[:1])
    print("| linear | output error, no rotation | after QuaRot | weight error, no rotation | after QuaRot | worst block (output error ratio) |")
    print("|---|---|---|---|---|---|")
    for kind in KINDS:
        ks = [k for k in a if k.endswith(kind) and k in b]
        if not ks:
            continue
        mean = lambda d, i: sum(d[k][i] for k in ks) / len(ks)  # noqa: E731, B023  (used within this iteration)
        worst = max(ks, key=lambda k: b[k][0] / a[k][0])
        print(
            f"| {kind} | {mean(a, 0):.4f} | {mean(b, 0):.4f} | {mean(a, 1):.4f} | {mean(b, 1):.4f} | {worst.split('.')[0]} ({b[worst][0] / a[worst][0]:.2f}x) |"
        )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sections", default="budget,rtn_layers")
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--residual", default="offline", choices=["offline", "online"], help="QuaRot's residual rotation (llama family)")
    a = ap.parse_args(argv)
    secs = [s for s in a.sections.split(",") if s]
    bad = [s for s in secs if s not in ("budget", "rtn_layers")]
    if bad:
        ap.error(f"unknown sections {bad}")
    torch.manual_seed(a.seed)
    base, tok = models.load(a.model)
    ev = evaluation_windows(tok, base, EvalConfig(max_windows=a.eval_windows))
    print(f"{a.model}, {ev.shape[0]} test windows of {ev.shape[1]} tokens, {a.calib_windows} calibration windows")
    print()
    if "rtn_layers" in secs:
        rtn_layers(base, ev, a.seed, a.residual)
        print()
    if "budget" in secs:
        cal = calibration_windows(tok, base, CalibConfig(n_samples=a.calib_windows))
        budget(base, ev, cal, a.seed, a.residual)
    return 0


if __name__ == "__main__":
    sys.exit(main())
