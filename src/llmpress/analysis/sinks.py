"""Attention sinks: how much attention the first token takes, and why.

For every layer and head, on the analysis windows:

- the attention probability mass each query at position i >= ``min_query`` gives to key 0
  (and to keys 0..``first_k``-1), averaged over those queries and the windows; next to it
  the mass uniform causal attention would give (mean of 1/(i+1));
- the norms of q and k after RoPE and of v at token 0 against the median norm over the
  other tokens (RoPE rotates: the norms are the projections'), and how much the largest
  (head, dimension) of q, k, v exceeds the median one over every token (massive values in
  a few dimensions of q and k, the seeds say not in v);
- the hidden-state magnitude at token 0 entering each layer, with the massive activations
  the residual-stream statistics already flagged there (:mod:`.collect`, ``massive_findings``).

The probabilities are computed here from what the attention module itself computed: q/k/v
are the outputs of its projections (and of its per-head q/k norms, gemma3 and qwen3), RoPE is
the model module's own ``apply_rotary_pos_emb`` with the ``position_embeddings`` the
decoder layer hands to the attention (a forward pre-hook with its keyword arguments), then
grouped-query attention, the module's ``scaling``, the causal mask and a sliding window
where the layer has one, one chunk of queries at a time. Nothing relies on
``output_attentions`` (sdpa does not return it).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from .. import progress as progress_mod
from ..arch import ArchSpec, blocks, get_arch, get_module
from .collect import Collected, backbone

MIN_QUERY = 4  # queries at positions < MIN_QUERY are left out of the mass (they have few keys to choose from)
FIRST_K = 4  # "the first tokens": keys 0..FIRST_K-1
SINK_MASS = 0.5  # a layer is a sink layer when its heads give token 0 this much on average
QUERY_CHUNK = 256  # queries per softmax: memory B x H x QUERY_CHUNK x T, not x T x T


@dataclass(kw_only=True)
class LayerAttention:
    """One layer's attention on one batch: q and k after RoPE, v, and what turns them into probabilities."""

    q: torch.Tensor  # [B, H, T, D]
    k: torch.Tensor  # [B, KV, T, D]
    v: torch.Tensor  # [B, KV, T, D]
    scaling: float
    window: int | None = None  # sliding window of the layer

    def probs(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """[B, H, stop - start, T] float32: the probabilities of queries start..stop-1 (default: all)."""
        return attention_probs(self.q[:, :, start:stop], self.k, scaling=self.scaling, window=self.window, start=start)


def attention_module(block: nn.Module, spec: ArchSpec) -> nn.Module:
    """The attention module of a decoder block (the parent of its q projection)."""
    return get_module(block, spec.q.rsplit(".", 1)[0])


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _apply_rope(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def rope_function(attn: nn.Module) -> Callable:
    """The ``apply_rotary_pos_emb`` of the module that defines ``attn``'s class (the model's own RoPE)."""
    fn = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)
    return fn if callable(fn) else _apply_rope


def sliding_window(attn: nn.Module) -> int | None:
    """The layer's sliding window (qwen2/qwen3/gemma3 set it per layer, mistral in the config)."""
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(getattr(attn, "config", None), "sliding_window", None)


def attention_probs(q: torch.Tensor, k: torch.Tensor, *, scaling: float, window: int | None = None, start: int = 0) -> torch.Tensor:
    """softmax(q k^T * scaling) under the causal mask (and a sliding window), in float32.

    ``q`` [B, H, Tq, D] the queries at positions start..start+Tq-1, ``k`` [B, KV, T, D] every
    key, H a multiple of KV: query head h reads key head h // (H / KV), as transformers'
    ``repeat_kv`` does.
    """
    H, KV, T = q.shape[1], k.shape[1], k.shape[2]
    k = k.float().repeat_interleave(H // KV, dim=1)
    s = torch.matmul(q.float(), k.transpose(-1, -2)) * scaling
    i = torch.arange(start, start + q.shape[2], device=q.device)
    j = torch.arange(T, device=q.device)
    allowed = j[None, :] <= i[:, None]
    if window is not None:
        allowed &= j[None, :] > i[:, None] - window
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, dim=-1)


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[B, T, n*D] -> [B, n, T, D]; a tensor already [B, n, T, D] (a per-head norm's output) is kept."""
    if x.dim() == 4:
        return x
    B, T, _ = x.shape
    return x.view(B, T, -1, head_dim).transpose(1, 2)


def _arg(args, kwargs, name: str, index: int):
    return kwargs[name] if name in kwargs else (args[index] if len(args) > index else None)


def _layer_hooks(li: int, attn: nn.Module, spec: ArchSpec, on_layer) -> list:
    """Hooks on one attention module: gather q/k/v and the RoPE tables, call ``on_layer`` after it ran."""
    store: dict = {}
    handles = []

    def pre(mod, args, kwargs):
        store.clear()
        store["pos"] = _arg(args, kwargs, "position_embeddings", 1)

    def keep(name):
        def hook(mod, inp, out):
            store[name] = out[0] if isinstance(out, (tuple, list)) else out

        return hook

    handles.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
    for name, path in (("q", spec.q), ("k", spec.k), ("v", spec.v)):
        handles.append(get_module(attn, path.rsplit(".", 1)[1]).register_forward_hook(keep(name)))
    for name, path in zip(("q", "k"), spec.qk_norm):  # the per-head norm's output replaces the projection's
        handles.append(get_module(attn, path.rsplit(".", 1)[1]).register_forward_hook(keep(name)))
    D = int(attn.head_dim)
    scaling = float(getattr(attn, "scaling", D**-0.5))
    window = sliding_window(attn)
    rope = rope_function(attn)

    def post(mod, inp, out):
        if store.get("pos") is None:
            raise RuntimeError(f"layer {li}: the attention module got no position_embeddings")
        cos, sin = store["pos"]
        q, k = rope(_heads(store["q"], D), _heads(store["k"], D), cos, sin)
        v = _heads(store["v"], D)
        store.clear()
        on_layer(li, LayerAttention(q=q, k=k, v=v, scaling=scaling, window=window))

    handles.append(attn.register_forward_hook(post))
    return handles


@torch.no_grad()
def run_with_attention(model: nn.Module, windows: torch.Tensor, on_layer, batch_size: int = 4, progress: bool = False) -> None:
    """Run ``windows`` [n, T] through the model; ``on_layer(layer, LayerAttention)`` for every layer of every batch."""
    spec = get_arch(model)
    handles = []
    try:
        for li, blk in enumerate(blocks(model, spec)):
            handles += _layer_hooks(li, attention_module(blk, spec), spec, on_layer)
        device = next(model.parameters()).device
        body = backbone(model)
        for batch in progress_mod.track(windows.split(batch_size), "attention pass", "batch", on=progress):
            body(input_ids=batch.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()


def attention_of(model: nn.Module, input_ids: torch.Tensor) -> list[LayerAttention]:
    """Every layer's :class:`LayerAttention` for one batch ``input_ids`` [B, T] (tests, notebooks)."""
    out: dict[int, LayerAttention] = {}
    run_with_attention(model, input_ids, lambda li, la: out.__setitem__(li, la), batch_size=input_ids.shape[0])
    return [out[li] for li in sorted(out)]


# ------------------------------------------------------------------ statistics


def _norm_ratio_parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, n, T, D] -> per-head (token-0 norm, median norm of tokens 1..) summed over the batch,
    and the same for the whole vector (every head concatenated)."""
    x = x.float()
    per_head = x.norm(dim=-1).cpu()  # [B, n, T]
    whole = x.transpose(1, 2).flatten(2).norm(dim=-1).cpu()  # [B, T]
    return (
        per_head[:, :, 0].sum(0).double(),
        per_head[:, :, 1:].median(dim=-1).values.sum(0).double(),
        whole[:, 0].sum().double(),
        whole[:, 1:].median(dim=-1).values.sum().double(),
    )


class SinkStats:
    """Sums over the windows, per layer: attention mass per head, q/k/v norms at token 0 and elsewhere."""

    def __init__(self, n_layers: int, min_query: int = MIN_QUERY, first_k: int = FIRST_K):
        self.n_layers = n_layers
        self.min_query = min_query
        self.first_k = first_k
        self.mass0: dict[int, torch.Tensor] = {}  # layer -> [H] sum over sequences of the mean over queries
        self.massk: dict[int, torch.Tensor] = {}
        self.norms: dict[str, dict[int, list[torch.Tensor]]] = {"q": {}, "k": {}, "v": {}}
        self.dim_abs: dict[str, dict[int, torch.Tensor]] = {"q": {}, "k": {}, "v": {}}  # sum of |x| over tokens 1.. per [head, dim]
        self.seqs: dict[int, int] = {}
        self.seqlen = 0
        self.windows: dict[int, int | None] = {}

    def update(self, li: int, la: LayerAttention) -> None:
        B, H, T, _ = la.q.shape
        if T < 2:
            raise ValueError("attention sinks need windows of at least 2 tokens")
        self.seqlen = T
        mq = min(self.min_query, T - 1)
        m0 = torch.zeros(H, dtype=torch.float64)
        mk = torch.zeros(H, dtype=torch.float64)
        for a in range(mq, T, QUERY_CHUNK):  # sums over the batch and the queries >= mq
            p = la.probs(a, min(a + QUERY_CHUNK, T))  # [B, H, chunk, T]
            m0 += p[..., 0].sum((0, 2)).double().cpu()
            mk += p[..., : self.first_k].sum(-1).sum((0, 2)).double().cpu()
        self.mass0[li] = self.mass0.get(li, 0) + m0 / (T - mq)
        self.massk[li] = self.massk.get(li, 0) + mk / (T - mq)
        for name, x in (("q", la.q), ("k", la.k), ("v", la.v)):
            parts = _norm_ratio_parts(x)
            old = self.norms[name].get(li)
            self.norms[name][li] = list(parts) if old is None else [a + b for a, b in zip(old, parts)]
            self.dim_abs[name][li] = self.dim_abs[name].get(li, 0) + x[:, :, 1:, :].float().abs().sum((0, 2)).double().cpu()
        self.seqs[li] = self.seqs.get(li, 0) + B

    def uniform(self) -> tuple[float, float]:
        """The mass uniform causal attention gives key 0 and keys 0..first_k-1, over the same queries."""
        T = self.seqlen
        mq = min(self.min_query, T - 1)
        pos = torch.arange(mq, T, dtype=torch.float64) + 1  # keys visible to query i: i + 1
        return float((1 / pos).mean()), float((pos.clamp(max=self.first_k) / pos).mean())


@torch.no_grad()
def sink_stats(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = False) -> SinkStats:
    """Accumulate :class:`SinkStats` over ``windows`` [n, T]."""
    spec = get_arch(model)
    st = SinkStats(len(blocks(model, spec)))
    for li, blk in enumerate(blocks(model, spec)):
        st.windows[li] = sliding_window(attention_module(blk, spec))
    run_with_attention(model, windows, st.update, batch_size=batch_size, progress=progress)
    return st


# ------------------------------------------------------------------ findings


def _r(v: float, nd: int = 4):
    return float(f"{v:.{nd}g}")


def _tok0_entering(col: Collected, li: int) -> tuple[float | None, float | None]:
    """Mean over sequences of max |h| over channels at token 0 of the residual entering layer ``li``,
    and the median |h| there (the ``attn_norm_in`` site, else the previous block's output)."""
    site, layer = ("attn_norm_in", li) if li in col.site("attn_norm_in") else ("resid", li - 1)
    s = col.site(site).get(layer)
    if s is None or not s.n_seqs:
        return None, None
    return float(s.pos_absmax_sum[0]) / s.n_seqs, s.median_abs


def _massive_tok0(mf: dict) -> dict[int, dict]:
    """layer -> the largest massive activation at token 0 of the residual after that block (from
    ``massive_findings``: flagged in at least half the sequences)."""
    out = {}
    for row in mf.get("per_layer", []):
        hit = next((e for e in row["massive"] if e["pos"] == 0), None)
        if hit is not None:
            out[row["layer"]] = {"channel": hit["channel"], "value": hit["mean"]}
    return out


def _ratio(a: float, b: float) -> float | None:
    return _r(a / b) if b else None


def _layer_row(st: SinkStats, col: Collected, massive: dict[int, dict], li: int) -> dict:
    n = st.seqs[li]
    m0 = (st.mass0[li] / n).float()
    mk = (st.massk[li] / n).float()
    row = {
        "layer": li,
        "mass0_mean": _r(float(m0.mean())),
        "mass0_max": _r(float(m0.max())),
        "mass0_max_head": int(m0.argmax()),
        "mass0_min": _r(float(m0.min())),
        "first_k_mean": _r(float(mk.mean())),
        "sliding_window": st.windows.get(li),
    }
    for name in ("q", "k", "v"):
        _, _, w0, wmed = st.norms[name][li]
        row[f"{name}_norm0"] = _r(float(w0) / n)
        row[f"{name}_norm_median"] = _r(float(wmed) / n)
        row[f"{name}_ratio"] = _ratio(float(w0), float(wmed))
        d = st.dim_abs[name][li]  # [heads, D]: massive values concentrated in a few dimensions (of every token)
        row[f"{name}_dim_peak"] = _ratio(float(d.max()), float(d.flatten().median()))
        row[f"{name}_dim_peak_at"] = list(divmod(int(d.argmax()), d.shape[1]))  # [head, dim]
    h0, med = _tok0_entering(col, li)
    row["h0_in"] = _r(h0) if h0 is not None else None
    row["h0_in_over_median"] = _ratio(h0, med) if h0 is not None and med else None
    row["massive_in"] = massive.get(li - 1)  # flagged at token 0 of the residual entering this layer
    return row


def _corr(h0: list, mass: list) -> float | None:
    """Pearson correlation over layers of log10 |h| entering (token 0) and the mass on token 0."""
    pts = [(math.log10(h), m) for h, m in zip(h0, mass) if h is not None and h > 0]
    if len(pts) < 3:
        return None
    x, y = torch.tensor(pts, dtype=torch.float64).T
    x, y = x - x.mean(), y - y.mean()
    den = float(x.norm() * y.norm())
    return _r(float((x * y).sum()) / den) if den else None


def sink_findings(st: SinkStats, col: Collected, mf: dict) -> dict:
    """The ``attention_sinks`` summary: per layer and head, and the link to the massive activations
    ``mf`` (``pipeline.massive_findings``) flags at token 0."""
    layers = sorted(st.seqs)
    massive = _massive_tok0(mf)
    rows = [_layer_row(st, col, massive, li) for li in layers]
    u0, uk = st.uniform()
    sink_layers = [r["layer"] for r in rows if r["mass0_mean"] >= SINK_MASS]
    onset = sink_layers[0] if sink_layers else None
    top = sorted(rows, key=lambda r: -r["mass0_mean"])[:3]
    flagged = sorted(massive)
    pair = next((p for p in mf.get("pairs", []) if p["pos"] == 0), None)
    link = {
        "onset_layer": onset,
        "first_massive_layer_tok0": flagged[0] if flagged else None,
        "massive_pair_tok0": None if pair is None else {k: pair[k] for k in ("channel", "layers", "max_abs", "from_layer_half_peak")},
        "entering_onset": None if onset is None else {"h0": rows[layers.index(onset)]["h0_in"], "massive": massive.get(onset - 1)},
        "massive_before_onset": None if onset is None or not flagged else flagged[0] < onset,
        "corr_log_h0_mass0": _corr([r["h0_in"] for r in rows], [r["mass0_mean"] for r in rows]),
    }
    ratios = {}
    for name in ("q", "k", "v"):
        ratios[name] = [[_r(float(a / b)) if float(b) else None for a, b in zip(st.norms[name][li][0], st.norms[name][li][1])] for li in layers]
    return {
        "min_query": min(st.min_query, st.seqlen - 1),
        "first_k": st.first_k,
        "sink_mass": SINK_MASS,
        "uniform_mass0": _r(u0),
        "uniform_first_k": _r(uk),
        "mass0_mean_all": _r(sum(r["mass0_mean"] for r in rows) / max(len(rows), 1)),
        "dim_peak_mean": {n: _r(sum(r[f"{n}_dim_peak"] or 0 for r in rows) / max(len(rows), 1)) for n in ("q", "k", "v")},
        "sink_layers": sink_layers,
        "top_layers": [{"layer": r["layer"], "mass0_mean": r["mass0_mean"]} for r in top],
        "link": link,
        "per_layer": rows,
        "mass0": [[_r(float(v)) for v in (st.mass0[li] / st.seqs[li])] for li in layers],  # [layer][head]
        "first_k_mass": [[_r(float(v)) for v in (st.massk[li] / st.seqs[li])] for li in layers],
        "head_norm_ratios": ratios,  # q: [layer][head], k and v: [layer][kv head]
    }


def analyze_sinks(model: nn.Module, windows: torch.Tensor, col: Collected, mf: dict, batch_size: int = 4, progress: bool = False) -> dict:
    """One attention pass over ``windows`` and the ``attention_sinks`` summary."""
    return sink_findings(sink_stats(model, windows, batch_size, progress), col, mf)
