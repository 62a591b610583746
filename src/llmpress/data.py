"""Calibration and evaluation text, and token windows.

The packaged corpus is the Wikipedia excerpt shipped inside the gensim wheel (CC BY-SA):
pages are extracted and cleaned with gensim's wiki tools, redirects and stubs dropped,
and split by article: every 10th article is the test split, the rest calibration.
A second packaged domain is gensim's Lee news corpus (``news``; its test split adds the
corpus's 50 evaluation documents to every 10th background document), and a third is code:
``code``, the Python source of ``torch.nn`` as the pinned torch wheel ships it
(BSD-3-Clause), split by file (every 10th file is the test split). Users may pass a plain
text file or a JSONL file with a ``text`` field.
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .io_safety import atomic_file

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "lee_background.cor"
NEWS_TEST_FILE = "lee.cor"  # the Lee corpus's 50 evaluation documents (none of them in the background file)
MIN_ARTICLE_CHARS = 500
TEST_EVERY = 10


def _gensim_data() -> Path:
    import gensim

    return Path(gensim.__file__).parent / "test" / "test_data"


def _clean(text: str) -> str:
    lines = []
    for line in text.splitlines():
        line = re.sub(r"[ \t]+", " ", re.sub(r"'{2,}", "", line)).strip()
        if not line or line.startswith(("|", "{|", "|}", "!")):
            continue
        lines.append(line)
    return "\n".join(lines)


@functools.lru_cache(maxsize=1)
def wiki_articles() -> tuple[tuple[str, str], ...]:
    """(title, cleaned text) of the packaged Wikipedia articles, in file order."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    out = []
    with bz2.open(_gensim_data() / WIKI_FILE) as f:
        for title, text, _pageid in extract_pages(f, filter_namespaces=("0",)):
            if text.lstrip().lower().startswith("#redirect"):
                continue
            body = _clean(filter_wiki(text))
            if len(body) >= MIN_ARTICLE_CHARS:
                out.append((title, body))
    return tuple(out)


def wiki_split(split: str) -> list[str]:
    """Articles of the packaged Wikipedia text: ``test`` (every 10th) or ``calib`` (the rest)."""
    arts = wiki_articles()
    if split == "test":
        return [t for i, (_, t) in enumerate(arts) if i % TEST_EVERY == 0]
    if split in ("calib", "train"):
        return [t for i, (_, t) in enumerate(arts) if i % TEST_EVERY != 0]
    raise UserError(f"unknown split {split!r}; expected 'calib' or 'test'")


def news_text(name: str = NEWS_FILE) -> list[str]:
    with open(_gensim_data() / name, encoding="utf-8", errors="replace") as f:
        return [line.strip() for line in f if line.strip()]


CODE_PACKAGE = "torch.nn"
PACKAGED = ("wiki", "news", "code")


def code_files() -> list[str]:
    """Text of the ``torch.nn`` Python files, sorted by their path inside the package."""
    import importlib

    root = Path(importlib.import_module(CODE_PACKAGE).__file__).parent
    files = sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)
    out = []
    for p in files:
        text = p.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            out.append(text)
    return out


def _every_tenth(docs: list[str], split: str) -> list[str]:
    return docs[::TEST_EVERY] if split == "test" else [d for i, d in enumerate(docs) if i % TEST_EVERY]


def read_text_file(path: str | os.PathLike) -> list[str]:
    """Documents of a user's file: plain text (one document) or JSONL with a ``text`` field."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"text file {str(path)!r} not found")
    raw = p.read_text(encoding="utf-8", errors="replace")
    if p.suffix.lower() in (".jsonl", ".ndjson"):
        docs = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{p}: line {n} is not JSON ({e.msg})") from e
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise UserError(f"{p}: line {n} has no string field 'text'")
            if rec["text"].strip():
                docs.append(rec["text"])
    else:
        docs = [raw] if raw.strip() else []
    if not docs:
        raise UserError(f"text file {str(path)!r} is empty")
    return docs


def documents(source: str, split: str) -> list[str]:
    """Documents of a named source: ``wiki``, ``news``, ``code`` (packaged) or a file path."""
    if split not in ("test", "calib", "train"):
        raise UserError(f"unknown split {split!r}; expected 'calib' or 'test'")
    if source == "wiki":
        return wiki_split(split)
    if source == "news":  # test: every 10th background document and the 50 evaluation documents
        if split == "test":
            return _every_tenth(news_text(), split) + news_text(NEWS_TEST_FILE)
        # the background file holds three documents twice: a copy on the calibration side of the
        # split would be calibration text scored as test text, so it is left out
        test = set(_every_tenth(news_text(), "test"))
        return [d for d in _every_tenth(news_text(), split) if d not in test]
    if source == "code":
        return _every_tenth(code_files(), split)
    return read_text_file(source)


def _tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(tokenizer.eos_token_id).encode())
    return h.hexdigest()[:16]


def token_stream(source: str, split: str, tokenizer) -> torch.Tensor:
    """Tokenized documents of ``source``/``split``, cached on disk (``.npy``, no pickle)."""
    from .models import cache_dir

    docs = documents(source, split)
    h = hashlib.sha256()
    for d in docs:
        h.update(hashlib.sha256(d.encode()).digest())
    key = f"{h.hexdigest()[:16]}-{_tokenizer_fingerprint(tokenizer)}"
    path = cache_dir() / "tokens" / f"{key}.npy"
    if path.exists():
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False).astype(np.int64))
        except (ValueError, OSError):
            path.unlink(missing_ok=True)  # a damaged cache entry is rebuilt
    ids = tokenize(docs, tokenizer)
    try:
        with atomic_file(path, suffix=".npy") as tmp:  # np.save would add .npy to any other name
            np.save(tmp, ids.numpy().astype(np.int32))
    except OSError:
        pass  # the cache is an optimisation: tokenized again next time
    return ids


def tokenize(docs: list[str], tokenizer) -> torch.Tensor:
    """One long token stream: documents joined by EOS (no BOS; windows add it if the model needs it)."""
    sep = tokenizer.eos_token_id
    ids: list[int] = []
    for d in docs:
        ids.extend(tokenizer(d, add_special_tokens=False)["input_ids"])
        if sep is not None:
            ids.append(sep)
    return torch.tensor(ids, dtype=torch.long)


def _with_bos(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    if bos is None:
        return windows
    return torch.cat([torch.full((windows.shape[0], 1), bos, dtype=windows.dtype), windows[:, :-1]], dim=1)


def eval_windows(stream: torch.Tensor, seqlen: int = 512, max_windows: int | None = None, bos: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows [n, seqlen] from the start of the stream."""
    n = stream.numel() // (seqlen - (1 if bos is not None else 0))
    if n == 0:
        raise UserError(f"text has {stream.numel()} tokens, fewer than one window of {seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    step = seqlen - (1 if bos is not None else 0)
    w = stream[: n * step].view(n, step)
    if bos is None:
        return w
    return torch.cat([torch.full((n, 1), bos, dtype=w.dtype), w], dim=1)


def calib_windows(stream: torch.Tensor, n: int = 128, seqlen: int = 512, seed: int = 0, bos: int | None = None) -> torch.Tensor:
    """``n`` windows of ``seqlen`` tokens at random offsets drawn with ``seed``."""
    if stream.numel() <= seqlen:
        raise UserError(f"calibration text has {stream.numel()} tokens, need more than {seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seqlen, (n,), generator=g)
    w = torch.stack([stream[s : s + seqlen] for s in starts.tolist()])
    return _with_bos(w, bos)


def parse_sources(text: str, *, shares: bool, what: str = "data") -> list[tuple[str, float]]:
    """``(source, share)`` of a comma-separated source list: ``wiki,news`` (equal shares) or, with
    ``shares``, ``wiki:0.75,news:0.25`` (every source a share > 0, summing to 1 within 1e-6).

    Only the syntax is checked here; :func:`check_sources` checks that the files exist.
    A whole item naming a packaged text or an existing file is never split at a colon, nor
    a whole text naming an existing file at its commas.
    """
    if isinstance(text, os.PathLike):
        text = os.fspath(text)
    if not isinstance(text, str):
        raise UserError(f"{what} must be a string of comma-separated sources, got {text!r}")
    if "," in text and Path(text).expanduser().is_file():  # a file whose name holds a comma is one source
        return [(text, 1.0)]
    items = [item.strip() for item in text.split(",")]
    if "" in items:
        raise UserError(f"{what} {text!r}: empty item; expected comma-separated sources ({', '.join(PACKAGED)} or a file)")
    out: list[tuple[str, float | None]] = [_split_share(item, what, text) if shares else (item, None) for item in items]
    names = [name for name, _ in out]
    dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if dup is not None:
        raise UserError(f"{what} {text!r}: {dup} is listed twice")
    given = [s for _, s in out if s is not None]
    if not given:
        return [(name, 1.0 / len(out)) for name in names]
    if len(given) != len(out):
        raise UserError(f"{what} {text!r}: give a share for every source or for none (e.g. wiki:0.75,news:0.25)")
    total = sum(given)
    if abs(total - 1.0) > 1e-6:
        raise UserError(f"{what} {text!r}: shares sum to {total:.10g}, expected 1")
    return [(name, s) for name, s in out]


def _split_share(item: str, what: str, text: str) -> tuple[str, float | None]:
    if item in PACKAGED or ":" not in item or Path(item).expanduser().is_file():
        return item, None
    name, _, raw = item.rpartition(":")
    name = name.strip()
    if not name:
        raise UserError(f"{what} {text!r}: share {raw.strip()!r} names no source")
    try:
        share = float(raw)
    except ValueError:
        raise UserError(f"{what} {text!r}: share {raw.strip()!r} of {name} is not a number") from None
    if not (math.isfinite(share) and share > 0):
        raise UserError(f"{what} {text!r}: share {raw.strip()} of {name} must be a number greater than 0")
    return name, share


def check_sources(sources) -> None:
    """Every source that is not packaged is a readable, non-empty text file (else a UserError naming it)."""
    for source in sources:
        if source in PACKAGED:
            continue
        if not Path(source).expanduser().is_file():
            raise UserError(f"text file {source!r} not found (packaged texts: {', '.join(PACKAGED)})")
        read_text_file(source)


def mix_counts(shares: list[float], n: int) -> list[int]:
    """Windows per source: ``share * n`` rounded by largest remainder (ties to the earlier source), summing to ``n``."""
    total = sum(shares)
    exact = [s / total * n for s in shares]
    counts = [math.floor(e) for e in exact]
    order = sorted(range(len(shares)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def mix_seed(seed: int, position: int) -> int:
    """The draw seed of the source at ``position`` of a calibration mix, derived from ``seed``."""
    digest = hashlib.sha256(f"llmpress-calib-mix:{seed}:{position}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def mixed_calib_windows(stream_of, items: list[tuple[str, float]], n: int, seqlen: int, seed: int, bos: int | None = None) -> torch.Tensor:
    """``n`` calibration windows from the sources of ``items`` (``(source, share)``, as
    :func:`parse_sources` gives them); ``stream_of(source)`` is the source's calibration token stream.

    One source: exactly :func:`calib_windows` with ``seed``. Several: each source's
    :func:`mix_counts` windows drawn with :func:`mix_seed` (one token stream alive at a
    time), concatenated in the order given, then shuffled with a generator seeded by ``seed``.
    """
    if len(items) == 1:
        return calib_windows(stream_of(items[0][0]), n, seqlen, seed, bos)
    parts = []
    for i, ((source, _), k) in enumerate(zip(items, mix_counts([s for _, s in items], n))):
        if k == 0:
            continue
        stream = stream_of(source)
        try:
            parts.append(calib_windows(stream, k, seqlen, mix_seed(seed, i), bos))
        except UserError as e:
            raise UserError(f"calibration source {source!r}: {e}") from None
        del stream
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return torch.cat(parts)[order]
