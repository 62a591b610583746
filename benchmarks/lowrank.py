"""Low rank on SmolLM2-135M (and gemma-3-270m): perplexity against the targeted linears'
parameter ratio, per method, on the three test texts.

    flock /tmp/llmpress-heavy.lock .venv/bin/python benchmarks/lowrank.py [--model smollm2-135m] [--ratios 0.9 0.8 0.7 0.6]
        [--methods svd asvd svd_llm wsvd asvd_fisher] [--eval wiki] [--no-sweep] [--fp-ppl X]
    flock /tmp/llmpress-heavy.lock .venv/bin/python benchmarks/lowrank.py --serve   # serving only

Every Linear but lm_head factored at the same ratio (uniform ranks) and, unless --no-alloc,
with ranks allocated across layers under the same total budget (lowrank_alloc), 128 calibration windows of
512 tokens from the packaged Wikipedia training split, 64 test windows per text. Prints one line
per run, then a markdown table; writes runs/bench/lowrank-MODEL.json and a PNG plot of
perplexity (wiki) against the ratio per method (runs/bench/lowrank-MODEL.png). 100% of the
parameters is the unfactored model (a factorization at the break-even rank saves nothing and
is refused), drawn as the full-precision line. ``wsvd`` and ``asvd_fisher`` run a
``weight_importance`` stage (16 windows of gradients) before the factor stage.

``--tune-ratios R ...``: svd_llm then ``lowrank_tune`` (each block's factors trained against the
full-precision model's block output), uniform and allocated ranks.

``--serve``: llmpress.bench (decode tokens/s at batch 1 and 8, prefill, resident bytes) on
three packed checkpoints kept under runs/bench/lowrank-ckpt-MODEL: every linear but lm_head
factored by svd_llm at 0.765 of its parameters with W4 g64 factors (GPTQ), served by
llmpress's int4 kernel; the same factors in float32; and RTN W4 g64 (dense int4, same
kernel). Stored under "serve" in the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import EVAL_SOURCES, Bench, main_guard  # noqa: E402

from llmpress.quant.args import QuantArgs  # noqa: E402
from llmpress.recipe import stage  # noqa: E402

METHODS = ("svd", "asvd", "svd_llm", "wsvd", "asvd_fisher")


def factor_stages(method: str, ratio: float, **extra) -> list:
    """The stages of one low-rank method on every Linear but lm_head (wsvd and ASVD's Fisher
    variant read a weight_importance stage before them)."""
    lin = dict(targets=["Linear"], ignore=["lm_head"])
    if method == "wsvd":
        return [stage("weight_importance", **lin), stage("wsvd", ratio=ratio, **lin, **extra)]
    if method == "asvd_fisher":
        return [stage("weight_importance", **lin), stage("asvd", ratio=ratio, scale="fisher", **lin, **extra)]
    return [stage(method, ratio=ratio, **lin, **extra)]


def plot(rows: list[dict], fp: float, path: Path, model: str) -> None:
    """Perplexity (first text) against the kept parameter ratio: every linear factored per method and
    rank choice (left); q/k/v only, QSVD's joint factorization against each separately (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    qkv = [r for r in rows if str(r.get("ranks")).startswith("qkv")]
    fig, axes = plt.subplots(1, 2 if qkv else 1, figsize=(11 if qkv else 6, 4), squeeze=False)
    ax = axes[0][0]
    for m in METHODS:
        for ranks, ls in (("uniform", "-"), ("allocated", "--"), ("sweep", ":"), ("uniform-tuned", "-."), ("allocated-tuned", "-.")):
            pts = sorted((r["param_ratio"], r["ppl"]) for r in rows if r.get("lowrank") == m and r.get("ranks") == ranks)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ls=ls, label=f"{m} ({ranks})")
    ax.set_title(f"every linear but lm_head, {model}")
    if qkv:
        for m, ranks, label in (("qsvd", "qkv", "qsvd (joint q/k/v, latent cache)"), ("qsvd", "qkv-allocated", "qsvd, ranks allocated"),
                                ("qsvd", "qkv-allocated-proportional", "qsvd, ranks allocated (proportional rule)"),
                                ("svd_llm", "qkv", "svd_llm of q, k, v separately")):  # fmt: skip
            pts = sorted((r["param_ratio"], r["ppl"]) for r in qkv if r.get("lowrank") == m and r["ranks"] == ranks)
            if pts:
                axes[0][1].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ls="--" if "alloc" in ranks else "-", label=label)
        axes[0][1].set_title(f"q/k/v projections only, {model}")
    for a in axes[0]:
        a.axhline(fp, color="gray", ls="--", label="fp32")
        a.set_xlabel("parameters of the targeted linears (fraction kept)")
        a.set_ylabel("perplexity (wiki, log scale)")
        a.set_yscale("log")
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _num(x: float) -> str:
    return f"{x:.3f}" if x < 100 else f"{x:.1f}" if x < 1e5 else f"{x:.3g}"


def grid_table(rows: list[dict], fp: float) -> str:
    """Markdown: one line per method and rank choice, one column per kept-parameter ratio, each
    cell the first text's perplexity and its ratio to full precision."""
    runs = [r for r in rows if r.get("lowrank")]
    ratios = sorted({r["param_ratio"] for r in runs}, reverse=True)
    keys = list(dict.fromkeys((r["lowrank"], r["ranks"]) for r in runs))
    what = {"uniform": "uniform ranks", "allocated": "allocated ranks", "sweep": "ranks by sensitivity sweep", "qkv": "q/k/v only",
            "uniform-tuned": "uniform ranks, tuned (lowrank_tune)", "allocated-tuned": "allocated ranks, tuned (lowrank_tune)",
            "qkv-allocated": "q/k/v only, allocated ranks", "qkv-allocated-proportional": "q/k/v only, allocated (proportional)", "lrq": "+ W4 factors"}  # fmt: skip
    lines = ["| method | " + " | ".join(f"{x:g}" for x in ratios) + " |", "|---|" + "---|" * len(ratios)]
    for m, ranks in keys:
        cells = []
        for x in ratios:
            hit = [r for r in runs if (r["lowrank"], r["ranks"], r["param_ratio"]) == (m, ranks, x)]
            cells.append(f"{_num(hit[0]['ppl'])} ({_num(hit[0]['ppl'] / fp)}x)" if hit else "")
        lines.append(f"| `{m}`, {what.get(ranks, ranks)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cache_per_token(cfg, ratio: float) -> dict:
    """K/V cache numbers per token and layer: dense (2 d_kv) against QSVD's latent (its rank)."""
    from llmpress.lowrank.core import rank_for_ratio

    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    q_dim, kv_dim = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    r = rank_for_ratio(q_dim + 2 * kv_dim, cfg.hidden_size, ratio)
    return {"dense": 2 * kv_dim, "latent": r, "ratio": r / (2 * kv_dim)}


def decode_speed(b: Bench, ratio: float, context: int, new_tokens: int = 64, rounds: int = 3) -> dict:
    """Greedy decode tokens/s after a ``context``-token prompt and the prompt's prefill seconds, for the
    full-precision model, the QSVD checkpoint served with its latent cache, and the same factors with
    the usual K/V cache, the models interleaved over ``rounds`` rounds, each figure the best round
    (all rounds kept); with the cache's bytes at the end. Prefill: ``generate`` of one token (the
    prompt's forward with the head on its last position only); decode: the extra seconds of
    ``new_tokens`` more, per token."""
    import copy
    import tempfile
    import time

    import torch
    from transformers import DynamicCache

    from llmpress import api, load_compressed
    from llmpress.runtime.latent_kv import LatentKVAttention

    prompt = b.sets[next(iter(b.sets))].reshape(1, -1)[:, :context]
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        m = copy.deepcopy(b.model)
        rep = api.compress(m, [stage("qsvd", targets=["re:.*self_attn\\.(q|k|v)_proj$"], ratio=ratio)], b.calib, tokenizer=b.tok, calib=b.calib_cfg)
        api.save(m, b.tok, Path(tmp) / "q", report=rep)
        del m
        latent, _ = load_compressed(str(Path(tmp) / "q"))
        if not any(isinstance(layer.self_attn, LatentKVAttention) for layer in latent.model.layers):
            print("  decode: this architecture's attention is not served with the latent cache; not measured", flush=True)
            return {"context": context, "ratio": ratio, "served": False}
        factored, _ = load_compressed(str(Path(tmp) / "q"))
        for layer in factored.model.layers:
            if isinstance(layer.self_attn, LatentKVAttention):
                layer.self_attn = layer.self_attn.attn
        models = {"fp32": b.model, "qsvd latent cache": latent, "qsvd factors, K/V cache": factored}
        times = {name: [] for name in models}
        for _ in range(rounds):
            for name, model in models.items():
                took = []
                for n in (1, new_tokens + 1):
                    cache = DynamicCache(config=model.config)
                    t = time.perf_counter()
                    with torch.no_grad():
                        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, past_key_values=cache)
                    took.append(time.perf_counter() - t)
                times[name].append((took[0], max(took[1] - took[0], 1e-9)))
                nbytes = sum(x.keys.numel() * x.keys.element_size() + x.values.numel() * x.values.element_size() for x in cache.layers)
                res[name] = {"prefill_s": round(min(p for p, _ in times[name]), 3), "decode_tok_s": round(new_tokens / min(d for _, d in times[name]), 2),
                             "rounds": [[round(p, 3), round(new_tokens / d, 2)] for p, d in times[name]],
                             "cache_bytes": nbytes, "cache_bytes_per_token": nbytes / (context + new_tokens)}  # fmt: skip
                print(f"  decode at {context} tokens: {name}: {res[name]}", flush=True)
    return {"context": context, "new_tokens": new_tokens, "ratio": ratio, "rounds": rounds, "models": res}


SERVE_ROWS = {  # checkpoint name: recipe (the serving section)
    "rtn-w4g64": "rtn-w4g64",
    "svd_llm-0.765": factor_stages("svd_llm", 0.765),
    "svd_llm-0.765-w4g64": factor_stages(
        "svd_llm", 0.765, weights=QuantArgs(bits=4, symmetric=True, granularity="group", group_size=64, full_range=True), solver="gptq"
    ),
}


def serve(model: str, calib: int, ckpt: Path, repeats: int) -> dict:
    """Serving of factored checkpoints (llmpress.bench, packed checkpoints kept under ``ckpt``):
    W4 g64 factors through the int4 kernel against float factors and the dense int4 model."""
    import copy

    from llmpress import api, bench, models
    from llmpress.export.packed_load import read_manifest

    m0, tok = models.load(model)
    cfg = api.CalibConfig(n_samples=calib, seqlen=512, seed=0)
    windows = None
    dirs = []
    for name, recipe in SERVE_ROWS.items():
        d = ckpt / name
        if read_manifest(d) is None:
            print(f"serve: making {d}", flush=True)
            if windows is None and api.needs_calibration(api._as_recipe(recipe)):
                windows = api.calibration_windows(tok, m0, cfg)
            m = copy.deepcopy(m0)
            rep = api.compress(m, recipe, windows, tokenizer=tok, calib=cfg)
            api.save(m, tok, d, report=rep, overwrite=True)
            del m
        dirs.append(str(d))
    del m0
    result = bench.run(dirs, model, bench.BenchConfig(repeats=repeats, memory_probe=False),
                       progress=lambda msg: print(f"bench: {msg}", file=sys.stderr, flush=True))  # fmt: skip
    print(bench.table(result), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6])
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--eval", default=EVAL_SOURCES)
    ap.add_argument("--fp-ppl", type=float)
    ap.add_argument("--no-alloc", action="store_true", help="uniform ranks only (no lowrank_alloc rows)")
    ap.add_argument("--alloc-ratios", type=float, nargs="*", help="ratios with allocated-rank rows (default: every ratio)")
    ap.add_argument("--no-sweep", action="store_true", help="no sensitivity-sweep rows")
    ap.add_argument("--sweep-windows", type=int, help="windows of the sweep's loss (default: lowrank_sweep's)")
    ap.add_argument("--sweep-ratios", type=float, nargs="+", help="candidate per-layer ratios of the sweep (default: lowrank_sweep's)")
    ap.add_argument("--qsvd-ratios", type=float, nargs="*", default=[0.8, 0.53],
                    help="QSVD on q/k/v against separate svd_llm of q/k/v at these ratios (none: skip)")  # fmt: skip
    ap.add_argument(
        "--qsvd-alloc", type=float, nargs="*", help="of --qsvd-ratios, those with a QSVD row of allocated ranks (lowrank_alloc joint: qkv)"
    )
    ap.add_argument("--qsvd-alloc-rules", nargs="+", default=["greedy"], choices=["greedy", "proportional"], help="lowrank_alloc rules of those rows")
    ap.add_argument("--tune-ratios", type=float, nargs="*", default=[],
                    help="ratios with svd_llm + lowrank_tune rows (uniform and allocated ranks)")  # fmt: skip
    ap.add_argument("--tune-iters", type=int, default=None, help="lowrank_tune steps per block (default: the stage's)")
    ap.add_argument("--lrq-tune", action="store_true", help="also the W4-factor row with lowrank_tune (trained through the grid)")
    ap.add_argument("--tune-lr", type=float, default=None, help="lowrank_tune relative step size (default: the stage's)")
    ap.add_argument("--context", type=int, default=2048, help="prompt tokens of the decode measurement")
    ap.add_argument("--no-lrq", action="store_true", help="skip low rank + W4 factors against GPTQ W3 at about the same bytes")
    ap.add_argument("--out", default=None)
    ap.add_argument("--table-only", action="store_true", help="print the tables and redraw the plot of --out, measure nothing")
    ap.add_argument(
        "--serve", action="store_true", help="only the serving section: W4 factors through the int4 kernel against float factors and dense int4"
    )
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the serving and decode sections")
    a = ap.parse_args()
    out = Path(a.out or f"runs/bench/lowrank-{a.model}.json")
    if a.table_only:
        data = json.loads(out.read_text())
        fp = next(iter(data["fp"].values()))
        plot(data["rows"], fp, out.with_suffix(".png"), a.model)
        print(grid_table(data["rows"], fp))
        return
    if a.serve:
        result = serve(a.model, a.calib, Path(f"runs/bench/lowrank-ckpt-{Path(a.model).name}"), a.repeats)
        data = json.loads(out.read_text()) if out.exists() else {}
        data["serve"] = result
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=2, default=str))
        return
    b = Bench(a.model, eval_windows=a.windows, calib_samples=a.calib, fp_ppl=a.fp_ppl, eval_sources=a.eval, out=str(out))
    sweep_args = {k: v for k, v in (("windows", a.sweep_windows), ("ratios", a.sweep_ratios)) if v}
    for ratio in a.ratios:
        for m in a.methods:
            sts = factor_stages(m, ratio)
            b.run(f"{m} ratio {ratio}", sts, lowrank=m, param_ratio=ratio, ranks="uniform")
            if not a.no_alloc and (a.alloc_ratios is None or ratio in a.alloc_ratios):
                alloc = stage("lowrank_alloc", targets=["Linear"], ignore=["lm_head"], ratio=ratio)
                b.run(f"{m} ratio {ratio}, allocated ranks", [alloc, *sts], lowrank=m, param_ratio=ratio, ranks="allocated")
                if m == "svd_llm" and not a.no_sweep:  # ASVD's measured per-layer sensitivity sweep, the allocation to compare with
                    sweep = stage("lowrank_sweep", targets=["Linear"], ignore=["lm_head"], ratio=ratio, **sweep_args)
                    b.run(f"{m} ratio {ratio}, ranks by sensitivity sweep", [sweep, *sts], lowrank=m, param_ratio=ratio, ranks="sweep")
    tune_args = {k: v for k, v in (("iters", a.tune_iters), ("lr", a.tune_lr)) if v}
    for ratio in a.tune_ratios:  # the factors of each block trained together against its full-precision output
        tune = stage("lowrank_tune", targets=["Linear"], ignore=["lm_head"], **tune_args)
        it = "".join(f", {k} {v:g}" for k, v in tune_args.items())
        alloc = stage("lowrank_alloc", targets=["Linear"], ignore=["lm_head"], ratio=ratio)
        b.run(f"svd_llm ratio {ratio}, allocated ranks, tuned{it}", [alloc, *factor_stages("svd_llm", ratio), tune], lowrank="svd_llm",
              param_ratio=ratio, ranks=f"allocated-tuned{it}")  # fmt: skip
        b.run(f"svd_llm ratio {ratio}, tuned{it}", [*factor_stages("svd_llm", ratio), tune], lowrank="svd_llm", param_ratio=ratio,
              ranks=f"uniform-tuned{it}")  # fmt: skip
    qkv = ["re:.*self_attn\\.(q|k|v)_proj$"]
    decode = {}
    for ratio in a.qsvd_ratios:
        for m in ("qsvd", "svd_llm"):
            label = f"{m} of q/k/v ratio {ratio}" + (" (joint, latent cache)" if m == "qsvd" else " (each separately)")
            row = b.run(label, [stage(m, targets=qkv, ratio=ratio)], lowrank=m, param_ratio=ratio, ranks="qkv")
            if m == "qsvd":
                row["cache"] = cache_per_token(b.model.config, ratio)
                print(f"  KV cache numbers per token and layer: {row['cache']}", flush=True)
        for rule in a.qsvd_alloc_rules if ratio in (a.qsvd_alloc or ()) else ():  # QSVD's own allocation: one rank per block's q/k/v
            alloc = stage("lowrank_alloc", targets=qkv, ratio=ratio, joint="qkv", rule=rule)
            greedy = rule == "greedy"
            b.run(f"qsvd of q/k/v ratio {ratio}, ranks allocated across blocks" + ("" if greedy else f" ({rule} rule)"),
                  [alloc, stage("qsvd", targets=qkv)], lowrank="qsvd", param_ratio=ratio,
                  ranks="qkv-allocated" if greedy else f"qkv-allocated-{rule}")  # fmt: skip
    if not a.no_lrq:  # the same bytes two ways: W4 g64 factors holding 3.25/4.25 of the parameters, or GPTQ W3 g64
        w4 = QuantArgs(bits=4, symmetric=True, granularity="group", group_size=64, full_range=True)
        for solver in ("rtn", "gptq"):
            b.run(f"svd_llm ratio 0.765 + W4 g64 factors ({solver})", factor_stages("svd_llm", 0.765, weights=w4, solver=solver),
                  lowrank="svd_llm", param_ratio=0.765, ranks="lrq")  # fmt: skip
        if a.lrq_tune:
            b.run("svd_llm ratio 0.765 + W4 g64 factors (gptq), tuned", [*factor_stages("svd_llm", 0.765, weights=w4, solver="gptq"),
                  stage("lowrank_tune", targets=["Linear"], ignore=["lm_head"], **tune_args)], lowrank="svd_llm", param_ratio=0.765, ranks="lrq")  # fmt: skip
        b.run("gptq-w3g64 (same bytes)", "gptq-w3g64", ranks="lrq")
    if a.qsvd_ratios and "decode" not in json.loads(out.read_text()):
        decode = decode_speed(b, a.qsvd_ratios[-1], a.context, rounds=a.repeats)
    b.save(str(out))
    if decode:
        data = json.loads(out.read_text())
        data["decode"] = decode
        out.write_text(json.dumps(data, indent=2, default=str))
    plot(b.rows, b.fp_ppl, out.with_suffix(".png"), a.model)
    print(b.table())
    print(grid_table(b.rows, b.fp_ppl))


if __name__ == "__main__":
    main_guard(main)
