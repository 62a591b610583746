"""KV-cache policies on SmolLM2-135M (and gemma-3-270m): long-text perplexity, cache bytes,
decode speed, planted-key retrieval.

    flock /tmp/llmpress-heavy.lock .venv/bin/python benchmarks/kvcache.py [--model smollm2-135m]
        [--sections streaming,kivi,h2o,memory] [--tokens 16384] [--out runs/bench/kvcache-MODEL.json]

Sections (each through the public API, llmpress.eval.kvstream, on the packaged Wikipedia test
text). Perplexity streams are fed --chunk tokens per step (default 32: each token then sees the
cache plus at most 31 tokens of its own chunk; token by token, 1, is the exact decoder setting
and about 30x slower on a CPU); decode speed is measured token by token after a prefill
(`decode` rows: --decode-tokens new tokens after a --prefill-token context).

- streaming: the seeds' StreamingLLM experiment on a stream of --tokens (default 16384, twice
  SmolLM2's 8192 training length): dense attention (`full`), window attention (`window:1024`),
  sliding window with re-computation (1024 tokens before each target; --recompute-stride
  targets per forward; as a decoder, a fresh forward over the 1024 tokens before each of
  --decode-tokens tokens), and
  sinks + window (`sinks:S,1024-S` for S in 1, 4, 8);
- kivi: `full`, `kivi:4`, `kivi:2` (KIVI as published), `kivi:4,s1`, `kivi:2,s1` (the first
  token, the attention sink, kept in precision) and `kivi:2,pre`, `kivi:2,s1,pre` (keys
  quantized before RoPE, KVQuant) at 2k/4k/8k tokens: perplexity, cache bytes,
  tokens/s (``--kivi`` lists them);
- kv4: the ``kv4`` preset (keys after RoPE and values fake-quantized to int4 per head and token
  inside attention, the cache kept in model precision: no byte saved) at 2k/4k/8k tokens, the
  row KIVI replaces;
- passkey: the planted-key retrieval at 4096 tokens with every token kept (the h2o rows' reference,
  also the first row of h2o);
- h2o: H2O at 20% and 50% of a 4096-token stream (half heavy hitters, half recent) against the
  window of the same budget: perplexity and the passkey at 4096 tokens;
- speed: decode tokens/s only, for the tables' speed columns, meant for an otherwise idle
  machine (the other sections' speeds suffer from anything else running): after 2k tokens
  ``full``, the window, sinks + window and re-computation; after 4k ``full``, KIVI, the ``kv4``
  preset and the peer's caches (when optimum-quanto is there). The tables take a policy's last
  decode row, so list the speed run's file last;
- bytes: each KIVI setting's cache bytes at 4k tokens for a model run in bfloat16 (the goals
  compare with a bfloat16 cache; the benchmark's model runs in float32), from the caches' own
  ``update`` fed random keys and values of the right shapes;
- memory: cache bytes and peak RSS against context (1k/2k/4k/8k) for full, kivi:2 and sinks:4,1020;
- peer: transformers' own ``QuantizedCache`` (optimum-quanto backend, 4 and 2 bits, its defaults:
  groups of 64 along the channel axis for both K and V, 128 recent tokens in full precision)
  beside ``kivi:4`` and ``kivi:2`` at 4k tokens. optimum-quanto is not a dependency of llmpress:
  run this section from a benchmark venv that has it (``python3 -m venv V && echo
  $PWD/.venv/lib/python3.11/site-packages > V/lib/python3.11/site-packages/main.pth &&
  V/bin/pip install optimum-quanto==0.2.7``, which installs nothing else but setuptools);
  without it the section records why it was skipped;
- kvpress: NVIDIA's kvpress (0.5.5) beside llmpress's eviction at 20% and 50% of a 4096-token
  context: the perplexity of the 512 tokens after the context and the planted pass key.
  kvpress compresses the cache once, after a one-shot prefill that saw every token
  (``StreamingLLMPress`` with 4 sinks, ``SnapKVPress``: heavy hitters scored by the last
  queries of the prompt); llmpress's caches evict while the context streams in (64 tokens per
  step; ``h2o`` and ``sinks:4``). kvpress 0.5.5 requires transformers < 5.3 and the project pins
  5.23, so it cannot be installed next to the project with its dependencies: this section runs
  from a venv that has it without them (``V/bin/pip install --no-deps kvpress==0.5.5 cachetools
  fire termcolor`` on a venv made as for the peer section), and passes the prefill's
  ``cache_position`` itself (transformers 5.3+ no longer hands it to attention modules, where
  kvpress's hooks read it) and the later tokens' ``position_ids`` (the cache kvpress compressed
  is shorter than the positions its tokens had).

Rows are appended to the JSON as they finish (a partial run keeps them). ``--table A.json
[B.json ...]`` prints the markdown tables of one or more such files (e.g. a run per section) and
stops; with ``--across`` (files of runs on different ``--text``) one table per section with a
column per test text.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import main_guard  # noqa: E402

from llmpress import data as data_mod  # noqa: E402
from llmpress import load_compressed  # noqa: E402
from llmpress.errors import UserError  # noqa: E402
from llmpress.eval.kvstream import passkey, recompute_perplexity, stream_perplexity  # noqa: E402
from llmpress.eval.memory import hwm_mb, reset_hwm, trim_malloc  # noqa: E402

SECTIONS = ("streaming", "kivi", "kv4", "h2o", "memory", "peer", "bytes")  # and "speed" (run on its own), "passkey" (in h2o), "kvpress"


class Rows:
    def __init__(self, path: Path, meta: dict, text: str = "wiki"):
        self.path, self.data, self.text = path, {"meta": meta, "rows": []}, text

    def add(self, section: str, row: dict) -> None:
        row = {"section": section, "text": self.text, **row}
        self.data["rows"].append(row)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1))
        print(json.dumps(row), flush=True)


def measured(fn, *args, **kwargs) -> dict:
    trim_malloc()
    exact = reset_hwm()
    row = fn(*args, **kwargs)
    if exact:
        row["peak_rss_mb"] = round(hwm_mb(), 1)
    return row


def tensor_bytes(t) -> int:
    """Bytes of a tensor, unwrapping tensor subclasses (quanto's packed codes, scales, shifts)."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def peer_cache_bytes(cache) -> int:
    """Bytes of a transformers QuantizedCache: its quantized part plus the full-precision residual."""
    import torch

    total = 0
    for layer in cache.layers:
        for name in ("_quantized_keys", "_quantized_values", "keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor) and t.dim() == 4:
                total += tensor_bytes(t)
    return total


def peer_rows(model, stream, n: int, chunk: int) -> list[dict]:
    """transformers' QuantizedCache (quanto backend) at 4 and 2 bits on the first ``n`` tokens."""
    try:
        import optimum.quanto  # noqa: F401
        from transformers import QuantizedCache
    except ImportError as e:
        return [{"policy": "transformers QuantizedCache (quanto)", "skipped": f"optimum-quanto not installed here ({e})"}]
    rows = []
    for bits in (4, 2):
        try:
            cache = QuantizedCache(backend="quanto", config=model.config, nbits=bits)
        except ValueError as e:  # e.g. gemma3: "only supported for models with only full attention layers"
            return [{"policy": "transformers QuantizedCache (quanto)", "skipped": str(e).split(". ")[0]}]
        row = measured(stream_perplexity, model, stream[:n], "full", chunk=chunk, cache=cache, nbytes=peer_cache_bytes)
        rows.append({**row, "policy": f"transformers QuantizedCache quanto int{bits} (group 64, residual 128)", "context": n})
    return rows


def decode_speed(model, stream, spec: str, context: int, new: int, *, cache=None, nbytes=None) -> dict:
    """Tokens/s of ``new`` greedy-free decode steps (the text's own next tokens, one at a time)
    after a ``context``-token prefill in chunks of 512, with the policy's cache (or a ready
    ``cache`` counted by ``nbytes``: a peer's)."""
    import torch

    from llmpress.kvcache import build_cache, parse_policy
    from llmpress.kvcache.build import cache_bytes, unobserve_attention

    nbytes = nbytes or cache_bytes
    cache = build_cache(model, spec) if cache is None else cache
    try:
        with torch.no_grad():
            t = time.perf_counter()
            for s in range(0, context, 512):
                model(input_ids=stream[s : min(s + 512, context)][None], past_key_values=cache, use_cache=True)
            prefill = time.perf_counter() - t
            t = time.perf_counter()
            for i in range(context, context + new):
                model(input_ids=stream[i : i + 1][None], past_key_values=cache, use_cache=True)
            dec = time.perf_counter() - t
    finally:
        unobserve_attention(model)
    return {
        "policy": parse_policy(spec).describe(),  # as the perplexity rows name it
        "context": context,
        "prefill_s": round(prefill, 2),
        "decode_tok_s": round(new / dec, 2),
        "cache_bytes": nbytes(cache),
    }


def recompute_speed(model, stream, window: int, context: int, new: int) -> dict:
    """Tokens/s of the sliding window with re-computation as a decoder: each of ``new`` tokens
    after ``context`` predicted by a fresh forward over the ``window`` tokens before it."""
    import torch

    with torch.no_grad():
        t = time.perf_counter()
        for i in range(context, context + new):
            model(input_ids=stream[i - window : i][None], use_cache=False)
        dec = time.perf_counter() - t
    return {"policy": f"recompute:{window}", "context": context, "decode_tok_s": round(new / dec, 2), "cache_bytes": 0}


def kv4_model(model, stream):
    """A copy of ``model`` with the ``kv4`` preset (K/V fake-quantized in attention); it gathers
    no statistics, so one window satisfies the engine."""
    import copy

    from llmpress import api

    fake = copy.deepcopy(model)
    api.compress(fake, "kv4", data=stream[:512][None])
    return fake


def speed_rows(model, stream, a, out: Rows) -> None:
    """The ``speed`` section (module doc)."""
    W, new = a.cache, a.decode_tokens
    for spec in ("full", f"window:{W}", f"sinks:4,{W - 4}"):
        out.add("decode", decode_speed(model, stream, spec, a.prefill, new))
    out.add("decode", recompute_speed(model, stream, W, a.prefill, new))
    for spec in ("full", "kivi:4", "kivi:2", "kivi:2,s1", "kivi:2,s1,pre"):
        out.add("decode", decode_speed(model, stream, spec, 4096, new))
    fake = kv4_model(model, stream)
    out.add("decode", {**decode_speed(fake, stream, "full", 4096, new), "policy": "kv4 preset"})
    del fake
    try:
        import optimum.quanto  # noqa: F401
        from transformers import QuantizedCache
    except ImportError:
        return
    for bits in (4, 2):
        try:
            cache = QuantizedCache(backend="quanto", config=model.config, nbits=bits)
        except ValueError:  # sliding-window layers: refused (the peer section records why)
            return
        row = decode_speed(model, stream, "full", 4096, new, cache=cache, nbytes=peer_cache_bytes)
        out.add("decode", {**row, "policy": f"transformers QuantizedCache quanto int{bits} (group 64, residual 128)"})


def _after_context(model, cache, ids, n: int, *, prefill) -> float:
    """``prefill(ids[:n])`` fills ``cache``; then the tokens after the context are fed 32 at a
    time at their own positions: the perplexity of ids[n+1:]."""
    import torch
    import torch.nn.functional as F

    prefill(ids[:n])
    nll, cnt = 0.0, 0
    with torch.no_grad():
        for s in range(n, ids.numel() - 1, 32):
            x = ids[s : min(s + 32, ids.numel() - 1)]
            logits = model(input_ids=x[None], past_key_values=cache, use_cache=True, position_ids=torch.arange(s, s + x.numel())[None]).logits[0]
            nll += float(F.cross_entropy(logits.float(), ids[s + 1 : s + 1 + x.numel()], reduction="sum"))
            cnt += x.numel()
    return float(torch.exp(torch.tensor(nll / cnt)))


def _key(model, cache, prompt, ask: int, answer, *, prefill) -> dict:
    """The pass key after ``prefill(prompt[:-ask])``: the question, then the key's tokens one at
    a time (exact greedy match and mean log-probability, as ``llmpress.eval.kvstream.passkey``)."""
    import torch

    n = prompt.numel() - ask
    prefill(prompt[:n])
    got, lp = [], 0.0
    with torch.no_grad():
        logits = model(input_ids=prompt[n:][None], past_key_values=cache, use_cache=True, position_ids=torch.arange(n, prompt.numel())[None]).logits[
            0, -1
        ]
        pos = prompt.numel()
        for t in answer.tolist():
            lp += float(torch.log_softmax(logits.float(), dim=-1)[t])
            got.append(int(logits.argmax()))
            logits = model(input_ids=torch.tensor([[t]]), past_key_values=cache, use_cache=True, position_ids=torch.tensor([[pos]])).logits[0, -1]
            pos += 1
    return {"correct": got == answer.tolist(), "key_logprob": lp / answer.numel()}


def kvpress_rows(model, tok, stream, n: int = 4096, after: int = 512) -> list[dict]:
    """The ``kvpress`` section (module doc)."""
    import torch
    from transformers import DynamicCache

    from llmpress.eval.kvstream import PASSKEY_QUESTION, passkey_prompt
    from llmpress.kvcache import build_cache
    from llmpress.kvcache.build import unobserve_attention

    try:
        from kvpress import SnapKVPress, StreamingLLMPress
    except ImportError as e:
        return [{"policy": "kvpress", "skipped": f"kvpress not installed here ({e})"}]
    ids = stream[: n + after + 1]
    prompt, answer = passkey_prompt(tok, stream[n:], "71432", n, 0.1)
    ask = len(tok(PASSKEY_QUESTION, add_special_tokens=False)["input_ids"])

    def ours(spec):
        def run(task):
            cache = build_cache(model, spec)

            def prefill(x):
                with torch.no_grad():
                    for s in range(0, x.numel(), 64):
                        model(input_ids=x[s : s + 64][None], past_key_values=cache, use_cache=True)

            try:
                return task(cache, prefill)
            finally:
                unobserve_attention(model)

        return run

    def theirs(press):
        def run(task):
            cache = DynamicCache()

            def prefill(x):
                with torch.no_grad(), press(model):
                    model(input_ids=x[None], past_key_values=cache, use_cache=True, cache_position=torch.arange(x.numel()))

            return task(cache, prefill)

        return run

    rows = []
    for frac in (1.0, 0.2, 0.5):
        b = int(frac * n)
        runs = [("llmpress", "full", ours("full"))] if frac == 1.0 else [
            ("llmpress", f"h2o:{b // 2},{b - b // 2}", ours(f"h2o:{b // 2},{b - b // 2}")),
            ("llmpress", f"sinks:4,{b - 4}", ours(f"sinks:4,{b - 4}")),
            ("kvpress 0.5.5", f"SnapKVPress(compression_ratio={1 - frac:.1f})", theirs(SnapKVPress(compression_ratio=1 - frac))),
            ("kvpress 0.5.5", f"StreamingLLMPress(compression_ratio={1 - frac:.1f}, n_sink=4)", theirs(StreamingLLMPress(compression_ratio=1 - frac, n_sink=4))),
        ]  # fmt: skip
        for tool, name, run in runs:
            t = time.perf_counter()
            ppl = run(lambda cache, prefill: _after_context(model, cache, ids, n, prefill=prefill))
            key = run(lambda cache, prefill: _key(model, cache, prompt, ask, answer, prefill=prefill))
            rows.append({"tool": tool, "policy": name, "budget": b, "fraction": frac, "context": n,
                         f"ppl_next{after}": ppl, "passkey": key, "seconds": round(time.perf_counter() - t, 1)})  # fmt: skip
    return rows


def bytes_rows(model, specs: list[str], n: int, dtype) -> list[dict]:
    """Cache bytes after ``n`` tokens when the model runs in ``dtype`` (e.g. bfloat16 while the
    benchmark's model is float32): each policy's cache is fed random keys and values of the
    model's cache shapes in ``dtype`` through its own ``update`` (the bytes depend on shapes
    and dtypes only), also transformers' quanto cache when optimum-quanto is here."""
    import torch

    from llmpress.kvcache import build_cache, parse_policy
    from llmpress.kvcache.build import cache_bytes, head_dim, text_config

    cfg = text_config(model)
    shape = (1, cfg.num_key_value_heads, n, head_dim(cfg))
    g = torch.Generator().manual_seed(0)
    caches = [(parse_policy(s).describe(), build_cache(model, s), cache_bytes) for s in specs]
    try:
        import optimum.quanto  # noqa: F401
        from transformers import QuantizedCache

        for bits in (4, 2):
            name = f"transformers QuantizedCache quanto int{bits} (group 64, residual 128)"
            caches.append((name, QuantizedCache(backend="quanto", config=model.config, nbits=bits), peer_cache_bytes))
    except (ImportError, ValueError):  # not installed, or the model has sliding-window layers (refused)
        pass
    rows = []
    for name, cache, count in caches:
        for i in range(cfg.num_hidden_layers):
            for s in range(0, n, 512):  # as a chunked prefill would
                k = torch.randn(*shape[:2], min(512, n - s), shape[3], generator=g).to(dtype)
                cache.update(k, torch.randn(k.shape, generator=g).to(dtype), i)
        rows.append({"policy": name, "context": n, "dtype": str(dtype).removeprefix("torch."), "cache_bytes": count(cache)})
    return rows


def _mib(b) -> str:
    return f"{b / 2**20:.1f}" if b is not None else "-"


def _x(v: float, ref: float | None) -> str:
    return f"{v:.3f} ({v / ref:.3f}x)" if ref else f"{v:.3f}"


def tables(rows: list[dict]) -> str:
    """Markdown tables of the benchmark rows (any mix of sections), one set per test text (rows
    from before ``--text`` existed are on wiki)."""
    texts = list(dict.fromkeys(r.get("text", "wiki") for r in rows))
    if len(texts) == 1:
        return _tables(rows)
    return "\n\n".join(f"Test text: {t}\n\n" + _tables([r for r in rows if r.get("text", "wiki") == t]) for t in texts)


def _ratio(cell: dict, full: dict, key) -> str:
    return f"{cell[key] / full[key]:.3f}x" if key in cell and key in full else "-"


def across(rows: list[dict]) -> str:
    """One table per section with a column per test text: each KIVI/kv4 policy's perplexity as a
    ratio to the full cache at every context, and each eviction policy's ratio at 4096 tokens with
    the planted key's log-probability (rows of several runs, one per ``--text``)."""
    texts = list(dict.fromkeys(r.get("text", "wiki") for r in rows))
    q = [r for r in rows if r.get("section") in ("kivi", "kv4") and "ppl" in r]
    full = {(r.get("text", "wiki"), r["context"]): r["ppl"] for r in q if r["policy"] == "full"}
    out = []
    if q:
        ctx = sorted({r["context"] for r in q})
        head = " | ".join(f"{t} {' / '.join(f'{c // 1024}k' for c in ctx)}" for t in texts)
        out += [f"| policy (ppl x full cache) | {head} |", "|---|" + "---|" * len(texts)]
        for pol in dict.fromkeys(r["policy"] for r in q if r["policy"] != "full"):
            cell = {(r.get("text", "wiki"), r["context"]): r["ppl"] for r in q if r["policy"] == pol}
            out.append(f"| {pol} | " + " | ".join(" / ".join(_ratio(cell, full, (t, c)) for c in ctx) for t in texts) + " |")
        out.append("")
    h = [r for r in rows if r.get("section") == "h2o"]
    if h:
        out += ["| budget | policy | " + " | ".join(f"{t}: ppl x full, key log-prob" for t in texts) + " |", "|---|---|" + "---|" * len(texts)]
        for key in dict.fromkeys((r["fraction"], r["budget"], r["policy"]) for r in h):
            cells = []
            for t in texts:
                r = next((r for r in h if r.get("text", "wiki") == t and (r["fraction"], r["budget"], r["policy"]) == key), None)
                ref = full.get((t, r.get("tokens", 4096))) if r else None
                ppl = f"{r['ppl'] / ref:.3f}x" if r and "ppl" in r and ref else "1.000x" if r and key[0] == 1.0 else "-"
                pk = r.get("passkey", {}) if r else {}
                cells.append(f"{ppl}, {pk['key_logprob']:.2f}{' (found)' if pk.get('correct') else ''}" if pk else ppl)
            out.append(f"| {key[0]:.0%} ({key[1]}) | {key[2]} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _tables(rows: list[dict]) -> str:
    by = lambda sec: [r for r in rows if r.get("section") == sec]  # noqa: E731
    dec = {(r["policy"], r["context"]): r for r in by("decode")}
    out = []
    if st := by("streaming"):
        ref = next((r["ppl"] for r in st if r["policy"].startswith("recompute") and "note" not in r), None)
        out += ["| policy | ppl (x recompute) | cache MiB at peak | decode tokens/s after 2k |", "|---|---|---|---|"]
        for r in (r for r in st if "note" not in r):  # (an earlier stride-1 cost row: see the decode column)
            d = {} if "note" in r else dec.get((r["policy"].split(",stride")[0], 2048), {})
            name = r["policy"] + (f" ({r['note']})" if "note" in r else "")
            out.append(f"| {name} | {_x(r['ppl'], ref)} | {_mib(r.get('cache_bytes_peak'))} | {d.get('decode_tok_s', '-')} |")
        out.append("")
    q = by("kivi") + by("kv4") + by("peer")
    if q:
        full = {r["context"]: r for r in q if r["policy"] == "full"}
        b16 = {r["policy"]: r["cache_bytes"] for r in by("bytes")}  # bytes at 4k for a bfloat16 model
        ctx = sorted({r["context"] for r in q if "context" in r})
        head = " | ".join(f"ppl {c} (x full)" for c in ctx)
        out += [f"| policy | {head} | cache MiB at 4k, bfloat16 model (x smaller) | decode tokens/s at 4k |", "|---|" + "---|" * (len(ctx) + 2)]
        for pol in dict.fromkeys(r["policy"] for r in q if "skipped" not in r):
            cells = {r["context"]: r for r in q if r["policy"] == pol}
            ppl = " | ".join(_x(cells[c]["ppl"], full.get(c, {}).get("ppl")) if c in cells else "-" for c in ctx)
            key = "kv4 preset" if pol.startswith("kv4") else pol
            nb = b16.get("full" if key == "kv4 preset" else pol)  # kv4 keeps the full cache
            size = f"{_mib(nb)} ({b16['full'] / nb:.2f}x)" if nb and b16.get("full") else "-"
            out.append(f"| {pol} | {ppl} | {size} | {dec.get((key, 4096), {}).get('decode_tok_s', '-')} |")
        out += [f"| {r['policy']} | skipped: {r['skipped']} |" for r in q if "skipped" in r] + [""]
    if (b := by("bytes")) and not q:
        out += ["| policy | cache MiB at 4k, bfloat16 model (x smaller) |", "|---|---|"]
        ref = next((r["cache_bytes"] for r in b if r["policy"] == "full"), None)
        out += [f"| {r['policy']} | {_mib(r['cache_bytes'])} ({ref / r['cache_bytes']:.2f}x) |" for r in b if ref] + [""]
    if h := by("h2o"):
        out += ["| budget | policy | ppl | passkey retrieved | key log-prob |", "|---|---|---|---|---|"]
        for r in h:
            pk = r.get("passkey", {})
            out.append(
                f"| {r['fraction']:.0%} ({r['budget']}) | {r['policy']} | {round(r['ppl'], 3) if 'ppl' in r else '(as full in the kivi table)'} | {pk.get('correct')} | {pk.get('key_logprob', float('nan')):.3f} |"
            )
        out.append("")
    if kp := by("kvpress"):
        ref = next((r for r in kp if r.get("fraction") == 1.0), None)
        out += ["| budget | tool | policy | ppl of the next 512 tokens (x full) | passkey retrieved | key log-prob |", "|---|---|---|---|---|---|"]
        for r in kp:
            if "skipped" in r:
                out.append(f"| - | {r['policy']} | skipped: {r['skipped']} | | | |")
                continue
            ppl = _x(r["ppl_next512"], ref["ppl_next512"] if ref else None)
            out.append(
                f"| {r['fraction']:.0%} ({r['budget']}) | {r['tool']} | {r['policy']} | {ppl} | {r['passkey']['correct']} | {r['passkey']['key_logprob']:.3f} |"
            )
        out.append("")
    if m := by("memory"):
        pols = list(dict.fromkeys(r["policy"] for r in m))
        out += ["| context | " + " | ".join(f"{p} cache MiB / peak RSS MiB" for p in pols) + " |", "|---|" + "---|" * len(pols)]
        for c in sorted({r["context"] for r in m}):
            cells = {r["policy"]: r for r in m if r["context"] == c}
            out.append(
                f"| {c} | "
                + " | ".join(f"{_mib(cells[p].get('cache_bytes_peak'))} / {cells[p].get('peak_rss_mb', '-')}" if p in cells else "-" for p in pols)
                + " |"
            )
    return "\n".join(out)


CONTEXTS = (2048, 4096, 8192)  # the kivi and kv4 sections


def check_length(secs: list[str], n: int, a) -> tuple[int, ...]:
    """The kivi/kv4 contexts the text is long enough for; a clear error when a section needs more
    than the text has (the h2o section's passkey needs 4096 tokens after its 4096-token stream)."""
    need = {"streaming": a.tokens, "h2o": 8192, "passkey": 8192, "peer": 4096, "kvpress": 4096 + 512, "memory": 8192,
            "speed": max(a.prefill, 4096) + a.decode_tokens}  # fmt: skip
    short = [f"{s} needs {need[s]}" for s in secs if s in need and need[s] > n]
    if short:
        raise UserError(f"--text {a.text}: {n} test tokens, too short for " + ", ".join(short))
    fits = tuple(c for c in CONTEXTS if c <= n)
    if not fits and any(s in secs for s in ("kivi", "kv4")):
        raise UserError(f"--text {a.text}: {n} test tokens, shorter than the kivi/kv4 contexts {CONTEXTS}")
    return fits


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--tokens", type=int, default=16384, help="stream length of the streaming section")
    ap.add_argument("--cache", type=int, default=1024, help="cache budget of the streaming section")
    ap.add_argument("--recompute-stride", type=int, default=64)
    ap.add_argument(
        "--kivi",
        nargs="+",
        default=["full", "kivi:4", "kivi:2", "kivi:4,s1", "kivi:2,s1", "kivi:2,pre", "kivi:2,s1,pre"],
        help="policies of the kivi section",
    )
    ap.add_argument("--sinks", type=int, nargs="+", default=[1, 4, 8], help="sink counts of the streaming section")
    ap.add_argument("--chunk", type=int, default=32, help="tokens per step of the perplexity streams")
    ap.add_argument("--prefill", type=int, default=2048, help="context before the decode-speed measurement")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument(
        "--text",
        default="wiki",
        help="test text of every section: wiki, news, code (packaged) or a text file; news (12.9k tokens) is long enough "
        "for the kivi, kv4, h2o and memory sections, not for a 16k stream",
    )
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--table",
        nargs="+",
        metavar="JSON",
        help="print the tables of these result files and stop (decode speeds: from the last file that has any, e.g. a speed run's)",
    )
    ap.add_argument("--across", action="store_true", help="with --table: one column per test text (files of runs with different --text)")
    a = ap.parse_args()
    if a.table:
        files = [json.loads(Path(f).read_text())["rows"] for f in a.table]
        if a.across:
            print(across([r for rs in files for r in rs]))
            return
        speed = next((rs for rs in reversed(files) if any(r["section"] == "decode" for r in rs)), [])  # the last file with speeds
        print(tables([r for rs in files for r in rs if r["section"] != "decode"] + [r for r in speed if r["section"] == "decode"]))
        return
    secs = a.sections.split(",")
    data_mod.check_sources([a.text])
    model, tok = load_compressed(a.model)
    stream = data_mod.token_stream(a.text, "test", tok)
    fits = check_length(secs, stream.numel(), a)  # contexts this text is long enough for (fail fast on the rest)
    suffix = "" if a.text == "wiki" else f"-{Path(a.text).stem}"
    out = Rows(Path(a.out or f"runs/bench/kvcache-{a.model}{suffix}.json"), {"model": a.model, "text": f"{a.text} test", "tokens": a.tokens}, a.text)
    if "streaming" in secs:
        ids, W = stream[: a.tokens], a.cache
        for spec in ("full", f"window:{W}", *(f"sinks:{s},{W - s}" for s in a.sinks)):
            out.add("streaming", measured(stream_perplexity, model, ids, spec, chunk=a.chunk))
            out.add("decode", decode_speed(model, stream, spec, a.prefill, a.decode_tokens))
        out.add("streaming", recompute_perplexity(model, ids, W, stride=a.recompute_stride))
        out.add("decode", recompute_speed(model, stream, W, a.prefill, a.decode_tokens))  # the exact baseline as a decoder
    if "kivi" in secs:
        for n in fits:
            for spec in a.kivi:
                out.add("kivi", {**measured(stream_perplexity, model, stream[:n], spec, chunk=a.chunk), "context": n})
                if n == 4096:
                    out.add("decode", decode_speed(model, stream, spec, n, a.decode_tokens))
    if "kv4" in secs:
        fake = kv4_model(model, stream)
        for n in fits:
            row = measured(stream_perplexity, fake, stream[:n], "full", chunk=a.chunk)
            out.add("kv4", {**row, "policy": "kv4 preset (int4 fake-quantized in attention, cache in model precision)", "context": n})
            if n == 4096:
                out.add("decode", {**decode_speed(fake, stream, "full", n, a.decode_tokens), "policy": "kv4 preset"})
        del fake
    if "h2o" in secs or "passkey" in secs:  # the retrieval with every token kept: the reference of the h2o rows
        out.add("h2o", {"policy": "full", "budget": 4096, "fraction": 1.0, "passkey": passkey(model, tok, stream[4096:], "full", context=4096)})
    if "h2o" in secs:
        n = 4096
        for frac in (0.2, 0.5):
            budget = int(frac * n)
            for spec in (f"h2o:{budget // 2},{budget - budget // 2}", f"window:{budget}", f"sinks:4,{budget - 4}"):
                row = measured(stream_perplexity, model, stream[:n], spec, chunk=a.chunk)
                row["passkey"] = passkey(model, tok, stream[n:], spec, context=n)
                out.add("h2o", {**row, "budget": budget, "fraction": frac})
    if "peer" in secs:
        for spec in () if "kivi" in secs else ("full", "kivi:4", "kivi:2"):  # the kivi section has them at 4096
            out.add("peer", {**measured(stream_perplexity, model, stream[:4096], spec, chunk=a.chunk), "context": 4096})
        for row in peer_rows(model, stream, 4096, a.chunk):
            out.add("peer", row)
    if "speed" in secs:
        speed_rows(model, stream, a, out)
    if "kvpress" in secs:
        for row in kvpress_rows(model, tok, stream):
            out.add("kvpress", row)
    if "bytes" in secs:
        import torch

        for row in bytes_rows(
            model,
            list(dict.fromkeys(["full", "kivi:4", "kivi:2", *a.kivi, "kivi:2,g64", "kivi:2,g64,s1", "kivi:2,g64,s1,pre"])),
            4096,
            torch.bfloat16,
        ):
            out.add("bytes", row)
    if "memory" in secs:
        for n in (1024, 2048, 4096, 8192):
            for spec in ("full", "kivi:2", "sinks:4,1020"):
                out.add("memory", {**measured(stream_perplexity, model, stream[:n], spec, chunk=64), "context": n})


if __name__ == "__main__":
    main_guard(main)
