"""Structured pruning on SmolLM2-135M (or gemma-3-270m): perplexity at 10/20/30% of the
decoder-block parameters removed, per method, before and after recovery, next to SparseGPT
(unstructured) at the same share; and the real speed of each smaller model.

    flock /tmp/llmpress-heavy.lock .venv/bin/python benchmarks/structured.py [--shares 0.1 0.2 0.3] [--recover 100 --recover-lr 3e-4]

Methods per share s of the decoder-block parameters (SmolLM2: a block is 3.54M parameters,
75% of them in the MLP):
- ``layers``: ``drop_layers`` (Block Influence) of round(s * blocks) blocks;
- ``mlp``: ``prune_width`` MLP channels at ratio s / (MLP share of a block), refit on;
- ``mlp global``: the same number of MLP channels in total, ranked across blocks (``allocation:
  global``, 32 at a time, at most half of a block's), so blocks keep different sizes;
- ``heads+mlp``: ``prune_width`` one query head of each key/value group (``query_heads``; 6.25% of
  a SmolLM2 block), then MLP channels for the rest of s;
- ``layers ppl`` (20% only, slow): ``drop_layers`` by each block's measured drop-one perplexity;
- ``slicegpt``: ``slicegpt`` at fraction s (llama family; the untied head adds vocab x d');
- ``sparsegpt``: SparseGPT at sparsity s on every block linear (same parameter count, dense shapes).
With ``--recover N`` the structured rows are repeated with N distillation steps
(``recover_steps``, batches of 4 windows of ``--recover-seqlen`` tokens at ``--recover-lr``)
on the calibration windows (``heads+mlp``: one ``distill`` stage after both cuts, towards the
full model); the row's recovery summary (held-out KL before and after,
seconds, tokens) is kept in the JSON.

Speed (fp32, this process, median of ``--repeats``): one prefill of 512 tokens at batch 1;
decode tokens/s at batch 1 and 8 (32-token prompt, ``--decode`` new tokens); the packed
checkpoint's bytes and the peak RSS of a fresh process loading it (one prefill, a few decode
steps at batch 8). ``--side-by-side R`` measures only the speed table, every model in turns in
one process, R rounds. Writes runs/bench/structured.json and prints markdown tables.
"""

import argparse
import copy
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import EVAL_SOURCES, Bench, main_guard, score, speed  # noqa: E402

from llmpress import api, bench  # noqa: E402
from llmpress.arch import get_arch, get_module  # noqa: E402
from llmpress.recipe import Recipe  # noqa: E402


def mlp_share(model) -> float:
    """Share of a decoder block's linear parameters in its MLP."""
    spec = get_arch(model)
    block = get_module(model, spec.blocks)[0]
    size = {p: get_module(block, p).weight.numel() for p in spec.block_linears()}
    mlp = sum(v for p, v in size.items() if p in (spec.gate, spec.up, spec.down))
    return mlp / sum(size.values())


def query_head_share(model) -> tuple[float, float] | None:
    """(share of a block's linear parameters that one query head per key/value group carries
    in q_proj and o_proj, the ``query_heads`` ratio that removes exactly it); None when each
    group has a single query head."""
    spec, cfg = get_arch(model), model.config
    per_group = cfg.num_attention_heads // getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    if per_group < 2:
        return None
    block = get_module(model, spec.blocks)[0]
    size = {p: get_module(block, p).weight.numel() for p in spec.block_linears()}
    q_o = size[spec.q] + size[spec.o]
    return q_o / per_group / sum(size.values()), 1.0 / per_group


def recipes(model, share: float, recover: int, recover_lr: float = 3e-4, recover_seqlen: int = 256, recover_train: str = "all") -> dict[str, dict]:
    """label -> recipe dict for one share of the decoder parameters."""
    n_blocks = len(get_module(model, get_arch(model).blocks))
    rec = {"recover_steps": recover, "recover_lr": recover_lr, "recover_seqlen": recover_seqlen} if recover else {}
    if recover and recover_train != "all":
        rec["recover_train"] = recover_train
    tag = f" + KD {recover} lr {recover_lr:g}" + ("" if recover_train == "all" else f" {recover_train}") if recover else ""
    out = {
        f"layers {share:.0%}{tag}": {"method": "drop_layers", "count": round(share * n_blocks), **rec},
        f"mlp {share:.0%}{tag}": {"method": "prune_width", "structure": "mlp", "ratio": min(share / mlp_share(model), 0.95), **rec},
        f"mlp global {share:.0%}{tag}": {  # the same channels in total, chosen across blocks (per-layer sizes)
            "method": "prune_width",
            "structure": "mlp",
            "ratio": min(share / mlp_share(model), 0.95),
            "allocation": "global",
            "multiple_of": 32,
            "max_ratio": 0.5,
            **rec,
        },
    }
    qh = query_head_share(model)
    if qh is not None and share > qh[0]:  # one query head per group, then MLP channels for the rest
        out[f"heads+mlp {share:.0%}{tag}"] = [
            {"method": "prune_width", "structure": "query_heads", "ratio": qh[1]},
            {"method": "prune_width", "structure": "mlp", "ratio": (share - qh[0]) / mlp_share(model)},
        ]
        if recover:  # both cuts recover together, towards the full model (a distill stage, not a stage's own recovery)
            out[f"heads+mlp {share:.0%}{tag}"].append(
                {"method": "distill", "steps": recover, "lr": recover_lr, "seqlen": recover_seqlen, "train": recover_train}
            )
    if share == 0.2 and not recover:  # ShortGPT's other importance: each block's measured drop-one perplexity (slow)
        out["layers ppl 20%"] = {"method": "drop_layers", "count": round(share * n_blocks), "importance": "ppl"}
    if not get_arch(model).post_norms:
        out[f"slicegpt {share:.0%}{tag}"] = {"method": "slicegpt", "fraction": share, **rec}
    if not recover:
        out[f"sparsegpt {share:.0%} (unstructured)"] = {"method": "sparsegpt", "sparsity": share, "per_row": True}
    return {k: {"stages": v if isinstance(v, list) else [v]} for k, v in out.items()}


def side_by_side(b: Bench, share: float, rounds: int, a) -> dict:
    """Speed of the full model and of each structured model at ``share`` (no recovery: it does
    not change shapes), measured in turns in this one process, ``rounds`` times; medians per
    model. The rows' own speed figures come from different moments of a long run (load of the
    machine differs); this table is the one to compare. The full model is measured as a copy
    too, so that every model's tensors were allocated the same way (fresh copies, not the ones
    the loader made): gemma-3-270m's first table had every cut at 1.37-1.44x the loaded full
    model's decode, far more than the bytes removed explain (not reproduced since: see
    benchmarks/mapped_load.py)."""
    models = {"full precision (fp32)": copy.deepcopy(b.model)}
    for label, recipe in recipes(b.model, share, 0).items():
        if label.startswith(("sparsegpt", "layers ppl")):
            continue  # dense shapes: the full model's speed; drop-one perplexity: the same shapes as `layers` (and 20 slow minutes)
        m = copy.deepcopy(b.model)
        api.compress(m, Recipe.from_dict(recipe), b.calib, tokenizer=b.tok, calib=b.calib_cfg)
        models[label] = m
    seen: dict[str, list[dict]] = {k: [] for k in models}
    for _ in range(rounds):
        for label, m in models.items():
            seen[label].append(speed(m, b.tok, a.repeats, a.decode))
    out = {label: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for label, runs in seen.items()}
    base = out["full precision (fp32)"]
    print("\n| method (speed side by side) | prefill 512 s (x) | decode b1 tok/s (x) | decode b8 tok/s (x) |\n|---|---|---|---|")
    for label, r in out.items():
        print(f"| {label} | {r['prefill_512_s']:.3f} ({base['prefill_512_s'] / r['prefill_512_s']:.2f}x) | "
              f"{r['decode_tps_b1']:.1f} ({r['decode_tps_b1'] / base['decode_tps_b1']:.2f}x) | "
              f"{r['decode_tps_b8']:.1f} ({r['decode_tps_b8'] / base['decode_tps_b8']:.2f}x) |")  # fmt: skip
    return out


def saved(model, tok, report) -> dict:
    """The packed checkpoint's bytes and the peak RSS of a fresh process that loads it and runs
    one prefill of 512 tokens and a few decode steps at batch 8 (``llmpress.bench.probe``)."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "ckpt"
        api.save(model, tok, out, report=report)
        size = sum(f.stat().st_size for f in out.iterdir() if f.name.endswith(".safetensors"))
        mem = bench.run_probe(bench.Variant(name="row", kind="packed", path=str(out)), bench.BenchConfig())
    return {"checkpoint_bytes": size, "peak_rss_mb": mem["peak_rss_mb"]}


def add_memory(b: Bench, row: dict, recipe: dict) -> None:
    """Peak RSS of a row measured before it was recorded (compressed again, not evaluated)."""
    m = copy.deepcopy(b.model)
    rep = api.compress(m, Recipe.from_dict(recipe), b.calib, tokenizer=b.tok, calib=b.calib_cfg)
    row.update(saved(m, b.tok, rep))
    b.save(b.out)


def run_row(b: Bench, label: str, recipe: dict, a) -> dict:
    if (row := b.done(label)) is not None:  # resumed from --out
        if a.speed and "peak_rss_mb" not in row:
            add_memory(b, row, recipe)
        return row
    m = copy.deepcopy(b.model)
    r = Recipe.from_dict(recipe)
    t = time.perf_counter()
    rep = api.compress(m, r, b.calib, tokenizer=b.tok, calib=b.calib_cfg)
    cs = time.perf_counter() - t
    t = time.perf_counter()
    ppl = score(m, b.sets, progress=True, desc=label)
    extra = {"n_params": rep.compressed["n_params"], "stages": rep.stages}
    if a.speed:
        extra.update(speed(m, b.tok, a.repeats, a.decode), **saved(m, b.tok, rep))
    return b.add_row(label, ppl, rep.bits_per_weight, time.perf_counter() - t, cs, **extra)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--calib", type=int, default=128, help="calibration windows of 512 tokens")
    ap.add_argument("--eval", default=EVAL_SOURCES, help="test texts, one column each (an --eval-data list)")
    ap.add_argument("--shares", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--recover", type=int, default=0, help="also each structured row with this many distillation steps")
    ap.add_argument("--recover-lr", type=float, default=3e-4)
    ap.add_argument("--methods", nargs="+", default=None, help="only these (layers, 'layers ppl', mlp, 'mlp global', heads+mlp, slicegpt, sparsegpt)")
    ap.add_argument("--recover-train", default="all", choices=["all", "norms", "lora"], help="what distillation trains (recover_train)")
    ap.add_argument("--recover-seqlen", type=int, default=256, help="distillation windows of this many tokens (0: 512)")
    ap.add_argument("--no-speed", dest="speed", action="store_false")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode", type=int, default=64, help="new tokens per decode measurement")
    ap.add_argument("--out", default="runs/bench/structured.json")
    ap.add_argument("--side-by-side", type=int, default=0, metavar="ROUNDS",
                    help="only the speed table: the full model and each structured model of the first share, measured in turns")  # fmt: skip
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    b = Bench(a.model, eval_windows=a.windows, calib_samples=a.calib, eval_sources=a.eval, out=a.out)
    if a.speed and "decode_tps_b1" not in b.rows[0]:
        dense = b.rows[0]
        dense.update(speed(b.model, b.tok, a.repeats, a.decode), n_params=sum(p.numel() for p in b.model.parameters()))
    if a.speed and "peak_rss_mb" not in b.rows[0]:
        fp = bench.run_probe(bench.Variant(name="fp32", kind="dense", path=a.model), bench.BenchConfig())
        b.rows[0].update(
            peak_rss_mb=fp["peak_rss_mb"],
            bare_process_rss_mb=bench.run_probe(bench.Variant(name="none", kind="none", path=""), bench.BenchConfig())["rss_mb"],
        )
    if a.side_by_side:
        table = side_by_side(b, a.shares[0], a.side_by_side, a)
        b.save(a.out)  # keeps keys other than the rows: the table goes in beside them
        res = json.loads(Path(a.out).read_text())
        res[f"speed_side_by_side_{a.shares[0]:g}"] = table
        Path(a.out).write_text(json.dumps(res, indent=1))
        return
    for share in a.shares:
        for recover in (0, a.recover) if a.recover else (0,):
            for label, recipe in recipes(b.model, share, recover, a.recover_lr, a.recover_seqlen, a.recover_train).items():
                if a.methods is None or label.split(f" {share:.0%}")[0] in a.methods:
                    run_row(b, label, recipe, a)
    print()
    print(b.table())
    if a.speed:
        base = b.rows[0]
        print(
            "\n| method | params (M) | prefill 512 s (x) | decode b1 tok/s (x) | decode b8 tok/s (x) | peak RSS MB | checkpoint MB |\n|---|---|---|---|---|---|---|"
        )
        for r in b.rows:
            ck = f"{r['checkpoint_bytes'] / 1e6:.1f}" if "checkpoint_bytes" in r else "-"
            rss = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "-"
            print(f"| {r['method']} | {r['n_params'] / 1e6:.1f} | {r['prefill_512_s']:.3f} ({base['prefill_512_s'] / r['prefill_512_s']:.2f}x) | "
                  f"{r['decode_tps_b1']:.1f} ({r['decode_tps_b1'] / base['decode_tps_b1']:.2f}x) | "
                  f"{r['decode_tps_b8']:.1f} ({r['decode_tps_b8'] / base['decode_tps_b8']:.2f}x) | {rss} | {ck} |")  # fmt: skip
    b.save(a.out)


if __name__ == "__main__":
    main_guard(main)
