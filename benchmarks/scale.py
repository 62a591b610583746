"""Beyond one machine's memory and one process: measured runs of `llmpress compress` (issue 15).

    flock /tmp/llmpress-heavy.lock .venv/bin/python benchmarks/scale.py [--sections synth,smollm2,ranks,resume]

Every run is the command line a user types (a subprocess of this venv's ``llmpress``), with
``--json``; its peak RSS is the kernel's for that process (``wait4``), the per-block times are
the streamed run's (``environment.block_seconds``).

- ``synth``: a Llama-architecture model with random weights (quality is irrelevant here; the
  default shape has 3.4B parameters, 13.5 GB in float32, more than half of a 24 GiB machine)
  written as sharded safetensors into ``runs/scale/synth`` (once; block by block, never whole
  in memory), with SmolLM2's tokenizer; compressed with ``--stream`` by RTN and by GPTQ
  (``--calib-samples`` small: the point is memory and time per block), no evaluation.
  The in-memory run is not attempted (it would need about 4x the float32 weights).
- ``smollm2``: ``gptq-w4g64`` on SmolLM2-135M in memory and with ``--stream``, default flags:
  peak RSS of each, perplexities and output tensors compared.
- ``ranks``: ``gptq-w4g64`` with 1 and 2 processes (``--nproc 2``), no evaluation: the weights
  files compared byte for byte (the time on a 2-core machine is no speed claim).
- ``resume``: the same command killed with SIGKILL after a third of its blocks, then run again
  with ``--resume``; its weights file compared with the uninterrupted 1-process run's.

Writes runs/bench/scale.json and prints a markdown summary.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLMPRESS = str(Path(sys.executable).with_name("llmpress"))
GB = 1e9
# name -> value: the synthetic model's shape (Llama-3.2-3B-like, SmolLM2's vocabulary, tied embeddings)
SYNTH = {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 24, "num_key_value_heads": 8}


def run(argv: list[str], *, kill_after_blocks: int | None = None) -> dict:
    """Run ``llmpress`` with ``argv``; wall seconds, peak RSS (MB, the kernel's ru_maxrss), exit
    code. ``kill_after_blocks``: SIGKILL once the progress lines show that many finished blocks."""
    t = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([LLMPRESS, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    tail: list[str] = []
    killed = False
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-40:]
        m = re.search(r" (\d+)/(\d+) block", line)
        if kill_after_blocks is not None and not killed and m and int(m.group(1)) >= kill_after_blocks:
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
    _, status, _usage = os.wait4(proc.pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    # no peak RSS from wait4: its ru_maxrss also holds this (forking) process's size at the fork, so every
    # child would report at least that; the peak is the run's own (its --json report, VmHWM per phase)
    out = {"argv": argv, "rc": rc, "wall_s": round(time.perf_counter() - t, 1), "killed": killed}
    if rc != 0 and not killed:
        print("\n".join(tail), file=sys.stderr)
        raise SystemExit(f"llmpress {' '.join(argv)} failed with exit code {rc}")
    return out


def report(path: Path) -> dict:
    return json.loads(path.read_text())


def digest(folder: Path) -> dict[str, str]:
    """sha256 of each safetensors file of a folder."""
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.glob("*.safetensors"))}


def tensors_equal(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    def all_of(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    ta, tb = all_of(a), all_of(b)
    return set(ta) == set(tb) and all(bool((ta[k] == tb[k]).all()) for k in ta)


def make_synth(folder: Path, tokenizer_from: Path, shape: dict, seed: int = 0) -> dict:
    """The synthetic model: config.json, one safetensors shard per block (+ one for the rest), the index."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    tok_files = [f for f in tokenizer_from.iterdir() if f.name.startswith(("tokenizer", "special_tokens", "chat_template"))]
    vocab = json.loads((tokenizer_from / "config.json").read_text())["vocab_size"]
    cfg = LlamaConfig(vocab_size=vocab, tie_word_embeddings=True, max_position_embeddings=4096, **shape)
    if (folder / "config.json").exists():
        return cfg.to_dict()
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    h, inter, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, h),
              "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h), "mlp.down_proj": (h, inter)}  # fmt: skip
    weight_map = {}
    total = 0

    def shard(k: int, tensors: dict) -> None:
        nonlocal total
        name = f"model-{k:05d}-of-{n + 1:05d}.safetensors"
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))

    for i in range(n):
        p = f"model.layers.{i}."
        t = {p + k + ".weight": torch.randn(s, generator=g) * (1 / s[1] ** 0.5) for k, s in shapes.items()}
        t[p + "input_layernorm.weight"] = torch.ones(h)
        t[p + "post_attention_layernorm.weight"] = torch.ones(h)
        shard(i + 1, t)
        print(f"synthetic block {i + 1}/{n} written", flush=True)
    shard(n + 1, {"model.embed_tokens.weight": torch.randn(vocab, h, generator=g) * 0.02, "model.norm.weight": torch.ones(h)})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    cfg.save_pretrained(tmp)
    for f in tok_files:
        shutil.copy(f, tmp / f.name)
    tmp.rename(folder)
    return cfg.to_dict()


def synth(out: Path, calib_samples: int, shape: dict, recipes: tuple[str, ...] = ("rtn-w4g64", "gptq-w4g64")) -> dict:
    from llmpress.models import packaged_folder

    folder = ROOT / "runs" / "scale" / f"synth-{shape['hidden_size']}x{shape['intermediate_size']}x{shape['num_hidden_layers']}"
    cfg = make_synth(folder, packaged_folder("smollm2-135m"), shape)
    h, inter, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    block_params = 2 * h * h + 2 * kv * h + 3 * h * inter + 2 * h
    params = n * block_params + cfg["vocab_size"] * h + h
    res = {"config": {k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")}, "params": params,
           "fp32_gb": params * 4 / GB, "one_block_fp32_gb": block_params * 4 / GB, "embeddings_fp32_gb": cfg["vocab_size"] * h * 4 / GB,
           "files_gb": sum(f.stat().st_size for f in folder.glob("*.safetensors")) / GB}  # fmt: skip
    for recipe in recipes:
        extra = [] if recipe.startswith("rtn") else ["--calib-samples", str(calib_samples)]
        o = out / f"{folder.name}-{recipe}"
        shutil.rmtree(o, ignore_errors=True)
        js = out / f"{folder.name}-{recipe}.json"
        r = run(["compress", str(folder), "--recipe", recipe, "--stream", "--no-eval", "--no-progress", "--out", str(o),
                 "--json", str(js), "--overwrite", *extra])  # fmt: skip
        rep = report(js)
        r["peak_rss_mb"] = rep["peak_rss_mb"]
        blocks = rep["environment"]["block_seconds"]
        # activations the fused engine keeps for a block, float32: its inputs and outputs, o_proj's
        # and down_proj's inputs (calib/fused.py), for every calibration window
        act_gb = calib_samples * 512 * (3 * h + inter) * 4 / GB if recipe != "rtn-w4g64" else 0.0
        hess_gb = (h * h + inter * inter) * 8 / GB if recipe != "rtn-w4g64" else 0.0  # the largest Hessians alive at once, float64
        res[recipe] = {**r, "block_seconds_median": sorted(blocks)[len(blocks) // 2], "block_seconds_max": max(blocks),
                       "compress_s": rep["seconds"]["compress_total"], "read_s": rep["seconds"]["stream_read"],
                       "write_s": rep["seconds"]["stream_write"], "checkpoint_gb": rep["compressed"]["checkpoint_bytes"] / GB,
                       "bound_gb": 1.5 + res["one_block_fp32_gb"] + act_gb + hess_gb, "activations_gb": act_gb, "hessians_gb": hess_gb}  # fmt: skip
        shutil.rmtree(o, ignore_errors=True)
        print(json.dumps({recipe: res[recipe]}, indent=1), flush=True)
    return res


def smollm2(out: Path) -> dict:
    res = {}
    for mode, flags in (("in-memory", []), ("streamed", ["--stream"])):
        o = out / f"smollm2-{mode}"
        res[mode] = run(["compress", "smollm2-135m", "--recipe", "gptq-w4g64", "--out", str(o), "--overwrite", "--no-progress",
                         "--json", str(out / f"smollm2-{mode}.json"), *flags])  # fmt: skip
        rep = report(out / f"smollm2-{mode}.json")
        phases = {p["phase"]: p["peak_rss_mb"] for p in rep["memory"]["phases"]}
        res[mode].update(baseline=rep["baseline"]["ppl"], compressed=rep["compressed"]["ppl"], compress_s=rep["seconds"]["compress_total"],
                         peak_rss_mb=rep["peak_rss_mb"], load_peak_mb=phases.get("load"), compress_peak_mb=phases.get("compress"))  # fmt: skip
        print(json.dumps({mode: res[mode]}, indent=1), flush=True)
    res["same_tensors"] = tensors_equal(out / "smollm2-in-memory", out / "smollm2-streamed")
    return res


def ranks(out: Path) -> dict:
    res = {}
    for n in (1, 2):
        o = out / f"ranks-{n}"
        res[n] = run(["compress", "smollm2-135m", "--recipe", "gptq-w4g64", "--no-eval", "--no-progress", "--out", str(o), "--overwrite",
                      "--nproc", str(n), "--json", str(out / f"ranks-{n}.json")])  # fmt: skip
        res[n]["peak_rss_mb"] = report(out / f"ranks-{n}.json")["peak_rss_mb"]  # rank 0's
        print(json.dumps({n: res[n]}, indent=1), flush=True)
    res["same_bytes"] = digest(out / "ranks-1") == digest(out / "ranks-2")
    return res


def resume(out: Path) -> dict:
    o = out / "resume"
    shutil.rmtree(o, ignore_errors=True)
    argv = ["compress", "smollm2-135m", "--recipe", "gptq-w4g64", "--no-eval", "--out", str(o)]
    first = run(argv, kill_after_blocks=10)
    second = run([*argv, "--resume", "--no-progress"])
    ref = out / "ranks-1"
    if not ref.exists():
        run(["compress", "smollm2-135m", "--recipe", "gptq-w4g64", "--no-eval", "--no-progress", "--out", str(ref)])
    return {"killed_run": first, "resumed_run": second, "same_bytes": digest(o) == digest(ref)}


def summary(res: dict) -> str:
    lines = []
    s = res.get("synth")
    if s:
        lines += [f"synthetic model: {s['params'] / 1e9:.2f}B parameters, {s['fp32_gb']:.1f} GB in float32 ({s['files_gb']:.1f} GB of files), "
                  f"one block {s['one_block_fp32_gb']:.2f} GB, embeddings {s['embeddings_fp32_gb']:.2f} GB", "",
                  "| recipe (--stream) | peak RSS GB | bound GB | wall s | median s per block | read s | write s | checkpoint GB |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in [k for k in s if k.startswith(("rtn", "gptq"))]:
            x = s[r]
            lines.append(f"| {r} | {x['peak_rss_mb'] / 1e3:.2f} | {x['bound_gb']:.2f} | {x['wall_s']:.0f} | {x['block_seconds_median']:.1f} | "
                         f"{x['read_s']:.0f} | {x['write_s']:.0f} | {x['checkpoint_gb']:.2f} |")  # fmt: skip
    m = res.get("smollm2")
    if m:
        lines += ["", "| SmolLM2-135M gptq-w4g64 | peak RSS MB | baseline ppl | compressed ppl | wall s |", "|---|---|---|---|---|"]
        for mode in ("in-memory", "streamed"):
            x = m[mode]
            lines.append(f"| {mode} | {x['peak_rss_mb']:.0f} | {x['baseline']:.3f} | {x['compressed']:.3f} | {x['wall_s']:.0f} |")
        lines.append(f"same output tensors: {m['same_tensors']}")
    r = res.get("ranks")
    if r:
        lines += ["", f"1 rank: {r['1']['wall_s']:.0f} s, peak RSS {r['1']['peak_rss_mb']:.0f} MB; 2 ranks: {r['2']['wall_s']:.0f} s, "
                  f"peak RSS of rank 0 {r['2']['peak_rss_mb']:.0f} MB; same weights file: {r['same_bytes']}"]  # fmt: skip
    z = res.get("resume")
    if z:
        lines += ["", f"killed after block 10 (SIGKILL) at {z['killed_run']['wall_s']:.0f} s, resumed run {z['resumed_run']['wall_s']:.0f} s; "
                  f"same bytes as the uninterrupted run: {z['same_bytes']}"]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default="synth,smollm2,ranks,resume")
    ap.add_argument("--calib-samples", type=int, default=16, help="calibration windows of the synthetic model's GPTQ run")
    ap.add_argument("--out", default="runs/bench/scale.json")
    ap.add_argument("--synth-recipes", default="rtn-w4g64,gptq-w4g64", help="recipes of the synthetic model's runs")
    ap.add_argument("--synth-shape", default=None, help="hidden,intermediate,layers of the synthetic model (default: 3072,8192,32)")
    a = ap.parse_args()
    shape = dict(SYNTH)
    if a.synth_shape:
        h, inter, n = (int(x) for x in a.synth_shape.split(","))
        shape.update(hidden_size=h, intermediate_size=inter, num_hidden_layers=n, num_attention_heads=h // 128, num_key_value_heads=max(1, h // 384))
    work = ROOT / "runs" / "scale"
    work.mkdir(parents=True, exist_ok=True)
    path = ROOT / a.out
    res = json.loads(path.read_text()) if path.exists() else {}
    for sec in a.sections.split(","):
        fn = {"synth": lambda: synth(work, a.calib_samples, shape, tuple(a.synth_recipes.split(","))), "smollm2": lambda: smollm2(work), "ranks": lambda: ranks(work),
              "resume": lambda: resume(work)}[sec]  # fmt: skip
        res[sec] = json.loads(json.dumps(fn()))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1))
    print(summary(res))


if __name__ == "__main__":
    main()
