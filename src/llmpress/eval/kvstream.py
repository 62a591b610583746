"""Long-text evaluation with a KV-cache policy (llmpress.kvcache).

``stream_perplexity``: one token stream fed through the model ``chunk`` tokens at a time
(default 1: token by token, as a decoder serves it), each step with the cache left by the
steps before it, so an eviction policy is measured on text longer than its cache (and longer
than the model's training length). With the full cache and ``chunk`` = the stream length it
is the ordinary perplexity of one window.

``recompute_perplexity``: the seeds' "sliding window with re-computation" baseline: each
target predicted from the ``window`` tokens before it, recomputed from scratch (``stride``
targets per forward: the first of them sees ``window - stride + 1`` tokens; stride 1 is the
exact baseline).

``passkey``: a retrieval check that eviction can break: a five-digit key planted at
``depth`` of a long packaged text, asked for at the end; the key's digits are scored exactly
(greedy decoding must produce them).
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kvcache.build import KVPolicy, build_cache, cache_bytes, parse_policy, unobserve_attention


@torch.no_grad()
def stream_perplexity(model: nn.Module, ids: torch.Tensor, policy: KVPolicy | str, *, chunk: int = 1, progress=None, cache=None,
                      nbytes=cache_bytes, token_nll: bool = False) -> dict:  # fmt: skip
    """Perplexity of the stream ``ids`` [N] predicted token by token (``chunk`` at a time)
    through a cache with ``policy``; with the cache's bytes at the end and at their peak.
    ``cache``: a ready transformers cache instead of the policy's (a benchmark's peer cache,
    ``policy`` then only names it), with ``nbytes`` counting its bytes. ``token_nll``: also
    the negative log-likelihood of every target ``ids[1:]`` (``"token_nll"``, a float tensor
    [N - 1]), to see which tokens a policy costs."""
    policy = parse_policy(policy) if isinstance(policy, str) else policy
    ids = ids.reshape(-1)
    dev = next(model.parameters()).device
    cache = build_cache(model, policy) if cache is None else cache
    nll, n, peak, per = 0.0, 0, 0, []
    t0 = time.perf_counter()
    try:
        for start in range(0, ids.numel() - 1, chunk):
            x = ids[start : min(start + chunk, ids.numel() - 1)].to(dev)
            logits = model(input_ids=x[None], past_key_values=cache, use_cache=True).logits[0].float()
            target = ids[start + 1 : start + 1 + x.numel()].to(dev)
            losses = F.cross_entropy(logits, target, reduction="none")
            nll += float(losses.sum())
            n += target.numel()
            if token_nll:
                per.append(losses.cpu())
            peak = max(peak, nbytes(cache))
            if progress is not None:
                progress(n)
    finally:
        unobserve_attention(model)
    secs = time.perf_counter() - t0
    return {"policy": policy.describe(), "tokens": int(ids.numel()), "ppl": float(torch.exp(torch.tensor(nll / n))), "nll": nll,
            "seconds": round(secs, 3), "tok_per_s": round(n / secs, 2), "cache_bytes": nbytes(cache), "cache_bytes_peak": peak,
            **({"token_nll": torch.cat(per)} if token_nll else {})}  # fmt: skip


@torch.no_grad()
def recompute_perplexity(model: nn.Module, ids: torch.Tensor, window: int, *, stride: int = 1) -> dict:
    """Each target predicted from the ``window`` tokens before it, recomputed (module doc)."""
    ids = ids.reshape(-1)
    dev = next(model.parameters()).device
    nll, n = 0.0, 0
    t0 = time.perf_counter()
    for a in range(0, ids.numel() - 1, stride):
        b = min(a + stride, ids.numel() - 1)  # targets ids[a+1 .. b], predicted at positions a .. b-1
        lo = max(0, b - window)
        logits = model(input_ids=ids[lo:b][None].to(dev)).logits[0].float()[a - lo :]
        target = ids[a + 1 : b + 1].to(dev)
        nll += float(F.cross_entropy(logits, target, reduction="sum"))
        n += target.numel()
    secs = time.perf_counter() - t0
    return {"policy": f"recompute:{window},stride{stride}", "tokens": int(ids.numel()), "ppl": float(torch.exp(torch.tensor(nll / n))),
            "nll": nll, "seconds": round(secs, 3), "tok_per_s": round(n / secs, 2)}  # fmt: skip


PASSKEY_INTRO = " There is an important pass key hidden in this text. Remember it. The pass key is {key}. Remember it: {key} is the pass key. "
PASSKEY_QUESTION = " What is the pass key? The pass key is"


def passkey_prompt(tokenizer, filler: torch.Tensor, key: str, context: int, depth: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt ids [context], the key's ids): ``filler`` tokens with the key sentence at ``depth``
    of the text and the question at the end."""
    intro = torch.tensor(tokenizer(PASSKEY_INTRO.format(key=key), add_special_tokens=False)["input_ids"])
    ask = torch.tensor(tokenizer(PASSKEY_QUESTION, add_special_tokens=False)["input_ids"])
    answer = torch.tensor(tokenizer(" " + key, add_special_tokens=False)["input_ids"])
    room = context - intro.numel() - ask.numel()
    if room < 1 or filler.numel() < room:
        raise ValueError(f"passkey: context {context} too short for the planted sentence, or filler shorter than {room} tokens")
    at = int(depth * room)
    prompt = torch.cat([filler[:at], intro, filler[at:room], ask])
    return prompt, answer


def passkey_min_context(tokenizer, filler: int = 16) -> int:
    """Tokens of the planted sentence and the question, plus ``filler`` tokens of text."""
    n = len(tokenizer(PASSKEY_INTRO.format(key="71432"), add_special_tokens=False)["input_ids"])
    return n + len(tokenizer(PASSKEY_QUESTION, add_special_tokens=False)["input_ids"]) + filler


@torch.no_grad()
def passkey(model: nn.Module, tokenizer, filler: torch.Tensor, policy: KVPolicy | str, *, context: int, depth: float = 0.1,
            key: str = "71432", chunk: int = 64) -> dict:  # fmt: skip
    """Whether greedy decoding after the long prompt reproduces the planted key (exact), and
    the mean log-probability of its tokens; the prompt is fed ``chunk`` tokens at a time."""
    policy = parse_policy(policy) if isinstance(policy, str) else policy
    prompt, answer = passkey_prompt(tokenizer, filler, key, context, depth)
    dev = next(model.parameters()).device
    cache = build_cache(model, policy)
    try:
        logits = None
        for s in range(0, prompt.numel(), chunk):
            logits = model(input_ids=prompt[s : s + chunk][None].to(dev), past_key_values=cache, use_cache=True).logits[0, -1]
        got, lp = [], 0.0
        for tok in answer.tolist():
            logp = torch.log_softmax(logits.float(), dim=-1)
            lp += float(logp[tok])
            got.append(int(logits.argmax()))
            logits = model(input_ids=torch.tensor([[tok]], device=dev), past_key_values=cache, use_cache=True).logits[0, -1]
    finally:
        unobserve_attention(model)
    return {"policy": policy.describe(), "context": context, "depth": depth, "correct": got == answer.tolist(),
            "key_logprob": lp / answer.numel()}  # fmt: skip


def evaluate_kv(model_spec: str, policies: list[str], *, tokens: int = 4096, source: str = "wiki", chunk: int = 1,
                passkey_check: bool = False, device: str = "cpu", progress: bool = True) -> dict:  # fmt: skip
    """``llmpress eval MODEL --kv SPEC ...``: each policy on the same stream of ``tokens``
    tokens of ``source``'s test text (capped by the test shrink), and with ``passkey_check`` the
    planted-key retrieval at that context. Every policy is parsed before the model loads."""
    from .. import data as data_mod
    from .. import progress as progress_mod
    from .. import shrink
    from ..api import load_compressed
    from ..errors import UserError
    from ..kvcache.build import check_policy, text_config
    from ..progress import scope as progress_scope

    parsed = [parse_policy(p) for p in policies]
    data_mod.check_sources([source])
    with progress_scope(progress):
        model, tok = load_compressed(model_spec, device)
    n = shrink.cap_seqlen(tokens)
    for p in parsed:
        check_policy(p, text_config(model), context=n)
    stream = data_mod.token_stream(source, "test", tok)
    if stream.numel() < n + 1:
        raise UserError(f"--tokens {n}: the {source} test text has only {stream.numel()} tokens")
    ids = stream[:n].clone()
    from .memory import hwm_mb, reset_hwm, rss_mb, trim_malloc

    rows = []
    for p in parsed:
        trim_malloc()
        exact = reset_hwm()
        base = rss_mb()
        row = stream_perplexity(model, ids, p, chunk=chunk)
        if exact:  # this policy's own peak, and what it added to the model in memory
            row["peak_rss_mb"], row["rss_before_mb"] = round(hwm_mb(), 1), round(base, 1)
        if passkey_check:  # at the stream's length, or the shortest context that holds the planted sentence and the question
            row["passkey"] = passkey(model, tok, stream[n:], p, context=max(n, passkey_min_context(tok)))
        rows.append(row)
        if progress:
            found = (", passkey " + ("found" if row["passkey"]["correct"] else "lost")) if passkey_check else ""
            mib = row["cache_bytes_peak"] / 2**20
            progress_mod.note(f"kv {row['policy']}: ppl {row['ppl']:.3f}, cache {mib:.2f} MiB at peak, {row['tok_per_s']:.1f} tok/s{found}")
    return {"model": model_spec, "source": source, "tokens": n, "chunk": chunk, "policies": rows, "test_shrink": shrink.in_force()}
