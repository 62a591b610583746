"""KV-cache policies on SmolLM2-135M (and gemma-3-270m): long-text perplexity, cache bytes,
decode speed, planted-key retrieval.

    flock /tmp/llmpress-heavy.lock .venv/bin/python benchmarks/kvcache.py [--model smollm2-135m]
        [--sections streaming,kivi,h2o,memory] [--tokens 16384] [--out runs/bench/kvcache-MODEL.json]

Sections (each through the public API, llmpress.eval.kvstream, on the packaged Wikipedia test
text, token by token):

- streaming: the seeds' StreamingLLM experiment on a stream of --tokens (default 16384, twice
  SmolLM2's 8192 training length): dense attention (`full`), window attention (`window:1024`),
  sliding window with re-computation (1024 tokens before each target; --recompute-stride
  targets per forward, and its per-token cost measured with stride 1 on 64 targets), and
  sinks + window (`sinks:S,1024-S` for S in 1, 4, 8);
- kivi: `full`, `kivi:4`, `kivi:2` at 2k/4k/8k tokens: perplexity, cache bytes, tokens/s;
- h2o: H2O at 20% and 50% of a 4096-token stream (half heavy hitters, half recent) against the
  window of the same budget: perplexity and the passkey at 4096 tokens;
- memory: cache bytes and peak RSS against context (1k/2k/4k/8k) for full, kivi:2 and sinks:4,1020.

Rows are appended to the JSON as they finish (a partial run keeps them).
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
from llmpress.eval.kvstream import passkey, recompute_perplexity, stream_perplexity  # noqa: E402
from llmpress.eval.memory import hwm_mb, reset_hwm, trim_malloc  # noqa: E402

SECTIONS = ("streaming", "kivi", "h2o", "memory")


class Rows:
    def __init__(self, path: Path, meta: dict):
        self.path, self.data = path, {"meta": meta, "rows": []}

    def add(self, section: str, row: dict) -> None:
        row = {"section": section, **row}
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--tokens", type=int, default=16384, help="stream length of the streaming section")
    ap.add_argument("--cache", type=int, default=1024, help="cache budget of the streaming section")
    ap.add_argument("--recompute-stride", type=int, default=64)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    model, tok = load_compressed(a.model)
    stream = data_mod.token_stream("wiki", "test", tok)
    out = Rows(Path(a.out or f"runs/bench/kvcache-{a.model}.json"), {"model": a.model, "text": "wiki test", "tokens": a.tokens})
    secs = a.sections.split(",")
    if "streaming" in secs:
        ids, W = stream[: a.tokens], a.cache
        for spec in ("full", f"window:{W}", *(f"sinks:{s},{W - s}" for s in (1, 4, 8))):
            out.add("streaming", measured(stream_perplexity, model, ids, spec))
        out.add("streaming", recompute_perplexity(model, ids, W, stride=a.recompute_stride))
        t = time.perf_counter()
        one = recompute_perplexity(model, ids[: W + 65], W, stride=1)  # the exact baseline's cost per token
        out.add("streaming", {**one, "note": f"stride 1 on the first {W + 64} tokens: cost per token", "seconds": round(time.perf_counter() - t, 2)})
    if "kivi" in secs:
        for n in (2048, 4096, 8192):
            for spec in ("full", "kivi:4", "kivi:2"):
                out.add("kivi", {**measured(stream_perplexity, model, stream[:n], spec), "context": n})
    if "h2o" in secs:
        n = 4096
        for frac in (0.2, 0.5):
            budget = int(frac * n)
            for spec in (f"h2o:{budget // 2},{budget - budget // 2}", f"window:{budget}", f"sinks:4,{budget - 4}"):
                row = measured(stream_perplexity, model, stream[:n], spec)
                row["passkey"] = passkey(model, tok, stream[n:], spec, context=n)
                out.add("h2o", {**row, "budget": budget, "fraction": frac})
    if "memory" in secs:
        for n in (1024, 2048, 4096, 8192):
            for spec in ("full", "kivi:2", "sinks:4,1020"):
                out.add("memory", {**measured(stream_perplexity, model, stream[:n], spec, chunk=64), "context": n})


if __name__ == "__main__":
    main_guard(main)
