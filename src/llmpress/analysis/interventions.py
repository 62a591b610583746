"""What happens when outliers are removed: perplexity (and a prompt's top-1) under interventions.

- massive activations set to zero versus set to their mean (Sun et al.: zeroing is
  catastrophic, the mean harmless: they act as fixed biases), at the first layer where
  they appear or at every layer from there on;
- super weights set to zero (Yu et al.: one weight can wreck the model);
- the top-k LLM.int8() outlier feature dimensions zeroed at the inputs of q/k/v and
  gate/up, versus k random dimensions (Dettmers et al.).

Each intervention is a context manager over forward hooks or a temporary weight edit;
the model is left as it was.
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch
import torch.nn as nn

from ..arch import blocks, get_arch, get_module
from ..eval.perplexity import perplexity
from . import detect
from .collect import Collected, block_hooks, norm_roles, single_thread
from .superweight import prompt_ids, weights_zeroed

log = logging.getLogger(__name__)

DEFAULT_TOP1_PROMPT = "Summer is hot. Winter is"


def massive_layers(col: Collected, min_frac: float = 0.5) -> list[int]:
    """Layers whose residual stream holds massive activations in >= min_frac of the sequences."""
    out = []
    for li, st in sorted(col.site("resid").items()):
        if any(e["frac_seqs"] >= min_frac for e in st.massive_entries()):
            out.append(li)
    return out


def _massive_fn(mode: str, means: dict[int, float], th: detect.Thresholds, counter: dict):
    def fn(h: torch.Tensor) -> torch.Tensor:
        with single_thread():
            return replace(h)

    def replace(h: torch.Tensor) -> torch.Tensor:
        mask = detect.massive_mask(h, th.massive_eta, th.massive_gamma)
        n = int(mask.sum())
        if n == 0:
            return h
        counter["changed"] = counter.get("changed", 0) + n
        if mode == "zero":
            return h.masked_fill(mask, 0.0)
        target = torch.full((h.shape[-1],), float("nan"), dtype=h.dtype, device=h.device)
        for c, v in means.items():
            target[c] = v
        target = target.expand_as(h)
        ok = mask & ~torch.isnan(target)
        counter["unmatched"] = counter.get("unmatched", 0) + int((mask & ~ok).sum())
        return torch.where(ok, target, h)

    return fn


@contextlib.contextmanager
def massive_replaced(model: nn.Module, col: Collected, mode: str, layers: list[int], counter: dict | None = None):
    """Set the massive activations of the residual stream at ``layers`` to zero or to their mean.

    The mask is recomputed on every sequence with the eta/gamma rule; 'mean' replaces
    an element by the mean signed value that channel's massive activations had at that
    layer in the analysis pass.
    """
    if mode not in ("zero", "mean"):
        raise ValueError(f"mode must be 'zero' or 'mean', got {mode!r}")
    counter = {} if counter is None else counter
    resid = col.site("resid")
    fns = {li: _massive_fn(mode, resid[li].channel_massive_mean() if li in resid else {}, col.thresholds, counter) for li in layers}
    with block_hooks(model, fns):
        yield counter


@contextlib.contextmanager
def features_zeroed(model: nn.Module, dims: list[int]):
    """Zero hidden dimensions ``dims`` at the outputs of the norms feeding q/k/v and gate/up."""
    spec = get_arch(model)
    roles = norm_roles(spec)
    idx = torch.tensor(sorted(set(int(d) for d in dims)), dtype=torch.long)
    handles = []

    def hook(m, inp, out):
        out = out.clone()
        out[..., idx.to(out.device)] = 0
        return out

    try:
        if idx.numel():
            for blk in blocks(model, spec):
                for path in roles.values():
                    handles.append(get_module(blk, path).register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def next_token(model: nn.Module, tokenizer, ids: torch.Tensor, reference: int | None = None) -> dict:
    """Top-1 next token of ``ids`` [1, n], its probability, and the probability of ``reference``."""
    logits = model(input_ids=ids.to(next(model.parameters()).device), use_cache=False).logits[0, -1].float()
    p = torch.softmax(logits, -1)
    top = int(p.argmax())
    out = {"top1_id": top, "top1": tokenizer.decode([top]), "top1_prob": float(p[top])}
    if reference is not None:
        out["ref_prob"] = float(p[reference])
    return out


def _ratio(ppl: float, ref: float) -> float:
    return ppl / ref if math.isfinite(ppl) else float("inf")


def _source_slices(sources: dict[str, int] | None, n: int) -> dict[str, tuple[int, int]]:
    """{text: (first, end)} over the concatenated windows; {} for one text (or none given)."""
    if not sources or len(sources) < 2:
        return {}
    if sum(sources.values()) != n:
        raise ValueError(f"the per-text window counts {sources} do not add up to the {n} windows")
    out, a = {}, 0
    for s, k in sources.items():
        out[s] = (a, a + k)
        a += k
    return out


def _pooled(by: dict[str, float], counts: dict[str, int]) -> float:
    """The perplexity over all windows from the per-text ones (windows of equal length)."""
    n = sum(counts.values())
    return math.exp(sum(counts[s] * math.log(v) for s, v in by.items()) / n) if all(math.isfinite(v) for v in by.values()) else float("inf")


class _Measure:
    """Scores the model as it is now (perplexity, per text when there are several, and the
    prompt's top-1) and appends the row; the first row is the reference of the ratios."""

    def __init__(self, model, tokenizer, windows, ids, batch_size, progress, sources):
        self.model, self.tokenizer, self.windows, self.ids = model, tokenizer, windows, ids
        self.batch_size, self.progress = batch_size, progress
        self.slices = _source_slices(sources, windows.shape[0])
        self.rows: list[dict] = []

    def _ppl(self, name: str) -> tuple[float, dict]:
        if not self.slices:
            return perplexity(self.model, self.windows, self.batch_size, self.progress, name), {}
        by = {s: perplexity(self.model, self.windows[a:b], self.batch_size, self.progress, f"{name} [{s}]") for s, (a, b) in self.slices.items()}
        return _pooled(by, {s: b - a for s, (a, b) in self.slices.items()}), {"ppl_by_source": by}

    def __call__(self, name: str, desc: str, **extra) -> dict:
        ppl, per = self._ppl(name)
        base = self.rows[0] if self.rows else None
        nt = next_token(self.model, self.tokenizer, self.ids, base["top1_id"] if base else None)
        row = {"name": name, "description": desc, "ppl": ppl, **nt, **per, **extra}
        row["ppl_ratio"] = _ratio(ppl, base["ppl"]) if base else 1.0
        if self.slices:
            ref = base["ppl_by_source"] if base else per["ppl_by_source"]
            row["ratio_by_source"] = {s: _ratio(v, ref[s]) for s, v in per["ppl_by_source"].items()}
        self.rows.append(row)
        log.info("%-28s ppl %.3f  top-1 %r p=%.3f", name, ppl, nt["top1"], nt["top1_prob"])
        return row


def _massive_rows(model: nn.Module, col: Collected, mlayers: list[int], measure: _Measure) -> None:
    """Massive activations set to zero and to their mean, where they first appear and from there on."""
    first = mlayers[:1]
    every = list(range(mlayers[0], col.n_layers))
    for layers, name, where in (
        (first, f"@L{first[0]}", f"after layer {first[0]} (where they first appear)"),
        (every, f"@L{every[0]}+", f"after every layer from {every[0]} on"),
    ):
        for mode in ("zero", "mean"):
            with massive_replaced(model, col, mode, layers) as cnt:
                measure(f"massive->{mode} {name}", f"massive activations set to {mode} in the residual stream {where}", changed=cnt)


def run_interventions(
    model: nn.Module,
    tokenizer,
    windows: torch.Tensor,
    col: Collected,
    super_weights: list[dict],
    features: list[int],
    k: int | None = None,
    random_seeds: int = 2,
    batch_size: int = 4,
    prompt: str = DEFAULT_TOP1_PROMPT,
    progress: bool = False,
    sources: dict[str, int] | None = None,
) -> dict:
    """Perplexity on ``windows`` and the prompt's top-1 under every intervention.

    ``sources`` ({text: number of windows}, in the order the windows are concatenated): with
    more than one text each row also gets the perplexity and its ratio per text
    (``ppl_by_source``, ``ratio_by_source``); ``ppl`` stays the one over all windows."""
    measure = _Measure(model, tokenizer, windows, prompt_ids(tokenizer, model, prompt), batch_size, progress, sources)
    measure("none", "original model")
    mlayers = massive_layers(col)
    info: dict = {"massive_layers": mlayers, "super_weights": super_weights, "prompt": prompt}
    if mlayers:
        _massive_rows(model, col, mlayers, measure)
    if super_weights:
        with weights_zeroed(model, super_weights):
            coords = ", ".join(f"L{s['layer']}[{s['row']},{s['col']}]" for s in super_weights)
            measure("super weights -> 0", f"{len(super_weights)} super weight(s) set to zero: {coords}")
        if len(super_weights) > 1:
            with weights_zeroed(model, super_weights[:1]):
                s = super_weights[0]
                measure("first super weight -> 0", f"only L{s['layer']}[{s['row']},{s['col']}] set to zero")
    ranking = features
    if k is None:
        k = max(1, min(len(ranking), 8))
    top = ranking[:k]
    info.update({"k": k, "feature_dims": top})
    if top:
        with features_zeroed(model, top):
            measure(f"top-{len(top)} outlier dims -> 0", f"hidden dims {top} zeroed at the q/k/v and gate/up inputs of every layer")
        g = torch.Generator().manual_seed(0)
        pool = torch.tensor([d for d in range(col.hidden) if d not in set(ranking[: max(k, 32)])])
        for s in range(random_seeds):
            dims = pool[torch.randperm(pool.numel(), generator=g)[: len(top)]].tolist()
            with features_zeroed(model, dims):
                measure(f"random-{len(top)} dims -> 0 (#{s})", f"random hidden dims {sorted(dims)} zeroed at the same places", dims=sorted(dims))
    return {"rows": measure.rows, **info}
