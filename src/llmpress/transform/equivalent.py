"""Learnable equivalent transformations (OmniQuant's LET, Shao et al., 2023): the scales
and shifts of :mod:`llmpress.transform.scaling`, written as a pure function of tensors so
that a block can be run (and differentiated) with candidate scales before anything is
folded.

For a group (an op producing ``x`` and the linears reading it, :class:`ScaleGroup`), with
a per-channel scale ``s > 0`` and shift ``delta``:

    x W^T + b = ((x - delta) / s) (W diag(s))^T + (b + W delta)

- the consumers take ``W diag(s)`` and ``b + W delta`` (a bias is created when the
  linear has none: only when shifts are asked for);
- the producer absorbs ``(x - delta) / s``: a norm's weight ``w / s`` (gemma's
  ``(1 + w) / s - 1``) and, for a shift, a :class:`NormShift` wrapper whose shift becomes
  ``(shift + delta) / s``; v_proj's rows and bias ``(b_v - delta) / s`` (softmax rows sum
  to one); up_proj's rows (scale only: nothing can subtract a constant after the gated
  product).

:func:`let_tensors` applies every group in data-flow order to a dict of tensors (name ->
value, the block's own parameter / buffer names) and returns the changed values; the
result is differentiable in the scales and shifts. :func:`fold_let` writes them into the
block (in float64, then the parameters' dtype). :func:`let_groups` picks the groups a
block allows: every linear of the group targeted, and no online rotation (QuaRot /
DuQuant / SpinQuant run-time modules) between the producer and its readers, where a
diagonal scale would not commute with the rotation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ..arch import ArchSpec, get_module, set_module
from ..errors import UserError
from .scaling import NormShift, ScaleGroup, ensure_bias, head_geometry, kv_to_heads, scale_groups


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def rotated_between(block: nn.Module, spec: ArchSpec, g: ScaleGroup) -> bool:
    """True when an online rotation sits between the group's producer and its readers."""
    if g.kind == "norm":
        norm = get_module(block, g.prev)
        return hasattr(norm, "llmpress_out_rot") or hasattr(getattr(norm, "norm", None), "llmpress_out_rot")
    if g.kind == "v":
        rt = getattr(get_module(block, _parent(spec.o)), "llmpress_attn", None)
        return rt is not None and getattr(rt, "o_rot", None) is not None
    return hasattr(get_module(block, _parent(spec.down)), "llmpress_down_in")


def let_groups(block: nn.Module, spec: ArchSpec, targets) -> tuple[list[ScaleGroup], list[ScaleGroup]]:
    """(usable groups, groups skipped because of an online rotation) of a block, among those
    whose linears are all in ``targets`` (local names)."""
    usable, rotated = [], []
    for g in scale_groups(spec):
        if not all(p in targets for p in g.linears) or (g.kind != "norm" and g.prev not in targets):
            continue
        (rotated if rotated_between(block, spec, g) else usable).append(g)
    return usable, rotated


def norm_names(block: nn.Module, path: str) -> tuple[str, str | None]:
    """(name of the norm's weight, name of its NormShift shift or None) inside the block."""
    norm = get_module(block, path)
    if isinstance(norm, NormShift):
        return f"{path}.norm.weight", f"{path}.shift"
    return f"{path}.weight", None


def group_channels(block: nn.Module, spec: ArchSpec, g: ScaleGroup) -> int:
    """Length of the group's scale vector (kv channels for "v")."""
    return get_module(block, spec.v).out_features if g.kind == "v" else get_module(block, g.linears[0]).in_features


def prepare_shifts(block: nn.Module, spec: ArchSpec, groups: Sequence[ScaleGroup]) -> list[str]:
    """Create what shifts fold into (zero biases, NormShift wrappers with a zero shift) for
    the groups that take one (norm and v); the block's function is unchanged. Returns the
    paths created, for :func:`undo_shifts`."""
    made = []
    for g in groups:
        if g.kind == "up":
            continue
        for p in (*g.linears, *((spec.v,) if g.kind == "v" else ())):
            lin = get_module(block, p)
            if lin.bias is None:
                ensure_bias(lin)
                made.append(f"bias:{p}")
        if g.kind == "norm" and not isinstance(get_module(block, g.prev), NormShift):
            norm = get_module(block, g.prev)
            set_module(block, g.prev, NormShift(norm, torch.zeros_like(norm.weight)))
            made.append(f"norm:{g.prev}")
    return made


def undo_shifts(block: nn.Module, made: list[str]) -> None:
    """Remove the zero biases and wrappers :func:`prepare_shifts` created."""
    for item in reversed(made):
        kind, path = item.split(":", 1)
        if kind == "bias":
            get_module(block, path).bias = None
        else:
            set_module(block, path, get_module(block, path).norm)


def shift_allowed(g: ScaleGroup) -> bool:
    return g.kind != "up"


def let_tensors(
    block: nn.Module,
    spec: ArchSpec,
    groups: Sequence[ScaleGroup],
    scales: Sequence[torch.Tensor | None],
    shifts: Sequence[torch.Tensor | None],
    base: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The tensors the groups change, computed from ``base`` (name -> current value; the
    dtype of ``base`` is the compute dtype). A shift needs the structure of
    :func:`prepare_shifts`."""
    if spec.norm_kind not in ("rms", "rms_1p"):
        raise UserError(f"norm kind {spec.norm_kind!r}: cannot fold a scale into it")
    t: dict[str, torch.Tensor] = {}

    def get(name):
        if name in t:
            return t[name]
        if name not in base:
            raise UserError(f"equivalent transformation: the block has no tensor {name!r} (shifts need prepare_shifts)")
        return base[name]

    for g, s, z in zip(groups, scales, shifts):
        geo = head_geometry(block, spec) if g.kind == "v" else None
        cols = (lambda v, _geo=geo: kv_to_heads(v, _geo)) if geo else (lambda v: v)
        if z is not None:
            if not shift_allowed(g):
                raise UserError("a shift cannot be folded across the gated MLP product (up_proj -> down_proj)")
            for p in g.linears:
                t[f"{p}.bias"] = get(f"{p}.bias") + get(f"{p}.weight") @ cols(z).to(get(f"{p}.weight").dtype)
        if g.kind == "norm":
            wname, sname = norm_names(block, g.prev)
            if z is not None or sname is not None:
                if sname is None:
                    raise UserError(f"equivalent transformation: {g.prev} takes a shift but is not wrapped (prepare_shifts)")
                shift = get(sname) + (z if z is not None else 0.0)
                t[sname] = shift / s if s is not None else shift
        elif g.kind == "v" and z is not None:
            t[f"{spec.v}.bias"] = get(f"{spec.v}.bias") - z
        if s is None:
            continue
        for p in g.linears:
            t[f"{p}.weight"] = get(f"{p}.weight") * cols(s).to(get(f"{p}.weight").dtype)
        if g.kind == "norm":
            w = get(wname)
            t[wname] = w / s if spec.norm_kind == "rms" else (1.0 + w) / s - 1.0
        else:
            t[f"{g.prev}.weight"] = get(f"{g.prev}.weight") / s.unsqueeze(1)
            if f"{g.prev}.bias" in base or f"{g.prev}.bias" in t:
                t[f"{g.prev}.bias"] = get(f"{g.prev}.bias") / s
    return {n: v.to(base[n].dtype) for n, v in t.items()}  # the block's own dtypes (a float32 scale on a bf16 block)


def block_tensors(block: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the block, detached (cast to ``dtype`` when given)."""
    out = {n: p.detach() for n, p in block.named_parameters()}
    out.update({n: b.detach() for n, b in block.named_buffers()})
    return {n: v.to(dtype) for n, v in out.items()} if dtype is not None else out


@torch.no_grad()
def fold_let(block: nn.Module, spec: ArchSpec, groups, scales, shifts) -> dict[str, torch.Tensor]:
    """Fold the scales / shifts into the block in place (computed in float64); returns the
    new values by name."""
    base = {n: v for n, v in block_tensors(block, torch.float64).items()}
    new = let_tensors(
        block,
        spec,
        groups,
        [None if s is None else s.double() for s in scales],
        [None if z is None else z.double() for z in shifts],
        base,
    )
    live = dict(block.named_parameters())
    live.update(dict(block.named_buffers()))
    for n, v in new.items():
        live[n].data = v.to(live[n].dtype)
    return {n: live[n].detach() for n in new}
