"""What the KL divergence / top-1 figures (llmpress/eval/kl.py) add to an evaluation's peak RSS and time.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kl_memory.py [--vocab 49152] [--windows 8] [--seqlen 512]

A tiny random llama (2 blocks of width 64, so the head and the vocabulary dominate as they
do on SmolLM2-135M) with a vocabulary of ``--vocab`` entries, evaluated on ``--windows``
random windows three times: without KL, recording the baseline's log-probabilities, and
comparing a second model against them; the chunked (default) and the plain evaluation.
Prints each run's peak RSS above the RSS it started from (the kernel's high-water mark,
reset before each run), its wall time and the size of the file the recording wrote.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny models of the test suite

from conftest import random_windows, tiny_llama  # noqa: E402

from llmpress.eval.kl import BaselineLogprobs  # noqa: E402
from llmpress.eval.memory import hwm_mb, reset_hwm, rss_mb, trim_malloc  # noqa: E402
from llmpress.eval.perplexity import perplexity  # noqa: E402


def _peak(fn) -> tuple[float, float]:
    trim_malloc()
    reset_hwm()
    start, t = rss_mb(), time.perf_counter()
    fn()
    return hwm_mb() - start, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    args = ap.parse_args()
    base, other = tiny_llama(vocab=args.vocab), tiny_llama(vocab=args.vocab, seed=1)
    windows = random_windows(args.windows, args.seqlen, vocab=args.vocab)
    print("| path | run | peak RSS over start (MB) | seconds |\n|---|---|---|---|")
    for chunked in (True, False):
        path = "chunked" if chunked else "plain"
        perplexity(base, windows[:1], 1, chunked=chunked)  # warm-up
        mb, s = _peak(partial(perplexity, base, windows, 1, chunked=chunked))
        print(f"| {path} | no KL | {mb:.0f} | {s:.1f} |")
        record = BaselineLogprobs(args.windows)
        mb, s = _peak(partial(perplexity, base, windows, 1, chunked=chunked, kl=record.recorder("a")))
        size = sum(p.stat().st_size for p in Path(record._tmp.name).iterdir()) / 1e6
        print(f"| {path} | recording ({size:.0f} MB on disk) | {mb:.0f} | {s:.1f} |")
        mb, s = _peak(partial(perplexity, other, windows, 1, chunked=chunked, kl=record.comparer("a")))
        stats = record.stats["a"]
        print(f"| {path} | comparing (KL {stats['kl']:.4f}, top-1 {stats['top1']:.3f}, {stats['tokens']} tokens) | {mb:.0f} | {s:.1f} |")
        record.close()


if __name__ == "__main__":
    main()
