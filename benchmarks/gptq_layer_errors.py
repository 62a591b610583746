"""Where does a compressed model's error come from on each kind of text? Per-linear output error.

Compresses SmolLM2 with each recipe (public API, 128 calibration windows of the calibration
source), then runs test windows of each source through the compressed model and measures, at
every targeted linear, the relative error of its output against the full-precision weight on
the same input, ``||(W_hat - W) x||^2 / ||W x||^2`` (summed over the windows' tokens), also
split into the windows' first token and the rest. Prints the layers where the recipes differ
most.

    flock /tmp/llmpress-heavy.lock .venv/bin/python benchmarks/gptq_layer_errors.py \
        --variants gptq-natural,gptq-act-order,rtn-w4g64-full-range --json runs/gptq_layer_errors.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import forward_each  # noqa: E402
from domains import VARIANTS  # noqa: E402

from llmpress import api, models  # noqa: E402
from llmpress.calib.engine import EngineOptions  # noqa: E402


def layer_errors(model, fp_weights: dict, windows: torch.Tensor) -> dict:
    acc: dict[str, list[float]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if name not in fp_weights:
            continue

        def hook(m, inp, _out, name=name):
            x = inp[0].detach()
            d = (x @ (m.weight.data - fp_weights[name]).t()).pow(2).sum(-1)  # [b, L]
            r = (x @ fp_weights[name].t()).pow(2).sum(-1)
            a = acc.setdefault(name, [0.0, 0.0, 0.0, 0.0, 0.0, 0])
            a[0] += float(d[:, 0].sum())
            a[1] += float(r[:, 0].sum())
            a[2] += float(d[:, 1:].sum())
            a[3] += float(r[:, 1:].sum())
            a[4] += float((d[:, 1:] / r[:, 1:].clamp_min(1e-30)).sum())  # per-token relative error, summed
            a[5] += d[:, 1:].numel()

        hooks.append(mod.register_forward_hook(hook))
    forward_each(model, windows, hooks)
    return {n: {"first": a[0] / a[1], "rest": a[2] / a[3], "token_mean": a[4] / a[5]} for n, a in acc.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default="wiki")
    ap.add_argument("--eval", default="wiki,code")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--variants", default="gptq-natural,gptq-act-order,rtn-w4g64-full-range")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    model, tok = models.load(a.model)
    calib = api.calibration_windows(tok, model, api.CalibConfig(source=a.calib))
    windows = {s: api.evaluation_windows(tok, model, api.EvalConfig(source=s, max_windows=a.eval_windows)) for s in a.eval.split(",")}
    fp = {n: m.weight.data.clone() for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    res = {}
    for v in a.variants.split(","):
        recipe, eng = VARIANTS[v]
        m = copy.deepcopy(model)
        api.compress(m, recipe, calib if api.needs_calibration(recipe) else None, tokenizer=tok, engine=EngineOptions(progress=False, **eng))
        res[v] = {s: layer_errors(m, fp, w) for s, w in windows.items()}
        del m
        print(f"{v} done", file=sys.stderr, flush=True)
    names = list(fp)
    variants = a.variants.split(",")
    for s in windows:
        print(f"\n{s}: layers with the largest error (relative output error, rest of tokens / first token)")
        key = lambda n: max(res[v][s][n]["rest"] for v in variants)  # noqa: E731, B023  (used within this iteration)
        print("| layer | " + " | ".join(variants) + " |")
        print("|---|" + "---|" * len(variants))
        for n in sorted(names, key=key, reverse=True)[: a.top]:
            print(f"| {n} | " + " | ".join(f"{res[v][s][n]['rest']:.2e} / {res[v][s][n]['first']:.2e}" for v in variants) + " |")
        for v in variants:
            tot = sum(res[v][s][n]["rest"] for n in names) / len(names)
            tm = sum(res[v][s][n]["token_mean"] for n in names) / len(names)
            print(f"  mean over layers, {v}: pooled {tot:.3e}, per-token mean {tm:.3e}")
        print(f"\n{s}: layers with the largest per-token mean relative error")
        for n in sorted(names, key=lambda n: max(res[v][s][n]["token_mean"] for v in variants), reverse=True)[: a.top]:
            print(f"| {n} | " + " | ".join(f"{res[v][s][n]['token_mean']:.2e}" for v in variants) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
