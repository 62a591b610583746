"""Where the numbers come from: forward hooks at fixed points of every decoder block.

Sites, per block (names from the architecture table, so any supported family works):

- ``resid``          the residual stream after the block (the block's output)
- ``attn_norm_in``   the input of the norm that feeds q/k/v (the residual stream entering)
- ``attn_norm_std``  that input after the norm's standardization (x / rms(x)), before its scale
- ``qkv_in``         after the norm's scale: the input of q/k/v
- ``o_in``           the input of the attention output projection
- ``mlp_norm_in``, ``mlp_norm_std``, ``gate_up_in``: the same three for the MLP's norm
- ``down_in``, ``down_out``: input and output of the MLP down projection

Memory stays bounded: each (site, layer) keeps per-channel and per-token-position
summaries (:class:`SiteStats`), a log-magnitude histogram, per-sequence maxima and
medians, the few largest elements and the (position, channel) pairs flagged as massive.
Full tensors are captured only by :func:`capture`, for the layers chosen for 3D plots,
on one sequence.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .. import progress as progress_mod
from ..arch import ArchSpec, blocks, get_arch, get_module
from . import detect
from .detect import Thresholds

log = logging.getLogger(__name__)

SITES: dict[str, str] = {
    "resid": "residual stream after the block",
    "attn_norm_in": "attention norm input (residual entering the block)",
    "attn_norm_std": "attention norm, after standardization x/rms(x)",
    "qkv_in": "attention norm output = q/k/v input (after the norm's scale)",
    "o_in": "o_proj input (attention output)",
    "mlp_norm_in": "MLP norm input (residual after attention)",
    "mlp_norm_std": "MLP norm, after standardization x/rms(x)",
    "gate_up_in": "MLP norm output = gate/up input (after the norm's scale)",
    "down_in": "down_proj input (gated MLP hidden)",
    "down_out": "down_proj output",
}
# sites whose channels are the model's hidden dimension (LLM.int8() features are tracked here)
INT8_SITES = ("qkv_in", "gate_up_in")
HIST_RANGE = (-4.0, 6.0)  # log10 |x|
HIST_BINS = 100
TOPK = 8
MAX_MASSIVE_KEYS = 4096


def backbone(model: nn.Module) -> nn.Module:
    """The decoder without its output head (saves the lm_head matmul and the logits)."""
    prefix = getattr(model, "base_model_prefix", "")
    inner = getattr(model, prefix, None) if prefix else None
    return inner if isinstance(inner, nn.Module) else model


def norm_scale(norm: nn.Module, kind: str) -> torch.Tensor:
    """The per-channel scale gamma a norm applies after standardizing (1 + w for gemma)."""
    w = norm.weight.detach().float()
    return 1.0 + w if kind == "rms_1p" else w


def norm_eps(norm: nn.Module) -> float:
    for attr in ("variance_epsilon", "eps"):
        v = getattr(norm, attr, None)
        if isinstance(v, (int, float)):
            return float(v)
    return 1e-6


def norm_roles(spec: ArchSpec) -> dict[str, str]:
    """'attn' / 'mlp' -> the norm (block-relative path) feeding that sub-layer."""
    roles = {}
    for nf in spec.norm_feeds:
        if spec.q in nf.linears:
            roles["attn"] = nf.norm
        elif spec.up in nf.linears or (spec.gate and spec.gate in nf.linears):
            roles["mlp"] = nf.norm
    return roles


def _tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class SiteStats:
    """Bounded summaries of one site at one layer over every sequence seen."""

    def __init__(self, channels: int, seqlen: int, th: Thresholds):
        C, T = channels, seqlen
        self.th = th
        self.channels = C
        self.n = 0  # tokens seen
        self.ch_absmax = torch.zeros(C)
        self.ch_arg_pos = torch.zeros(C, dtype=torch.long)  # token position of the channel max
        self.ch_s1 = torch.zeros(C, dtype=torch.float64)
        self.ch_s2 = torch.zeros(C, dtype=torch.float64)
        self.ch_abs = torch.zeros(C, dtype=torch.float64)
        self.ch_int8_hits = torch.zeros(C, dtype=torch.long)  # positions with |x| >= int8 magnitude
        self.ch_outlier_seqs = torch.zeros(C, dtype=torch.long)  # sequences where channel-wise outlier
        self.s3 = 0.0
        self.s4 = 0.0
        self.pos_absmax = torch.zeros(T)  # max over sequences and channels, per position
        self.pos_absmax_sum = torch.zeros(T, dtype=torch.float64)  # sum over sequences
        self.hist = torch.zeros(HIST_BINS, dtype=torch.float64)
        self.zeros = 0
        self.seq_max: list[float] = []
        self.seq_median: list[float] = []
        self.seq_meanabs: list[float] = []
        self.seq_topk: list[list[float]] = []
        self.top: list[tuple[float, int, int, int]] = []  # (value, sequence, position, channel)
        self.massive: dict[tuple[int, int], list[float]] = {}  # (pos, ch) -> [sequences, sum, max|.|]
        self.sun: dict[tuple[int, int], list[float]] = {}
        self.massive_truncated = False

    # -- accumulate
    @torch.no_grad()
    def update(self, x: torch.Tensor, seq_offset: int) -> None:
        x = x.detach().float()
        if x.dim() == 2:
            x = x[None]
        B, T, C = x.shape
        th = self.th
        a = x.abs()
        flat = a.reshape(B * T, C)
        vmax, imax = flat.max(0)
        better = vmax > self.ch_absmax
        self.ch_absmax = torch.where(better, vmax, self.ch_absmax)
        self.ch_arg_pos = torch.where(better, imax % T, self.ch_arg_pos)
        # power sums in float32 per batch (fine for ~1e5 magnitudes), accumulated in float64
        xs = x.reshape(B * T, C)
        x2 = xs * xs
        wsum1 = x.sum(1)  # [B, C] per sequence
        wsum2 = x2.reshape(B, T, C).sum(1)
        self.ch_s1 += wsum1.sum(0).double()
        self.ch_s2 += wsum2.sum(0).double()
        self.ch_abs += flat.sum(0).double()
        self.s3 += float((x2 * xs).sum(dtype=torch.float64))
        self.s4 += float((x2 * x2).sum(dtype=torch.float64))
        self.ch_int8_hits += (flat >= th.int8_magnitude).sum(0)
        self.n += B * T
        if T > self.pos_absmax.numel():  # longer sequences than announced
            grow = T - self.pos_absmax.numel()
            self.pos_absmax = torch.cat([self.pos_absmax, torch.zeros(grow)])
            self.pos_absmax_sum = torch.cat([self.pos_absmax_sum, torch.zeros(grow, dtype=torch.float64)])
        pmax = a.amax(dim=2)  # [B, T]
        self.pos_absmax[:T] = torch.maximum(self.pos_absmax[:T], pmax.max(0).values)
        self.pos_absmax_sum[:T] += pmax.double().sum(0)
        lo, hi = HIST_RANGE
        nzero = int((flat == 0).sum())
        self.zeros += nzero
        h = torch.histc(torch.log10(flat.clamp_min(10**lo)).clamp_max(hi - 1e-6), HIST_BINS, lo, hi).double()
        h[0] -= nzero
        self.hist += h
        seq = a.reshape(B, T * C)
        smax = seq.max(1).values
        smed = seq.median(1).values
        smean = seq.mean(1)
        k = min(TOPK, T * C)
        tv, ti = seq.topk(k, dim=1)
        for b in range(B):
            self.seq_max.append(float(smax[b]))
            self.seq_median.append(float(smed[b]))
            self.seq_meanabs.append(float(smean[b]))
            self.seq_topk.append([float(v) for v in tv[b]])
            for i in ti[b].tolist():
                p, c = divmod(i, C)
                self.top.append((float(x[b, p, c]), seq_offset + b, p, c))
        self.top.sort(key=lambda r: -abs(r[0]))
        del self.top[TOPK:]
        # massive activations (eta/gamma rule and Sun et al. rule), per sequence
        mm = (a > th.massive_eta * smean[:, None, None]) & (a > th.massive_gamma)
        self._add(self.massive, mm, x)
        sm = (a > th.sun_min) & (a >= th.sun_ratio * smed[:, None, None])
        self._add(self.sun, sm, x)
        # channel-wise outliers, per sequence (detect.channel_outliers, from the sums above)
        mean_i = wsum1 / T
        std_i = (wsum2 / T - mean_i * mean_i).clamp_min(0).sqrt()
        mean_all = wsum1.sum(1) / (T * C)
        std_all = (wsum2.sum(1) / (T * C) - mean_all * mean_all).clamp_min(0).sqrt()
        co = (mean_i.abs() > th.channel_eta * std_all[:, None] + smean[:, None]) & (std_i < th.channel_beta)
        self.ch_outlier_seqs += co.sum(0)

    def _add(self, table: dict, mask: torch.Tensor, x: torch.Tensor) -> None:
        if not bool(mask.any()):
            return
        idx = mask.nonzero()
        vals = x[mask]
        per_seq = set()
        for (b, p, c), v in zip(idx.tolist(), vals.tolist()):
            key = (p, c)
            rec = table.get(key)
            if rec is None:
                if len(table) >= MAX_MASSIVE_KEYS:
                    self.massive_truncated = True
                    continue
                rec = table[key] = [0, 0.0, 0.0, 0]  # sequences, sum, max|.|, hits
            if (b, key) not in per_seq:
                per_seq.add((b, key))
                rec[0] += 1
            rec[1] += v
            rec[2] = max(rec[2], abs(v))
            rec[3] += 1

    # -- read
    @property
    def n_seqs(self) -> int:
        return len(self.seq_max)

    @property
    def absmax(self) -> float:
        return float(self.ch_absmax.max()) if self.n else 0.0

    @property
    def median_abs(self) -> float:
        """Mean over sequences of the per-sequence median |x|."""
        return sum(self.seq_median) / len(self.seq_median) if self.seq_median else 0.0

    def channel_mean(self) -> torch.Tensor:
        return (self.ch_s1 / max(self.n, 1)).float()

    def channel_std(self) -> torch.Tensor:
        m = self.ch_s1 / max(self.n, 1)
        return (self.ch_s2 / max(self.n, 1) - m * m).clamp_min(0).sqrt().float()

    def channel_meanabs(self) -> torch.Tensor:
        return (self.ch_abs / max(self.n, 1)).float()

    def moments(self) -> tuple:
        return (self.n * self.channels, float(self.ch_s1.sum()), float(self.ch_s2.sum()), self.s3, self.s4)

    def difficulty(self) -> dict:
        return detect.difficulty_from_stats(self.ch_absmax, self.median_abs, self.moments())

    def massive_entries(self, table: str = "massive") -> list[dict]:
        t = self.massive if table == "massive" else self.sun
        out = [
            {"pos": p, "channel": c, "seqs": int(r[0]), "frac_seqs": r[0] / max(self.n_seqs, 1), "mean": r[1] / r[3], "max_abs": r[2]}
            for (p, c), r in t.items()
        ]
        return sorted(out, key=lambda e: -e["max_abs"])

    def channel_massive_mean(self) -> dict[int, float]:
        """Mean signed value of the massive activations of each channel (for the 'mean' intervention)."""
        acc: dict[int, list[float]] = {}
        for (_, c), r in self.massive.items():
            s = acc.setdefault(c, [0.0, 0])
            s[0] += r[1]
            s[1] += r[3]
        return {c: s / n for c, (s, n) in acc.items()}


@dataclass(kw_only=True)
class Collected:
    """Everything the hooks gathered: ``stats[site][layer]``, LLM.int8() trackers, norms."""

    spec: ArchSpec
    n_layers: int
    hidden: int
    n_seqs: int
    seqlen: int
    stats: dict[str, dict[int, SiteStats]]
    int8: dict[str, detect.Int8FeatureTracker]
    int8_all: detect.Int8FeatureTracker
    norm_gamma: dict[str, list[torch.Tensor]]  # role -> per layer gamma
    thresholds: Thresholds
    first_tokens: list[int] = field(default_factory=list)

    def site(self, name: str) -> dict[int, SiteStats]:
        return self.stats.get(name, {})


@contextlib.contextmanager
def single_thread():
    """Run the statistics single-threaded: these are many small element-wise ops, and on a
    busy machine a 2-thread pool waits for its second thread at every op, far longer than
    the op itself takes on one thread. The model's own matmuls keep every thread."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class _Hooks:
    def __init__(self):
        self.handles = []

    def add(self, h):
        self.handles.append(h)

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _install(model, spec: ArchSpec, sink, sites: set[str]) -> _Hooks:
    """Hooks calling ``sink(site, layer, tensor)`` for every wanted site."""
    hooks = _Hooks()
    roles = norm_roles(spec)
    for li, blk in enumerate(blocks(model, spec)):
        if "resid" in sites:
            hooks.add(blk.register_forward_hook(lambda m, i, o, li=li: sink("resid", li, _tensor(o))))
        for role, path in roles.items():
            names = (f"{role}_norm_in", f"{role}_norm_std", "qkv_in" if role == "attn" else "gate_up_in")
            if not sites.intersection(names):
                continue
            norm = get_module(blk, path)
            eps = norm_eps(norm)

            def hook(m, inp, out, li=li, names=names, eps=eps):
                x = inp[0]
                if names[0] in sites:
                    sink(names[0], li, x)
                if names[1] in sites:
                    xf = x.float()
                    sink(names[1], li, xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))
                if names[2] in sites:
                    sink(names[2], li, _tensor(out))

            hooks.add(norm.register_forward_hook(hook))
        if "o_in" in sites:
            hooks.add(get_module(blk, spec.o).register_forward_pre_hook(lambda m, i, li=li: sink("o_in", li, i[0])))
        if sites.intersection(("down_in", "down_out")):

            def dhook(m, inp, out, li=li):
                if "down_in" in sites:
                    sink("down_in", li, inp[0])
                if "down_out" in sites:
                    sink("down_out", li, out)

            hooks.add(get_module(blk, spec.down).register_forward_hook(dhook))
    return hooks


@torch.no_grad()
def collect(
    model: nn.Module,
    windows: torch.Tensor,
    thresholds: Thresholds = detect.DEFAULT,
    batch_size: int = 4,
    sites: tuple[str, ...] | None = None,
    progress: bool = False,
) -> Collected:
    """Run ``windows`` [n, L] through the model and summarize every site of every block."""
    spec = get_arch(model)
    want = set(sites or SITES)
    unknown = want - set(SITES)
    if unknown:
        from ..errors import UserError

        raise UserError(f"unknown analysis site(s) {sorted(unknown)}; known: {', '.join(SITES)}")
    roles = norm_roles(spec)
    for role in ("attn", "mlp"):
        if role not in roles:
            want -= {f"{role}_norm_in", f"{role}_norm_std", "qkv_in" if role == "attn" else "gate_up_in"}
    blks = blocks(model, spec)
    n_layers = len(blks)
    hidden = int(model.config.hidden_size)
    T = int(windows.shape[1])
    stats: dict[str, dict[int, SiteStats]] = {s: {} for s in SITES if s in want}
    int8 = {s: detect.Int8FeatureTracker(hidden, thresholds.int8_magnitude) for s in INT8_SITES if s in want}
    int8_all = detect.Int8FeatureTracker(hidden, thresholds.int8_magnitude)
    state = {"offset": 0, "batch": 0}

    def sink(site, layer, t):
        with single_thread():
            t = t.detach().float().cpu()  # summaries live on the CPU whatever the model's device
            st = stats[site].get(layer)
            if st is None:
                st = stats[site][layer] = SiteStats(t.shape[-1], T, thresholds)
            st.update(t, state["offset"])
            if site in int8:
                int8[site].update(layer, t, state["batch"])
                int8_all.update((site, layer), t, state["batch"])

    device = next(model.parameters()).device
    body = backbone(model)
    hooks = _install(model, spec, sink, want)
    try:
        for bi, batch in enumerate(progress_mod.track(windows.split(batch_size), "analysis pass", "batch", on=progress)):
            state["batch"] = bi
            body(input_ids=batch.to(device), use_cache=False)
            state["offset"] += batch.shape[0]
    finally:
        hooks.remove()
    gammas = {role: [norm_scale(get_module(b, path), spec.norm_kind) for b in blks] for role, path in roles.items()}
    return Collected(
        spec=spec,
        n_layers=n_layers,
        hidden=hidden,
        n_seqs=int(windows.shape[0]),
        seqlen=T,
        stats=stats,
        int8=int8,
        int8_all=int8_all,
        norm_gamma=gammas,
        thresholds=thresholds,
        first_tokens=windows[0, :16].tolist(),
    )


@torch.no_grad()
def capture(
    model: nn.Module, input_ids: torch.Tensor, layers: list[int], sites: tuple[str, ...] = ("resid", "qkv_in")
) -> dict[str, dict[int, torch.Tensor]]:
    """Full tensors [tokens, channels] of one sequence at ``layers`` for ``sites`` (for 3D plots)."""
    spec = get_arch(model)
    layers_set = set(layers)
    out: dict[str, dict[int, torch.Tensor]] = {s: {} for s in sites}

    def sink(site, layer, t):
        if layer in layers_set:
            out[site][layer] = t.detach().float()[0].cpu()

    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    hooks = _install(model, spec, sink, set(sites))
    try:
        backbone(model)(input_ids=input_ids[:1].to(next(model.parameters()).device), use_cache=False)
    finally:
        hooks.remove()
    return out


WEIGHT_ROLES = ("q", "k", "v", "o", "gate", "up", "down")


@torch.no_grad()
def weight_stats(model: nn.Module, spec: ArchSpec | None = None) -> dict:
    """Per layer and per projection: difficulty numbers, largest |w| and where it sits,
    and, for q/k/v, the max |w| of every input column (the weight outlier plots)."""
    with single_thread():
        return _weight_stats(model, spec or get_arch(model))


def _weight_stats(model: nn.Module, spec: ArchSpec) -> dict:
    out: dict[str, list] = {r: [] for r in WEIGHT_ROLES}
    columns: dict[str, list[torch.Tensor]] = {r: [] for r in ("q", "k", "v")}
    for blk in blocks(model, spec):
        for role in WEIGHT_ROLES:
            path = getattr(spec, role)
            if path is None:
                out[role].append(None)
                continue
            w = get_module(blk, path).weight.detach().float().cpu()
            d = detect.difficulty(w, channel_dim=0)
            r, c = divmod(int(w.abs().argmax()), w.shape[1])
            d.update({"shape": list(w.shape), "argmax_row": r, "argmax_col": c, "value": float(w[r, c])})
            out[role].append(d)
            if role in columns:
                columns[role].append(w.abs().amax(0))
    return {"layers": out, "column_absmax": {r: torch.stack(v) if v else torch.zeros(0) for r, v in columns.items()}}


@contextlib.contextmanager
def block_hooks(model: nn.Module, fn_by_layer: dict[int, callable]):
    """Forward hooks on decoder blocks that may replace the block output (interventions)."""
    spec = get_arch(model)
    handles = []

    def make(fn):
        def hook(m, inp, out):
            if isinstance(out, (tuple, list)):
                new = fn(out[0])
                return (new, *out[1:]) if isinstance(out, tuple) else [new, *out[1:]]
            return fn(out)

        return hook

    try:
        for li, blk in enumerate(blocks(model, spec)):
            if li in fn_by_layer:
                handles.append(blk.register_forward_hook(make(fn_by_layer[li])))
        yield
    finally:
        for h in handles:
            h.remove()
