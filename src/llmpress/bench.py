"""Serving benchmark: compressed checkpoints against the fp32 and bf16 model, in one run.

For each variant (``fp32`` and ``bf16`` of the baseline model, then each packed
checkpoint loaded with its runtime kernels):

- prefill latency: one forward of ``prefill_tokens`` tokens (batch 1, KV cache built,
  logits of the last position only, as generation does);
- decode throughput: greedy decoding of ``decode_tokens`` new tokens after a
  ``prompt_tokens`` prompt, for each batch size, tokens/s = batch * new tokens / time of
  the decode steps (prompt excluded);
- resident weight memory: bytes of the model's parameters and buffers (shared storage
  counted once);
- peak RSS: in a fresh subprocess per variant (load, one prefill, a few decode steps),
  beside the RSS of a process that only imported the libraries;
- checkpoint bytes: the weights file of a packed checkpoint (and its theoretical size),
  the baseline's safetensors for fp32, computed for bf16 (half of the fp32 tensors).

Timings are interleaved (round r measures every variant before round r+1) and the
median over rounds is reported, so ratios compare measurements taken side by side.
``layer_kernels`` adds a table per distinct linear shape of the compressed models: the
runtime module against ``F.linear`` in fp32 and bf16 at 1, 8 and ``prefill_tokens``
rows, and how much of a decode step the linears take (the rest is attention, norms,
the output head and Python).
"""

from __future__ import annotations

import gc
import json
import logging
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError

log = logging.getLogger(__name__)


@dataclass(kw_only=True, frozen=True)
class BenchConfig:
    prefill_tokens: int = 512
    decode_tokens: int = 128
    batches: tuple[int, ...] = (1, 8)
    prompt_tokens: int = 32
    repeats: int = 3
    layer_kernels: bool = True
    memory_probe: bool = True
    kernel_calls: int = 100  # timed calls per (layer, rows) in the per-layer table (a tenth for the prefill rows)


@dataclass(kw_only=True)
class Variant:
    name: str
    kind: str  # "dense" or "packed"
    path: str
    dtype: str = "float32"
    backend: str = "auto"  # packed checkpoints: runtime kernels (qlinear.BACKENDS)

    def load(self):
        from . import models
        from .api import load_compressed

        if self.kind == "packed":
            return load_compressed(self.path, backend=self.backend)
        return models.load(self.path, dtype=getattr(torch, self.dtype))


def plan_variants(targets: list[str], baseline: str | None = None) -> tuple[list[Variant], str]:
    """fp32 and bf16 of the baseline, then one variant per packed checkpoint in ``targets``
    (``DIR@torch`` / ``DIR@dequant``: that checkpoint with torch's kernels / the exact
    fallback, beside the default ``auto``)."""
    from .export.packed import packed_version
    from .export.packed_load import read_manifest
    from .runtime.qlinear import BACKENDS

    packed, bases = [], set()
    for t in targets:
        backend = "auto"
        if "@" in t and t.rsplit("@", 1)[1] in BACKENDS:
            t, backend = t.rsplit("@", 1)
        meta = read_manifest(t) if Path(t).is_dir() else None
        if packed_version(meta) is not None:
            packed.append(Variant(name=Path(t).name + ("" if backend == "auto" else f"@{backend}"), kind="packed", path=t, backend=backend))
            model = (meta.get("report") or {}).get("model")
            if model:
                bases.add(model)
        else:
            bases.add(t)
    if baseline is None:
        if len(bases) != 1:
            raise UserError(f"cannot tell the baseline model (found {sorted(bases) or 'none'}); pass --baseline")
        baseline = bases.pop()
    return [
        Variant(name="fp32", kind="dense", path=baseline, dtype="float32"),
        Variant(name="bf16", kind="dense", path=baseline, dtype="bfloat16"),
        *packed,
    ], baseline


def resident_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1e3
    except OSError:
        pass
    return None


def _peak_rss_mb() -> float:
    """This process's RSS high-water mark. VmHWM where /proc has it: ru_maxrss of a process
    started by fork + exec keeps the forking parent's peak (Linux carries it over exec), so a
    probe child would report the benchmark driver's memory, not its own."""
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


def _rss_mb() -> float:
    v = _status_mb("VmRSS")
    return float("nan") if v is None else v


@torch.no_grad()
def prefill_seconds(model: nn.Module, ids: torch.Tensor) -> float:
    t = time.perf_counter()
    model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - t


@torch.no_grad()
def decode(model: nn.Module, prompt: torch.Tensor, steps: int) -> tuple[float, torch.Tensor]:
    """Seconds of ``steps`` greedy decode steps after ``prompt`` [b, P], and the tokens."""
    from transformers import DynamicCache

    cache = DynamicCache()
    out = model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    tokens = [nxt]
    t = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(nxt)
    return time.perf_counter() - t, torch.cat(tokens, 1)


def _windows(tok, model, cfg: BenchConfig) -> torch.Tensor:
    from .api import EvalConfig, evaluation_windows

    n = max(cfg.batches)
    w = evaluation_windows(tok, model, EvalConfig(seqlen=cfg.prefill_tokens, max_windows=n))
    if w.shape[0] < n:
        raise UserError(f"the evaluation text gives {w.shape[0]} windows of {cfg.prefill_tokens} tokens; the benchmark needs {n}")
    return w


def probe(variant: Variant, cfg: BenchConfig) -> dict:
    """Memory of one variant (run in a fresh process: its peak RSS is the variant's)."""
    import transformers  # noqa: F401  (counted in the bare-process RSS too)

    rss0 = _rss_mb()
    t = time.perf_counter()
    model, tok = variant.load()
    load_s = time.perf_counter() - t
    gc.collect()
    rss_loaded = _rss_mb()
    ids = torch.randint(3, model.config.vocab_size, (max(cfg.batches), cfg.prefill_tokens), generator=torch.Generator().manual_seed(0))
    prefill_seconds(model, ids[:1])
    decode(model, ids[:, : cfg.prompt_tokens], 4)
    return {
        "load_s": load_s,
        "resident_weight_bytes": resident_bytes(model),
        "rss_before_load_mb": rss0,
        "rss_after_load_mb": rss_loaded,
        "peak_rss_mb": _peak_rss_mb(),
    }


def run_probe(variant: Variant, cfg: BenchConfig) -> dict:
    """:func:`probe` of ``variant`` in a fresh Python process (its peak RSS is the variant's
    alone); ``kind="none"``: the RSS of a process that only imported the libraries."""
    arg = json.dumps({"variant": asdict(variant), "config": asdict(cfg)})
    res = subprocess.run([sys.executable, "-m", "llmpress.bench", arg], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"memory probe of {variant.name} failed: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _best_time(fn, n: int) -> float:
    """Fastest of ``n`` timed calls (after one warm-up): a kernel's own speed, robust to the
    scheduler stalls other processes cause on a shared machine."""
    fn()
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _leaf_linears(model: nn.Module):
    """(name, module) of what runs as one linear: wrappers count once, with their inner module."""
    from .runtime.act_quant import ActQuantLinear

    wrappers = []
    for name, mod in model.named_modules():
        if any(name.startswith(w + ".") for w in wrappers):
            continue
        if isinstance(mod, ActQuantLinear):
            wrappers.append(name)
            yield name, mod, mod.linear
        elif isinstance(mod, nn.Linear) or hasattr(mod, "kernel") or type(mod).__name__ == "Int8Linear":
            wrappers.append(name)  # a module of its own kernel: its parts (a low-rank layer's factors) are not linears of the model
            yield name, mod, mod


def _kernel(mod: nn.Module) -> str | None:
    if type(mod).__name__ == "Int8Linear":
        from .runtime.int8 import resolve_backend

        return f"W8A8 int8 GEMM ({resolve_backend(mod.backend)})"
    return getattr(mod, "kernel", None)


@torch.no_grad()
def layer_kernels(name: str, model: nn.Module, base: nn.Module, cfg: BenchConfig) -> list[dict]:
    """Per distinct (kernel, shape) of ``model``'s linears: its module against F.linear fp32 / bf16."""
    from .arch import get_module

    rows, seen = [], set()
    for lname, mod, inner in _leaf_linears(model):
        kernel = _kernel(inner)
        key = (kernel, inner.out_features, inner.in_features)
        if kernel is None or key in seen:
            continue
        seen.add(key)
        w32 = get_module(base, lname).weight.detach().float()
        w16 = w32.to(torch.bfloat16)
        for m in (1, 8, cfg.prefill_tokens):
            x = torch.randn(m, inner.in_features)
            xb = x.to(torch.bfloat16)
            n = cfg.kernel_calls if m < 64 else max(1, cfg.kernel_calls // 10)
            t32 = _best_time(partial(F.linear, x, w32), n)
            t16 = _best_time(partial(F.linear, xb, w16), n)
            tq = _best_time(partial(mod, x), n)
            rows.append(
                {
                    "variant": name,
                    "layer": lname,
                    "kernel": kernel,
                    "shape": [inner.out_features, inner.in_features],
                    "rows": m,
                    "fp32_us": t32 * 1e6,
                    "bf16_us": t16 * 1e6,
                    "module_us": tq * 1e6,
                    "speedup_vs_fp32": t32 / tq,
                    "speedup_vs_best": min(t32, t16) / tq,
                }
            )
    return rows


@torch.no_grad()
def linear_seconds(model: nn.Module) -> tuple[float, float]:
    """Seconds one decode step (one row) spends in the model's linears, and of those in the
    output head (each linear timed alone, best of its runs)."""
    dtype = model.get_input_embeddings().weight.dtype
    head = model.get_output_embeddings()
    total = in_head = 0.0
    for _, mod, inner in _leaf_linears(model):
        x = torch.randn(1, inner.in_features, dtype=dtype)
        t = _best_time(partial(mod, x), 20)
        total += t
        if mod is head or inner is head:
            in_head += t
    return total, in_head


def checkpoint_bytes(variant: Variant, baseline_files: int | None) -> dict:
    from .export.packed import checkpoint_accounting
    from .export.packed_load import read_manifest

    if variant.kind == "packed":
        return checkpoint_accounting(read_manifest(variant.path))
    if baseline_files is None:
        return {}
    return {
        "file_bytes": baseline_files if variant.dtype == "float32" else None,
        "computed_bytes": baseline_files // (1 if variant.dtype == "float32" else 2),
    }


def _baseline_files(spec: str) -> int | None:
    from .models import resolve

    try:
        folder, local = resolve(spec)
    except UserError:
        return None
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors")) if local else None


def run(targets: list[str], baseline: str | None = None, cfg: BenchConfig = BenchConfig(), progress=None) -> dict:
    """The benchmark of ``targets`` (packed checkpoints and/or a model); a JSON-able dict."""
    say = progress or (lambda msg: log.info(msg))
    variants, base_spec = plan_variants(targets, baseline)
    result: dict = {"config": asdict(cfg), "baseline": base_spec, "environment": _environment(), "variants": {}}
    if cfg.memory_probe:
        say("memory probes (one fresh process per variant)")
        result["bare_process_rss_mb"] = run_probe(Variant(name="none", kind="none", path=""), cfg)["rss_mb"]
        for v in variants:
            result["variants"][v.name] = {"memory": run_probe(v, cfg)}
    loaded = {}
    for v in variants:
        say(f"loading {v.name}")
        loaded[v.name] = v.load()
    tok = next(t for _, t in loaded.values() if t is not None)
    ids = _windows(tok, loaded["fp32"][0], cfg)
    times = {v.name: {"prefill": [], **{f"decode_b{b}": [] for b in cfg.batches}} for v in variants}
    tokens = {}
    for r in range(cfg.repeats):
        for v in variants:
            say(f"round {r + 1}/{cfg.repeats}: {v.name}")
            model = loaded[v.name][0]
            times[v.name]["prefill"].append(prefill_seconds(model, ids[:1]))
            for b in cfg.batches:
                s, toks = decode(model, ids[:b, : cfg.prompt_tokens], cfg.decode_tokens)
                times[v.name][f"decode_b{b}"].append(s)
                tokens[(v.name, b)] = toks
    files = _baseline_files(base_spec)
    for v in variants:
        model = loaded[v.name][0]
        row = result["variants"].setdefault(v.name, {})
        row["prefill_ms"] = statistics.median(times[v.name]["prefill"]) * 1e3
        for b in cfg.batches:
            row[f"decode_tok_s_b{b}"] = b * cfg.decode_tokens / statistics.median(times[v.name][f"decode_b{b}"])
            row[f"decode_tok_s_b{b}_best"] = b * cfg.decode_tokens / min(times[v.name][f"decode_b{b}"])
        row["prefill_ms_best"] = min(times[v.name]["prefill"]) * 1e3
        row["resident_weight_bytes"] = resident_bytes(model)
        row["checkpoint"] = checkpoint_bytes(v, files)
        ref = tokens[("fp32", cfg.batches[0])]
        row["greedy_agreement_with_fp32"] = float((tokens[(v.name, cfg.batches[0])] == ref).float().mean())
        row["raw_seconds"] = times[v.name]
    if cfg.layer_kernels:
        base = loaded["fp32"][0]
        result["layer_kernels"] = []
        for v in variants:
            if v.kind == "packed":
                say(f"per-layer kernels: {v.name}")
                result["layer_kernels"] += layer_kernels(v.name, loaded[v.name][0], base, cfg)
        for v in variants:
            step = cfg.batches[0] / result["variants"][v.name][f"decode_tok_s_b{cfg.batches[0]}_best"]  # best round, like the kernels
            lin, head = linear_seconds(loaded[v.name][0])
            result["variants"][v.name]["decode_step_ms"] = step * 1e3
            result["variants"][v.name]["linears_ms_per_step"] = lin * 1e3  # the output head included
            result["variants"][v.name]["head_ms_per_step"] = head * 1e3
    return result


def _environment() -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
    }


def table(result: dict) -> str:
    """Markdown tables of a :func:`run` result, ratios against fp32, bf16 and the faster."""
    cfg = result["config"]
    bs = cfg["batches"]
    v = result["variants"]
    mb = lambda b: f"{b / 1e6:.1f}" if b else "-"  # noqa: E731
    head = (
        ["variant", f"prefill {cfg['prefill_tokens']} ms (best)"]
        + [f"decode tok/s b={b} (best)" for b in bs]
        + ["weights MB", "peak RSS MB", "checkpoint MB", "greedy = fp32"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in v.items():
        ck = r.get("checkpoint") or {}
        cells = [name, f"{r['prefill_ms']:.0f} ({r['prefill_ms_best']:.0f})"] + [
            f"{r[f'decode_tok_s_b{b}']:.1f} ({r[f'decode_tok_s_b{b}_best']:.1f})" for b in bs
        ]
        cells += [
            mb(r["resident_weight_bytes"]),
            f"{r['memory']['peak_rss_mb']:.0f}" if "memory" in r else "-",
            mb(ck.get("file_bytes") or ck.get("computed_bytes")),
            f"{r['greedy_agreement_with_fp32']:.0%}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    out = ["\n".join(lines)]
    base = {k: v[k] for k in ("fp32", "bf16")}
    ratio_head = (
        ["variant", "prefill vs fp32", "prefill vs bf16"]
        + [f"decode b={b} vs {ref}" for b in bs for ref in ("fp32", "bf16", "faster", "faster (best)")]
        + ["weights vs fp32", "weights vs bf16"]
    )
    rl = ["| " + " | ".join(ratio_head) + " |", "|" + "---|" * len(ratio_head)]
    for name, r in v.items():
        if name in base:
            continue
        cells = [name, f"{base['fp32']['prefill_ms'] / r['prefill_ms']:.2f}x", f"{base['bf16']['prefill_ms'] / r['prefill_ms']:.2f}x"]
        for b in bs:
            k = f"decode_tok_s_b{b}"
            best = max(base["fp32"][k], base["bf16"][k])
            best_b = max(base["fp32"][k + "_best"], base["bf16"][k + "_best"])
            cells += [f"{r[k] / base['fp32'][k]:.2f}x", f"{r[k] / base['bf16'][k]:.2f}x", f"{r[k] / best:.2f}x", f"{r[k + '_best'] / best_b:.2f}x"]
        cells += [
            f"{r['resident_weight_bytes'] / base['fp32']['resident_weight_bytes']:.2f}",
            f"{r['resident_weight_bytes'] / base['bf16']['resident_weight_bytes']:.2f}",
        ]
        rl.append("| " + " | ".join(cells) + " |")
    out.append(
        "Ratios of medians over rounds, and of the best round (speed: higher is faster; weights: fraction of the baseline's bytes)\n\n"
        + "\n".join(rl)
    )
    ck = [
        f"- {n}: {r['checkpoint']['file_bytes']:,} bytes on disk, theoretical {r['checkpoint']['theoretical_bytes']:,.0f} "
        f"({r['checkpoint']['file_bytes'] / r['checkpoint']['theoretical_bytes'] - 1:+.1%}); with 16-bit scales {r['checkpoint']['theoretical_bytes_16bit_scales']:,.0f}"
        for n, r in v.items()
        if "theoretical_bytes" in (r.get("checkpoint") or {})
    ]
    if ck:
        out.append("Checkpoint size against theory\n\n" + "\n".join(ck))
    steps = [
        f"- {n}: {r['decode_step_ms']:.1f} ms per decode step (b={bs[0]}, best round), of which linears + head {r['linears_ms_per_step']:.1f} ms ({r['linears_ms_per_step'] / r['decode_step_ms']:.0%}, each timed alone; "
        f"the head {r.get('head_ms_per_step', float('nan')):.1f} ms)"
        for n, r in v.items()
        if "decode_step_ms" in r
    ]
    if steps:
        out.append("Where a decode step goes\n\n" + "\n".join(steps))
    if result.get("layer_kernels"):
        kh = ["variant", "kernel", "shape", "rows", "fp32 us", "bf16 us", "module us", "vs fp32", "vs faster"]
        kl = ["| " + " | ".join(kh) + " |", "|" + "---|" * len(kh)]
        for k in result["layer_kernels"]:
            kl.append(
                f"| {k['variant']} | {k['kernel']} | {k['shape'][0]}x{k['shape'][1]} | {k['rows']} | {k['fp32_us']:.0f} | {k['bf16_us']:.0f} | {k['module_us']:.0f} | {k['speedup_vs_fp32']:.2f}x | {k['speedup_vs_best']:.2f}x |"
            )
        out.append("Per-layer kernels (fastest of repeated calls)\n\n" + "\n".join(kl))
    return "\n\n".join(out)


def _probe_main(arg: str) -> dict:
    """What a probe subprocess measures; the process entry below writes it to stdout as one
    JSON line, the channel `run_probe` reads (not a log message)."""
    d = json.loads(arg)
    cfg = BenchConfig(**{**d["config"], "batches": tuple(d["config"]["batches"])})
    v = Variant(**d["variant"])
    if v.kind == "none":
        import transformers  # noqa: F401

        return {"rss_mb": _rss_mb()}
    return probe(v, cfg)


if __name__ == "__main__":
    sys.stdout.write(json.dumps(_probe_main(sys.argv[1])) + "\n")
