"""Per-channel scales and shifts folded into the op that feeds a group of linears.

Shared by SmoothQuant / Outlier Suppression+ (:mod:`llmpress.transform.smooth`) and AWQ
(:mod:`llmpress.quant.awq`). A linear ``y = x W^T + b`` computes the same function when
its input is divided by a per-channel ``s`` and its input columns are multiplied by it:
``(x / s) (W diag(s))^T = x W^T``. The division is folded into the op producing ``x``:

- RMSNorm ``x / rms(x) * w``: ``w' = w / s``; gemma's ``x / rms(x) * (1 + w)``:
  ``w' = (1 + w) / s - 1``.
- v_proj -> o_proj: attention output head h is a convex combination of the rows of V of
  its kv head ``h // (n_heads / n_kv)``. Dividing v_proj's output rows (and bias) by
  ``s_kv`` divides that head's output by the same vector, so o_proj's input columns of
  head h take ``s_kv``. With grouped-query attention the scale lives on the kv channels
  (``n_kv * head_dim``) and is shared by the query heads of a group.
- up_proj -> down_proj: down's input is ``act(gate) * up``; dividing up's rows by ``s``
  divides it by ``s``.

A shift (Outlier Suppression+) subtracts a per-channel ``z`` from the input and moves it
into the bias: ``(x - z) W^T + (b + W z) = x W^T + b``. For a norm the subtraction is
done by a :class:`NormShift` wrapper (an RMSNorm has no bias); for v -> o it is folded
into v_proj's bias (softmax rows sum to one: ``attn(V - z) = attn(V) - z``); after the
gated product of the MLP there is no place to subtract a constant, so up -> down takes
scales only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..arch import ArchSpec, get_module, set_module
from ..calib.accumulators import ACCUMULATORS, Accumulator
from ..errors import UserError

_EPS = 1e-5


# --------------------------------------------------------------------------- statistics
class ChannelMinMax(Accumulator):
    """Per input channel: signed min and max over tokens (for the shift z = (max + min) / 2)."""

    name = "channel_minmax"

    def __init__(self):
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        lo, hi = x.amin(0), x.amax(0)
        if self.min is None:
            self.min, self.max = lo, hi
        else:
            torch.minimum(self.min, lo, out=self.min)
            torch.maximum(self.max, hi, out=self.max)

    def reduce(self, group) -> None:
        if group.active:
            if self.min is None:
                raise RuntimeError("channel min/max accumulator saw no data on this rank (fewer calibration batches than ranks)")
            group.min_(self.min)
            group.max_(self.max)

    def result(self) -> dict[str, torch.Tensor]:
        if self.min is None:
            raise RuntimeError("channel min/max accumulator saw no data")
        return {"min": self.min.clone(), "max": self.max.clone()}


ACCUMULATORS.setdefault(ChannelMinMax.name, ChannelMinMax)


# --------------------------------------------------------------------------- structure
@dataclass(kw_only=True, frozen=True)
class ScaleGroup:
    """Linears that share one input, and the op that produces it.

    ``kind``: "norm" (an RMSNorm feeds ``linears``), "v" (v_proj feeds o_proj through
    attention), "up" (up_proj feeds down_proj through the gated product).
    ``inspect``: the sub-module whose output scores a candidate scale (AWQ): the
    attention or MLP for a norm group, the consumer linear otherwise.
    """

    prev: str
    kind: str
    linears: tuple[str, ...]
    inspect: str


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def scale_groups(spec: ArchSpec, attn_out: bool = True, mlp_out: bool = True) -> list[ScaleGroup]:
    """The groups of a block in data-flow order: norm->q/k/v, v->o, norm->gate/up, up->down."""
    out: list[ScaleGroup] = []
    attn_norm, mlp_norm = spec.norm_feeds[0], spec.norm_feeds[-1]
    out.append(ScaleGroup(prev=attn_norm.norm, kind="norm", linears=attn_norm.linears, inspect=_common_parent(attn_norm.linears)))
    if attn_out:
        out.append(ScaleGroup(prev=spec.v, kind="v", linears=(spec.o,), inspect=spec.o))
    if len(spec.norm_feeds) > 1:
        out.append(ScaleGroup(prev=mlp_norm.norm, kind="norm", linears=mlp_norm.linears, inspect=_common_parent(mlp_norm.linears)))
    if mlp_out and spec.gate:  # a plain act(up) -> down has no linear place for 1/s
        out.append(ScaleGroup(prev=spec.up, kind="up", linears=(spec.down,), inspect=spec.down))
    return out


def _common_parent(paths: tuple[str, ...]) -> str:
    if len(paths) == 1:
        return paths[0]
    parents = {_parent(p) for p in paths}
    if len(parents) != 1:
        raise UserError(f"linears {paths} do not share a parent module")
    return parents.pop()


@dataclass(kw_only=True, frozen=True)
class HeadGeometry:
    n_heads: int
    n_kv: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv


def head_geometry(block: nn.Module, spec: ArchSpec) -> HeadGeometry:
    attn = get_module(block, _parent(spec.o))
    v, o = get_module(block, spec.v), get_module(block, spec.o)
    hd = getattr(attn, "head_dim", None) or getattr(getattr(attn, "config", None), "head_dim", None)
    if not hd or v.out_features % hd or o.in_features % hd:
        raise UserError(f"cannot read the attention head size of {type(attn).__name__} (head_dim={hd!r})")
    geo = HeadGeometry(n_heads=o.in_features // hd, n_kv=v.out_features // hd, head_dim=hd)
    if geo.n_heads % geo.n_kv:
        raise UserError(f"{geo.n_heads} query heads are not a multiple of {geo.n_kv} kv heads")
    return geo


def heads_to_kv(t: torch.Tensor, geo: HeadGeometry, reduce: str = "max") -> torch.Tensor:
    """Reduce a per-o-input-column vector [n_heads*hd] to the kv channels [n_kv*hd]."""
    v = t.reshape(geo.n_kv, geo.group, geo.head_dim)
    r = {"max": lambda a: a.amax(1), "min": lambda a: a.amin(1), "mean": lambda a: a.mean(1)}[reduce](v)
    return r.reshape(-1)


def kv_to_heads(t: torch.Tensor, geo: HeadGeometry) -> torch.Tensor:
    """Expand a kv-channel vector [n_kv*hd] to o_proj's input columns [n_heads*hd]."""
    return t.reshape(geo.n_kv, 1, geo.head_dim).expand(geo.n_kv, geo.group, geo.head_dim).reshape(-1)


# --------------------------------------------------------------------------- pure folding
def fold_norm_weight(weight: torch.Tensor, s: torch.Tensor, norm_kind: str) -> torch.Tensor:
    """Norm weight whose output equals the old output divided by ``s``."""
    w, s = weight.double(), s.double()
    if norm_kind == "rms":
        out = w / s
    elif norm_kind == "rms_1p":
        out = (1.0 + w) / s - 1.0
    else:
        raise UserError(f"norm kind {norm_kind!r}: cannot fold a scale into it")
    return out.to(weight.dtype)


def scale_columns(weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """W diag(s): input column j times s_j."""
    return (weight.double() * s.double()).to(weight.dtype)


def scale_rows(weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """diag(1/s) W: output row i divided by s_i."""
    return (weight.double() / s.double().unsqueeze(1)).to(weight.dtype)


def smooth_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float, eps: float = _EPS) -> torch.Tensor:
    """SmoothQuant: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)."""
    a = act_absmax.double().clamp_min(eps)
    w = weight_absmax.double().clamp_min(eps)
    return (a.pow(alpha) / w.pow(1.0 - alpha)).clamp_min(eps).float()


# --------------------------------------------------------------------------- modules
class NormShift(nn.Module):
    """``norm(x) - shift``: a norm followed by a per-channel subtraction (OS+ on RMSNorm)."""

    def __init__(self, norm: nn.Module, shift: torch.Tensor):
        super().__init__()
        self.norm = norm
        self.register_buffer("shift", shift.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        return self.norm.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) - self.shift.to(x.dtype)


def ensure_bias(linear: nn.Linear) -> torch.Tensor:
    """The linear's bias, created as zeros when it has none (nn.Linear adds it in forward)."""
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype, device=linear.weight.device))
    return linear.bias


def group_weight_absmax(block: nn.Module, spec: ArchSpec, g: ScaleGroup) -> torch.Tensor:
    """max |W_j| over every linear of the group, per input channel (kv channels for "v")."""
    am = torch.stack([get_module(block, p).weight.detach().abs().amax(0).float() for p in g.linears]).amax(0)
    return heads_to_kv(am, head_geometry(block, spec), "max") if g.kind == "v" else am


def group_channels(block: nn.Module, spec: ArchSpec, g: ScaleGroup) -> int:
    """Length of the group's scale vector (kv channels for "v")."""
    if g.kind == "v":
        return get_module(block, spec.v).out_features
    return get_module(block, g.linears[0]).in_features


@torch.no_grad()
def apply_smoothing(block: nn.Module, spec: ArchSpec, g: ScaleGroup, s: torch.Tensor | None = None, z: torch.Tensor | None = None) -> None:
    """Fold the shift ``z`` (first) and the scale ``s`` into ``block`` for group ``g``, in place.

    Both vectors are in the group's channel space (kv channels for "v"), ``z`` in the
    units of the unscaled input. The block computes the same function afterwards.
    """
    geo = head_geometry(block, spec) if g.kind == "v" else None
    cols = (lambda t: kv_to_heads(t, geo)) if geo else (lambda t: t)
    if z is not None:
        if g.kind == "up":
            raise UserError("a shift cannot be folded across the gated MLP product (up_proj -> down_proj)")
        for p in g.linears:
            lin = get_module(block, p)
            b = ensure_bias(lin)
            b.data = (b.data.double() + lin.weight.data.double() @ cols(z).double()).to(b.dtype)
        if g.kind == "norm":
            norm = get_module(block, g.prev)
            if isinstance(norm, NormShift):
                norm.shift.add_(z.to(norm.shift.dtype))
            else:
                set_module(block, g.prev, NormShift(norm, z.to(norm.weight.dtype)))
        else:  # v: attention(V - z) = attention(V) - z
            b = ensure_bias(get_module(block, spec.v))
            b.data = (b.data.double() - z.double()).to(b.dtype)
    if s is None:
        return
    for p in g.linears:
        lin = get_module(block, p)
        lin.weight.data = scale_columns(lin.weight.data, cols(s))
    if g.kind == "norm":
        norm = get_module(block, g.prev)
        inner = norm.norm if isinstance(norm, NormShift) else norm
        inner.weight.data = fold_norm_weight(inner.weight.data, s, spec.norm_kind)
        if isinstance(norm, NormShift):
            norm.shift.data = (norm.shift.double() / s.double()).to(norm.shift.dtype)
    else:
        prev = get_module(block, g.prev)
        prev.weight.data = scale_rows(prev.weight.data, s)
        if prev.bias is not None:
            prev.bias.data = (prev.bias.data.double() / s.double()).to(prev.bias.dtype)


# --------------------------------------------------------------------------- calibration helpers
def batches_for(ctx, windows: int) -> int:
    """How many of the block's calibration batches (over all ranks) hold ``windows`` windows (at least 1)."""
    n = ctx.n_batches
    if n == 0:
        return 0
    return max(1, min(n, math.ceil(windows / ctx.windows_per_batch)))


@torch.no_grad()
def capture_calls(ctx, paths: list[str], n_batches: int) -> dict[str, list[tuple[tuple, dict]]]:
    """Run the block on its first ``n_batches`` batches; keep each sub-module's call (args, kwargs)."""
    calls: dict[str, list] = {p: [] for p in paths}
    handles = []
    for p in dict.fromkeys(paths):

        def hook(_m, args, kwargs, _p=p):
            calls[_p].append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs)))

        handles.append(get_module(ctx.block, p).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        ctx.run(batches=n_batches)
    finally:
        for h in handles:
            h.remove()
    return calls


def first_tensor(call: tuple[tuple, dict]) -> torch.Tensor:
    """The input tensor of a captured call (positional or ``hidden_states=``)."""
    args, kwargs = call
    if args and torch.is_tensor(args[0]):
        return args[0]
    if torch.is_tensor(kwargs.get("hidden_states")):
        return kwargs["hidden_states"]
    raise UserError("captured call has no input tensor")


def run_calls(module: nn.Module, calls: list[tuple[tuple, dict]]) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for args, kwargs in calls:
            y = module(*args, **kwargs)
            out.append(y[0] if isinstance(y, tuple) else y)
    return out
