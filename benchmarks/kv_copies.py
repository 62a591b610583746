"""Where a quantized KV cache's loss goes: tokens the context lets the model copy, by how far back.

    flock /tmp/llmpress-heavy.lock .venv/bin/python benchmarks/kv_copies.py [--texts news,code]
        [--policies kivi:2,s1,pre] [--tokens 4096] [--edges 128 1024] [--out runs/bench/kv-copies.json]
    .venv/bin/python benchmarks/kv_copies.py --table runs/bench/kv-copies.json

A target token ``ids[t]`` is a *copy* when the bigram ``(ids[t-1], ids[t])`` occurred earlier in
the stream: an induction head predicts it by attending to the token after the earlier
``ids[t-1]``. Its *distance* is how many positions back the latest such occurrence is. Each text
is streamed through the full cache and through each policy (``--chunk`` tokens per step, as
``benchmarks/kvcache.py``'s kivi section), and each policy's extra negative log-likelihood over
the full cache is split by copy distance. With the default edges, a copy within 128 positions mostly
finds its source in KIVI's full-precision residual window; a farther one only as a quantized key.
So if a text loses more than another under a quantized cache, this says whether the loss sits in
the copies it reads from far back (the keys' precision) or spreads over every token.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import main_guard  # noqa: E402

from llmpress import data as data_mod  # noqa: E402
from llmpress import load_compressed  # noqa: E402
from llmpress.errors import UserError  # noqa: E402
from llmpress.eval.kvstream import stream_perplexity  # noqa: E402
from llmpress.kvcache.build import parse_policy  # noqa: E402


def copy_distance(ids: torch.Tensor) -> torch.Tensor:
    """For each target ``ids[t]``, t = 1..N-1: how far back the latest earlier occurrence of the
    bigram ``(ids[t-1], ids[t])`` is (t - t'), or -1 when there is none. [N - 1] int64."""
    ids = ids.reshape(-1).tolist()
    last: dict[tuple[int, int], int] = {}
    out = []
    for t in range(1, len(ids)):
        key = (ids[t - 1], ids[t])
        out.append(t - last[key] if key in last else -1)
        last[key] = t
    return torch.tensor(out, dtype=torch.long)


def buckets(edges: list[int]) -> list[tuple[str, int, int]]:
    """(label, lo, hi) over copy distances: 'not a copy' first, then (0, e1], (e1, e2], ..., beyond."""
    if not edges or sorted(set(edges)) != list(edges) or edges[0] < 1:
        raise UserError(f"--edges must be increasing positive distances, got {edges}")
    out = [("not a copy", -1, -1)]
    lo = 0
    for e in edges:
        out.append((f"copy, {lo + 1}-{e} back", lo + 1, e))
        lo = e
    out.append((f"copy, over {lo} back", lo + 1, 1 << 62))
    return out


def split(full: torch.Tensor, other: torch.Tensor, dist: torch.Tensor, edges: list[int]) -> list[dict]:
    """Per bucket: share of the tokens, the full cache's mean NLL, the policy's extra NLL per
    token and its share of the policy's total extra NLL."""
    delta = (other - full).double()
    total = float(delta.sum())
    rows = []
    for label, lo, hi in buckets(edges):
        m = dist == -1 if lo == -1 else (dist >= lo) & (dist <= hi)
        n = int(m.sum())
        d = float(delta[m].sum()) if n else 0.0
        rows.append(
            {
                "bucket": label,
                "tokens": n,
                "token_share": n / dist.numel(),
                "full_nll": float(full[m].double().mean()) if n else None,
                "extra_nll": d / n if n else None,
                "extra_share": d / total if total else None,
            }
        )
    return rows


def table(res: dict) -> str:
    """One markdown table per (text, policy)."""
    out = []
    for run in res["runs"]:
        ratio = run["ppl"] / run["full_ppl"]
        out += [
            f"{run['text']}, {run['tokens']} tokens, {run['policy']}: ppl {run['ppl']:.3f} against the full cache's {run['full_ppl']:.3f} "
            f"({ratio:.3f}x; extra NLL {run['extra_nll']:.4f} per token)",
            "",
            "| target tokens | share of tokens | full-cache NLL | extra NLL per token | share of the extra NLL |",
            "|---|---|---|---|---|",
        ]
        for r in run["rows"]:
            f = lambda v, p="{:.4f}": "-" if v is None else p.format(v)  # noqa: E731
            out.append(f"| {r['bucket']} | {r['token_share']:.1%} | {f(r['full_nll'])} | {f(r['extra_nll'])} | {f(r['extra_share'], '{:.1%}')} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--texts", default="news,code", help="comma list of test texts (wiki, news, code or a file)")
    ap.add_argument("--policies", nargs="+", default=["kivi:2,s1,pre"], help="KV cache policies, each against the full cache")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=32, help="tokens per step of the streams")
    ap.add_argument("--edges", type=int, nargs="+", default=[128, 1024], help="copy-distance bucket edges")
    ap.add_argument("--out", default="runs/bench/kv-copies.json")
    ap.add_argument("--table", metavar="JSON", help="print the tables of a result file and stop")
    a = ap.parse_args()
    if a.table:
        print(table(json.loads(Path(a.table).read_text())))
        return
    texts = a.texts.split(",")
    data_mod.check_sources(texts)
    buckets(a.edges)
    for p in a.policies:
        parse_policy(p)
    model, tok = load_compressed(a.model)
    res = {"model": a.model, "tokens": a.tokens, "chunk": a.chunk, "edges": a.edges, "runs": []}
    for text in texts:
        ids = data_mod.token_stream(text, "test", tok)
        if ids.numel() < a.tokens:
            raise UserError(f"{text}: {ids.numel()} test tokens, fewer than --tokens {a.tokens}")
        ids = ids[: a.tokens]
        dist = copy_distance(ids)
        full = stream_perplexity(model, ids, "full", chunk=a.chunk, token_nll=True)
        for p in a.policies:
            got = stream_perplexity(model, ids, p, chunk=a.chunk, token_nll=True)
            rows = split(full["token_nll"], got["token_nll"], dist, a.edges)
            extra = float((got["token_nll"] - full["token_nll"]).double().mean())
            res["runs"].append(
                {
                    "text": text,
                    "tokens": a.tokens,
                    "policy": got["policy"],
                    "ppl": got["ppl"],
                    "full_ppl": full["ppl"],
                    "extra_nll": extra,
                    "rows": rows,
                }
            )
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(res, indent=1))
    print(table(res))


if __name__ == "__main__":
    main_guard(main)
