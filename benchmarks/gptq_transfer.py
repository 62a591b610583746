"""Why does GPTQ's error transfer (or not) to text it was not calibrated on? Layer-level study.

For a sample of SmolLM2's blocks, gathers each linear layer's input Hessian
``H_d = X_d X_d^T / n`` on the full-precision model for the calibration text and for the
test splits of three domains, solves GPTQ with the calibration Hessian under each knob
setting, and reports the relative output error of the result on every domain,

    err_d(W_hat) = tr((W_hat - W) H_d (W_hat - W)^T) / tr(W H_d W^T),

next to round-to-nearest on the same grid (summed over the sampled layers, as a ratio to
RTN: below 1 = GPTQ helps on that domain). This is the layer-wise problem GPTQ solves, so
it isolates the solver's choices from the engine's propagation; the model-level figures
are in benchmarks/domains.py.

    flock /tmp/llmpress-heavy.lock .venv/bin/python benchmarks/gptq_transfer.py --json runs/gptq_transfer.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import forward_each  # noqa: E402

from llmpress import api, models  # noqa: E402
from llmpress.quant.args import QuantArgs  # noqa: E402
from llmpress.quant.core import fake_quantize  # noqa: E402
from llmpress.quant.gptq import gptq_quantize  # noqa: E402

GROUPS = {"qkv": "self_attn.q_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_proj", "down": "mlp.down_proj"}
SHARERS = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
           "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}  # fmt: skip


def gather(model, windows: torch.Tensor, blocks: list[int]) -> dict[tuple[int, str], torch.Tensor]:
    """Input second moments X X^T / n (float64) of each sampled block's four input groups."""
    acc: dict[tuple[int, str], list] = {}
    hooks = []
    layers = model.model.layers
    for b in blocks:
        for g, path in GROUPS.items():
            mod = layers[b].get_submodule(path)

            def hook(_m, inp, key=(b, g)):
                x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
                s = acc.setdefault(key, [torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64), 0])
                s[0].addmm_(x.t(), x)
                s[1] += x.shape[0]

            hooks.append(mod.register_forward_pre_hook(hook))
    forward_each(model, windows, hooks)
    return {k: s / n for k, (s, n) in acc.items()}


def rel_err(dw: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> tuple[float, float]:
    dw, w = dw.double(), w.double()
    return float(((dw @ h) * dw).sum()), float(((w @ h) * w).sum())


KNOBS = {
    "natural": {},
    "act_order": {"act_order": True},
    "natural_damp0.1": {"damp": 0.1},
    "natural_damp0.001": {"damp": 0.001},
    "act_order_damp0.1": {"act_order": True, "damp": 0.1},
    "act_order_fp64": {"act_order": True, "fp64": True},
    "act_order_damp1": {"act_order": True, "damp": 1.0},
    "act_order_floor0.03": {"act_order": True, "diag_floor": 0.03},
    "act_order_floor0.1": {"act_order": True, "diag_floor": 0.1},
    "act_order_floor0.3": {"act_order": True, "diag_floor": 0.3},
    "natural_block32": {"block_size": 32},
    "natural_dynamic_groups": {"static_groups": False},
}


def solve_fp64(w: torch.Tensor, h: torch.Tensor, args: QuantArgs, **kw) -> torch.Tensor:
    """The same GPTQ sweep in float64 (weights, Hessian, grid and updates), for the precision knob."""
    import llmpress.quant.gptq as G

    orig = G.prepare

    def prepare64(weight, hessian, name=None):
        W, _, dead = orig(weight, hessian, name)
        return W.double(), hessian.detach().double().clone(), dead

    G.prepare = prepare64
    torch.set_default_dtype(torch.float64)
    try:
        return G.gptq_quantize(w.double(), h.double(), args, **kw).weight.float()
    finally:
        G.prepare = orig
        torch.set_default_dtype(torch.float32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--blocks", default="0,4,8,12,16,20,24,29")
    ap.add_argument("--calib", default="wiki", help="calibration source (a --calib-data value)")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--eval", default="wiki,news,code")
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--knobs", default=",".join(KNOBS))
    ap.add_argument("--shrink", default="0", help="comma list of shrinkage toward the diagonal, H <- (1-a) H + a diag(H)")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    blocks = [int(b) for b in a.blocks.split(",")]
    model, tok = models.load(a.model)
    model.eval()
    t0 = time.time()
    cal = api.calibration_windows(tok, model, api.CalibConfig(source=a.calib, n_samples=a.calib_samples))
    hs = {"calib": gather(model, cal, blocks)}
    for d in a.eval.split(","):
        win = api.evaluation_windows(tok, model, api.EvalConfig(source=d, max_windows=a.eval_windows))
        hs[d] = gather(model, win, blocks)
    print(f"hessians: {time.time() - t0:.0f} s", file=sys.stderr)
    args = QuantArgs(bits=a.bits, symmetric=True, granularity="group", group_size=64, observer="minmax", full_range=True)
    domains = ["calib", *a.eval.split(",")]
    settings = [(k, float(s)) for k in a.knobs.split(",") for s in a.shrink.split(",")]
    tot = {("rtn", 0.0): {d: [0.0, 0.0] for d in domains}}
    tot.update({s: {d: [0.0, 0.0] for d in domains} for s in settings})
    per_kind: dict = {}
    layers = model.model.layers
    for b in blocks:
        for g, paths in SHARERS.items():
            hc = hs["calib"][(b, g)]
            for path in paths:
                w = layers[b].get_submodule(path).weight.detach().float()
                outs = {("rtn", 0.0): fake_quantize(w, args) - w}
                for knob, shrink in settings:
                    h = hc if shrink == 0 else (1 - shrink) * hc + shrink * torch.diag(torch.diagonal(hc))
                    kw = dict(KNOBS[knob])
                    if kw.pop("fp64", False):
                        outs[(knob, shrink)] = solve_fp64(w, h, args, **kw) - w
                    else:
                        outs[(knob, shrink)] = gptq_quantize(w, h.float(), args, **kw).weight - w
                for key, dw in outs.items():
                    for d in domains:
                        e, n = rel_err(dw, w, hs[d][(b, g)])
                        tot[key][d][0] += e
                        tot[key][d][1] += n
                        per_kind.setdefault((key, g, d), [0.0, 0.0])
                        per_kind[(key, g, d)][0] += e
                        per_kind[(key, g, d)][1] += n
        print(f"block {b} done ({time.time() - t0:.0f} s)", file=sys.stderr)
    rtn = {d: tot[("rtn", 0.0)][d][0] / tot[("rtn", 0.0)][d][1] for d in domains}
    rows = []
    print("\n| setting | shrink | " + " | ".join(f"{d} err / RTN" for d in domains) + " |")
    print("|---|---|" + "---|" * len(domains))
    for key, v in tot.items():
        r = {d: (v[d][0] / v[d][1]) / rtn[d] for d in domains}
        rows.append({"setting": key[0], "shrink": key[1], "ratio_to_rtn": r, "rel_err": {d: v[d][0] / v[d][1] for d in domains}})
        print(f"| {key[0]} | {key[1]} | " + " | ".join(f"{r[d]:.3f}" for d in domains) + " |")
    kinds = {}
    for (key, g, d), (e, n) in per_kind.items():
        kinds.setdefault(f"{key[0]}@{key[1]}", {}).setdefault(g, {})[d] = e / n
    print("\nper input group (relative error, natural vs act_order vs rtn):")
    for g in SHARERS:
        for name in ("rtn@0.0", "natural@0.0", "act_order@0.0"):
            if name in kinds:
                print(f"  {g:8s} {name:14s} " + " ".join(f"{d}={kinds[name][g][d]:.2e}" for d in domains))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"args": vars(a), "rows": rows, "per_group": kinds}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
