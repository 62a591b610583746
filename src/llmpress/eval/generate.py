"""Greedy continuations of a few fixed prompts, before and after compression (issue 21 part 4):
what a user sees first when a compressed model goes wrong, cheap enough to be on by default."""

from __future__ import annotations

import torch

from .. import shrink

# Prose, a fact, code and a list: the kinds of text the packaged test sources cover.
PROMPTS = (
    "The capital of France is",
    "In 1905, Albert Einstein published",
    "def fibonacci(n):\n    ",
    "The three primary colours are",
)


@torch.no_grad()
def greedy_continuations(model, tokenizer, *, new_tokens: int, bos: int | None = None, prompts: tuple[str, ...] = PROMPTS) -> list[dict]:
    """``new_tokens`` greedy tokens after each prompt (fewer under the test shrink): prompt,
    continuation text and token ids. Run one prompt at a time, without padding."""
    n = shrink.cap_seqlen(new_tokens)
    dev = next(model.parameters()).device
    out = []
    for p in prompts:
        ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        x = torch.tensor([([bos] if bos is not None else []) + ids], device=dev)
        g = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=tokenizer.eos_token_id)  # fmt: skip
        new = g[0, x.shape[1] :].tolist()
        out.append({"prompt": p, "text": tokenizer.decode(new, skip_special_tokens=True), "ids": new})
    return out


def agreement(before: list[dict], after: list[dict]) -> dict:
    """How far the compressed model's continuations follow the baseline's: prompts continued
    identically, and the mean share of tokens before the first difference."""
    same, prefix = 0, []
    for b, a in zip(before, after):
        k = next((i for i, (x, y) in enumerate(zip(b["ids"], a["ids"])) if x != y), min(len(b["ids"]), len(a["ids"])))
        same += b["ids"] == a["ids"]
        prefix.append(k / max(len(b["ids"]), 1))
    return {"identical": same, "prompts": len(before), "common_prefix": sum(prefix) / max(len(prefix), 1)}
