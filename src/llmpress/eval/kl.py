"""KL divergence and top-1 agreement of a compressed model against its full-precision baseline.

The convention of llama.cpp's ``perplexity --kl-divergence``: for every scored token (the
tokens 2..L of a test window, as in perplexity), KL(p_base || p_model) =
sum_v p_base(v) (log p_base(v) - log p_model(v)) in nats; the report gives its mean and its
99th percentile over the tokens, and top-1 agreement, the fraction of tokens whose most
likely next token is the same under both models (llama.cpp's "same top p"; the baseline's
argmax is kept exactly, beside the rows).

The compressed model replaces the baseline in place, so the baseline's next-token
distributions are kept between the two evaluations: the log-probabilities of the first
``windows`` test windows of each source (``EvalConfig.kl_windows``, default 8), one float16
row of vocabulary size per scored token, written to a file in a temporary folder while the
baseline is evaluated and read back chunk by chunk while the compressed model is. Disk:
windows x (seqlen - 1) x vocab x 2 bytes per source (8 x 511 x 49152 x 2 = 402 MB on
SmolLM2-135M, 2.1 GB on gemma-3's 262144-token vocabulary). Memory: the rows are handled
``KL_BUDGET`` elements (512 KB in float32) at a time, a few temporaries of that size (small
chunks are also the fastest: ~130 ms per 512 tokens of a 49152-token vocabulary on one CPU
thread), so peak RSS does not move (benchmarks/kl_memory.py: a tiny llama with SmolLM2's
vocabulary, 8 windows of 512, peaked 18 MB over its starting RSS evaluated the chunked way
without KL, 19 MB recording and 25 MB comparing; 204, 204 and 205 MB the plain way).
Exactness: float16 holds log p to 4.9e-4 (0.05% of p) where p > e^-2 and to 0.4% of p down
to p = e^-16, and the stored rows are renormalized before use: a model against itself gives
KL ~ 1e-7 to 1e-6 (the rounding; tests/eval/test_kl.py) and top-1 exactly 1.0; every token
of the kept windows is scored against the full distribution (no top-k truncation).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from ..calib.dist import Group
from ..errors import UserError

KL_BUDGET = 1 << 17  # elements of logits handled at a time (512 KB in float32; larger chunks were slower and left freed heap resident)


class BaselineLogprobs:
    """The baseline's next-token log-probabilities of the first ``windows`` test windows of each
    source, on disk in a temporary folder under ``folder`` (removed by :meth:`close`, or when the
    object is collected). :meth:`recorder` during the baseline evaluation, :meth:`comparer`
    during the compressed one; :attr:`stats` then holds ``{source: {kl, kl_p99, top1, tokens}}``."""

    def __init__(self, windows: int, folder: str | Path | None = None):
        self.windows = windows
        self._tmp = tempfile.TemporaryDirectory(prefix="llmpress-kl-", dir=folder)
        self._files: dict[str, Path] = {}
        self._ids: dict[str, torch.Tensor] = {}  # the kept windows' tokens, to check both evaluations score the same text
        self._top: dict[str, torch.Tensor] = {}  # the baseline's most likely next token per kept row (exact, not from float16)
        self._vocab: dict[str, int] = {}
        self.stats: dict[str, dict] = {}

    def recorder(self, source: str) -> _Recorder:
        path = self._files.setdefault(source, Path(self._tmp.name) / f"{len(self._files)}.f16")
        return _Recorder(self, source, path)

    def comparer(self, source: str) -> _Comparer:
        if source not in self._files:
            raise UserError(f"no baseline log-probabilities were recorded for evaluation source {source!r}")
        return _Comparer(self, source, self._files[source])

    def close(self) -> None:
        self._tmp.cleanup()


class _Rows:
    """A stream of scored-token rows [n, vocab] in evaluation order (window-major), of which the
    first windows' rows are kept; :meth:`start` with this rank's windows, :meth:`add` per chunk
    of logits, :meth:`finish` at the end. Per-row results live in tensors allocated at
    :meth:`start` (no small allocation per chunk that would pin freed heap memory)."""

    def __init__(self, owner: BaselineLogprobs, source: str, path: Path):
        self.owner, self.source, self.path = owner, source, path
        self.rows = self.done = 0

    def start(self, windows: torch.Tensor, first: int = 0) -> None:
        """``windows`` [n, L]: this rank's test windows, the first of them the ``first``-th overall
        (data-parallel ranks each take a contiguous share): the rows of the windows among the first
        ``owner.windows`` overall are kept."""
        n = max(0, min(windows.shape[0], self.owner.windows - first))
        self.ids = windows[:n].clone()
        self.rows, self.done = n * (windows.shape[1] - 1), 0

    def add(self, logits: torch.Tensor) -> None:
        """``logits`` [n, vocab] of the next ``n`` scored tokens (left unchanged)."""
        logits = logits.reshape(-1, logits.shape[-1])
        end = min(logits.shape[0], self.rows - self.done)
        step = max(1, KL_BUDGET // logits.shape[-1])
        for s in range(0, end, step):
            rows = logits[s : min(s + step, end)].float()
            self._rows(rows, slice(self.done, self.done + rows.shape[0]))
            self.done += rows.shape[0]

    def _rows(self, logits: torch.Tensor, at: slice) -> None:
        raise NotImplementedError


class _Recorder(_Rows):
    def start(self, windows: torch.Tensor, first: int = 0) -> None:
        super().start(windows, first)
        self.owner._ids[self.source] = self.ids
        self.owner._top[self.source] = self.top = torch.empty(self.rows, dtype=torch.long)
        self.file = open(self.path, "wb")

    def _rows(self, logits: torch.Tensor, at: slice) -> None:
        self.owner._vocab[self.source] = logits.shape[-1]
        self.top[at] = logits.argmax(dim=-1).cpu()
        self.file.write(F.log_softmax(logits, dim=-1).to(torch.float16).cpu().numpy().data)

    def finish(self, group: Group | None = None) -> None:
        self.file.close()


class _Comparer(_Rows):
    def start(self, windows: torch.Tensor, first: int = 0) -> None:
        super().start(windows, first)
        if not torch.equal(self.ids, self.owner._ids[self.source]):
            raise UserError(f"evaluation source {self.source!r}: the test windows differ from the baseline's (a different tokenizer?)")
        self.file = open(self.path, "rb")
        self.top = self.owner._top[self.source]
        self.kl = torch.zeros(self.rows, dtype=torch.float64)
        self.same = torch.zeros(self.rows, dtype=torch.bool)
        self.buf = bytearray()

    def _rows(self, logits: torch.Tensor, at: slice) -> None:
        vocab = self.owner._vocab.get(self.source)
        if vocab != logits.shape[-1]:
            raise UserError(f"the model's vocabulary has {logits.shape[-1]} entries, the baseline's {vocab}: no KL divergence between them")
        if len(self.buf) < 2 * logits.numel():
            self.buf = bytearray(2 * logits.numel())  # once: every later chunk is as large or smaller
        if self.file.readinto(memoryview(self.buf)[: 2 * logits.numel()]) != 2 * logits.numel():
            raise RuntimeError(f"baseline log-probabilities of {self.source!r}: fewer rows on disk than scored")
        base = torch.frombuffer(self.buf, dtype=torch.float16, count=logits.numel()).view(logits.shape)
        self.kl[at] = token_kl(base.to(logits.device), logits).cpu()
        self.same[at] = self.top[at] == logits.argmax(dim=-1).cpu()

    def finish(self, group: Group | None = None) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)  # compared: the disk space goes back now
        kl, same = self.kl[: self.done], self.same[: self.done]
        if group is not None and group.active:
            parts = group.gather((kl, same))
            kl, same = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        self.owner.stats[self.source] = kl_stats(kl, same)


def baseline_record(evaluation, folder: str | Path | None = None) -> BaselineLogprobs | None:
    """The record of an evaluation's baseline (``evaluation.kl_windows`` windows of each source,
    in a temporary folder under ``folder``); None without an evaluation or with ``kl_windows`` 0."""
    if evaluation is None or not evaluation.kl_windows:
        return None
    return BaselineLogprobs(evaluation.kl_windows, folder)


def token_kl(base_logprobs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p_base || p) per row in nats, from the baseline's log-probabilities (renormalized
    here: stored rounded) and the model's logits [n, vocab]. A token the baseline gives
    probability 0 adds 0; one it gives more while the model gives 0 makes the row infinite."""
    lq = F.log_softmax(logits.float(), dim=-1)
    d = F.log_softmax(base_logprobs.float(), dim=-1)
    p = d.exp()
    d.sub_(lq).mul_(p)  # p (log p - log q), in place: one chunk's worth of temporaries
    return d.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf).sum(dim=-1)  # 0 x -inf (p = 0) is 0


def kl_stats(kl: torch.Tensor, same: torch.Tensor) -> dict:
    """``{kl, kl_p99, top1, tokens}`` of per-token divergences and top-1 matches."""
    if kl.numel() == 0:
        return {"kl": None, "kl_p99": None, "top1": None, "tokens": 0}
    return {
        "kl": float(kl.mean()),
        "kl_p99": float(torch.quantile(kl, 0.99)),
        "top1": float(same.double().mean()),
        "tokens": int(kl.numel()),
    }


def set_kl(report, stats: dict[str, dict]) -> None:
    """``kl``, ``kl_p99``, ``top1`` (the first source's, like ``ppl``) and ``kl_by_source``,
    ``kl_p99_by_source``, ``top1_by_source`` in ``report.compressed``; the tokens scored per
    source in ``report.evaluation["kl_tokens_by_source"]``."""
    if not stats:
        return
    first = next(iter(stats.values()))
    for key in ("kl", "kl_p99", "top1"):
        report.compressed[key] = first[key]
        report.compressed[f"{key}_by_source"] = {s: v[key] for s, v in stats.items()}
    report.evaluation["kl_tokens_by_source"] = {s: v["tokens"] for s, v in stats.items()}
