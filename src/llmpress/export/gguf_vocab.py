"""The tokenizer of a GGUF export, read from the checkpoint's ``tokenizer.json`` (data only: no
code from the checkpoint runs).

Two forms, told apart by the tokenizer, each the one llama.cpp runs exactly:

- byte-level BPE (Llama-family models such as SmolLM2): GGUF tokenizer model ``gpt2``, tokens,
  token types, merges and the pre-tokenizer name (:func:`pre_tokenizer`);
- SentencePiece-style BPE (Gemma, Llama 2: ``byte_fallback``, spaces written as U+2581 by a
  normalizer): GGUF tokenizer model ``llama`` with a score per token. llama.cpp's SentencePiece
  tokenizer merges the adjacent pair whose joined token has the highest score; Hugging Face's
  BPE merges the pair of lowest merge rank. The two agree when every split of a token into two
  tokens is a merge and the merges of one token are consecutive (what a SentencePiece model
  converted to tokenizer.json has: Gemma's 514,906 merges are), so each token's score is minus
  the rank of its first merge; a tokenizer.json without that structure is refused. Token
  types as the converter's: ``<0xNN>`` bytes BYTE, special added tokens CONTROL (Gemma's
  ``<unk>`` too: its tokenizer_config marks it special), other added tokens USER_DEFINED (score
  -1000), an unknown token that is not an added one UNKNOWN. Gemma's runs of spaces (``▁▁``...)
  are ordinary merged tokens here, as in the tokenizer.json llmpress runs (Gemma's
  tokenizer.model has them as user-defined pieces of real spaces).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import UserError

SPACE = "\u2581"


def _byte_level_gpt2(pre: dict) -> bool:
    return pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False)


def pre_tokenizer(tj: dict) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json, or a UserError. Two exact matches:
    the GPT-2 byte-level split (``gpt-2``), and digits split one by one before it (``smollm``:
    llama.cpp's regex list for it is ``\\p{N}`` then the GPT-2 expression, what
    SmolLM's ``Sequence[Digits(individual_digits), ByteLevel]`` does)."""
    pre = tj.get("pre_tokenizer") or {}
    if _byte_level_gpt2(pre):
        return "gpt-2"
    parts = (pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else []
    if len(parts) == 2 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits") and _byte_level_gpt2(parts[1]):
        return "smollm"
    raise UserError(
        f"tokenizer pre-tokenizer {json.dumps(pre)[:120]} has no known llama.cpp name in this export "
        "(supported: byte-level BPE with the GPT-2 split, optionally after single-digit splitting)"
    )


def _space_prefix(tj: dict) -> bool | None:
    """For a SentencePiece-style tokenizer.json: whether it prepends U+2581 (llama.cpp's
    ``add_space_prefix``); None when it is not one llama.cpp's SentencePiece tokenizer matches."""
    norm, pre = tj.get("normalizer") or {}, tj.get("pre_tokenizer")
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
    # a Split on " " after the normalizer has turned every space into U+2581 splits nothing
    if pre is not None and not (pre.get("type") == "Split" and pre.get("pattern") == {"String": " "}):
        return None
    if norm == replace:
        return False
    steps = norm.get("normalizers") or [] if norm.get("type") == "Sequence" else []
    if len(steps) == 2 and steps[0] == {"type": "Prepend", "prepend": SPACE} and steps[1] == replace:
        return True
    return None


def kind(tj: dict) -> str:
    """``gpt2`` (byte-level BPE) or ``llama`` (SentencePiece-style BPE), or a UserError."""
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(f"tokenizer model {model.get('type')!r}; the GGUF export supports BPE tokenizers (byte-level or SentencePiece-style)")
    if not model.get("byte_fallback"):
        pre_tokenizer(tj)  # a UserError unless a known byte-level split
        return "gpt2"
    odd = {k: model.get(k) for k in ("dropout", "continuing_subword_prefix", "end_of_word_suffix") if model.get(k)}
    if model.get("ignore_merges"):
        odd["ignore_merges"] = True
    if odd or _space_prefix(tj) is None:
        what = (
            json.dumps(odd)
            if odd
            else f"normalizer {json.dumps(tj.get('normalizer'))[:100]}, pre-tokenizer {json.dumps(tj.get('pre_tokenizer'))[:60]}"
        )
        raise UserError(f"SentencePiece-style tokenizer with {what}: llama.cpp's SentencePiece tokenizer would split text differently")
    return "llama"


def _merges(model: dict) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]


def spm_scores(vocab: dict[str, int], merges: list[tuple[str, str]], skip: set[int]) -> dict[int, float]:
    """token id -> score (minus the rank of the token's first merge) such that llama.cpp's
    highest-score-first merging is Hugging Face's lowest-rank-first; a UserError where no
    scores can do that. ``skip``: ids of added tokens (never merged)."""
    first: dict[str, int] = {}
    prev = None
    for rank, (a, b) in enumerate(merges):
        t = a + b
        if t not in vocab:
            raise UserError(f"tokenizer merge {a!r} {b!r} makes {t!r}, which is not in the vocabulary")
        if t != prev and t in first:
            raise UserError(
                f"the merges of token {t!r} are not consecutive (ranks {first[t]} and {rank}): no SentencePiece scores express this merge order"
            )
        first.setdefault(t, rank)
        prev = t
    pairs = set(merges)
    for t, i in vocab.items():
        if i in skip:
            continue
        for k in range(1, len(t)):
            if t[:k] in vocab and t[k:] in vocab and (t[:k], t[k:]) not in pairs:
                raise UserError(
                    f"token {t!r} splits into the tokens {t[:k]!r} {t[k:]!r}, which no merge joins: "
                    "llama.cpp's SentencePiece tokenizer would join them (no scores express this vocabulary)"
                )
    return {vocab[t]: -float(r) for t, r in first.items()}


def _spm_tokens(tj: dict, n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    import gguf

    T = gguf.TokenType
    model = tj["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    added = {int(d["id"]): d for d in tj.get("added_tokens") or []}
    for i, d in added.items():
        vocab.setdefault(d["content"], i)
    if max(vocab.values()) >= n_vocab:
        raise UserError(f"the tokenizer has token ids up to {max(vocab.values())}, beyond the model's vocab_size {n_vocab}")
    scores = spm_scores(vocab, _merges(model), set(added))
    unk = model.get("unk_token")
    tokens, score, types = [f"[PAD{i}]" for i in range(n_vocab)], [-1000.0] * n_vocab, [int(T.UNUSED)] * n_vocab
    for t, i in vocab.items():
        tokens[i], score[i] = t, scores.get(i, 0.0)
        if i in added:
            special = added[i].get("special")
            tokens[i] = t if special else t.replace(SPACE, " ")
            score[i], types[i] = -1000.0, int(T.CONTROL if special else T.USER_DEFINED)  # the converter: special wins over unknown
        else:
            types[i] = int(T.UNKNOWN if t == unk else T.BYTE if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t) else T.NORMAL)
    return tokens, score, types


def _bpe_tokens(src: Path, n_vocab: int) -> tuple[list[str], list[int]]:
    import gguf
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    vocab = tok.get_vocab()
    if len(vocab) > n_vocab or max(vocab.values()) >= n_vocab:
        raise UserError(f"{src}: the tokenizer has {len(vocab)} tokens, more than the model's vocab_size {n_vocab}")
    by_id = {i: t for t, i in vocab.items()}
    added = getattr(tok, "added_tokens_decoder", {}) or {}
    T = gguf.TokenType
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(T.NORMAL if i not in added else (T.CONTROL if added[i].special else T.USER_DEFINED))
    return tokens, types


def tokenizer_metadata(src: Path, n_vocab: int) -> dict:
    """``model`` (gpt2 or llama), tokens, token types, and the pre-tokenizer name (gpt2) or the
    scores and ``add_space_prefix`` (llama); merges and special ids come from gguf's SpecialVocab."""
    tj_path = src / "tokenizer.json"
    if not tj_path.exists():
        raise UserError(f"{src}: no tokenizer.json; the GGUF export needs the model's tokenizer")
    tj = json.loads(tj_path.read_text())
    try:
        model = kind(tj)
        if model == "gpt2":
            tokens, types = _bpe_tokens(src, n_vocab)
            return {"model": model, "pre": pre_tokenizer(tj), "tokens": tokens, "types": types}
        tokens, scores, types = _spm_tokens(tj, n_vocab)
    except UserError as e:
        raise UserError(f"{src}: {e}") from None
    return {"model": model, "pre": "default", "tokens": tokens, "types": types, "scores": scores, "space_prefix": _space_prefix(tj)}


def add_tokenizer(w, src: Path, tok: dict, n_vocab: int, *, add_bos: bool = False) -> None:
    """The tokenizer keys on a ``GGUFWriter`` (``tok`` from :func:`tokenizer_metadata`);
    ``add_bos``: the model needs a BOS first (Gemma), whatever the tokenizer files say."""
    import logging

    import gguf

    w.add_tokenizer_model(tok["model"])
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    if "scores" in tok:
        w.add_token_scores(tok["scores"])
    w.add_token_types(tok["types"])
    if tok.get("space_prefix") is not None:
        w.add_add_space_prefix(tok["space_prefix"])
    special = gguf.SpecialVocab(src, load_merges=tok["model"] == "gpt2", n_vocab=n_vocab)
    if tok["model"] == "gpt2" and not special.merges:  # the gguf package cannot write an empty array
        logging.getLogger(__name__).warning("%s: the tokenizer has no BPE merges; the GGUF file holds none (llama.cpp refuses such a tokenizer)", src)
        special.load_merges = False
    if add_bos:
        special.add_special_token["bos"] = True
    special.add_to_gguf(w, quiet=True)
