"""What the block-wise reconstruction methods share (``blockwise``, ``omniquant``): the
checks of a learnable integer grid, straight-through rounding, the capture of a block's
calibration inputs / call arguments / full-precision outputs, the split of those batches
into training steps and the functional forward of a block with substituted tensors.

A method imports no other method, so this lives on the maths floor; nothing here holds
state or hooks beyond the one capture pass and the activation fake quantization while training.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn as nn
from torch.func import functional_call

from ..arch import get_module
from ..errors import UserError
from .args import QuantArgs
from .core import fake_quantize, symmetric_scale


def check_block_options(o, error: type[UserError] = UserError) -> None:
    """Refuse options the optimization cannot run with, naming the field (``error``:
    RecipeError from the method's config): ``iters``/``windows_per_step`` integers >= 1,
    ``lr`` (and ``clip_lr`` / ``let_lr`` where the object has them) positive, ``clip_min``
    (where present) in (0, 1]."""

    def number(key):
        v = getattr(o, key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise error(f"{key}={v!r}: expected a number")
        return v

    for key in ("iters", "windows_per_step"):
        v = getattr(o, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise error(f"{key}={v!r}: expected an integer of at least 1")
    if number("lr") <= 0:
        raise error(f"lr={o.lr!r}: expected a positive number")
    for key in ("clip_lr", "let_lr"):
        if getattr(o, key, None) is not None and number(key) <= 0:
            raise error(f"{key}={getattr(o, key)!r}: expected a positive number")
    if hasattr(o, "clip_min") and not 0.0 < number("clip_min") <= 1.0:
        raise error(f"clip_min={o.clip_min!r}: expected a fraction in (0, 1]")
    if hasattr(o, "amp") and not any(o.amp is a or (isinstance(a, str) and o.amp == a) for a in AMP_SETTINGS):
        raise error(f"amp={o.amp!r}: expected true, false or auto")


AMP_SETTINGS = (True, False, "auto")


def native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matmuls are native here: a GPU, or a CPU with AMX tiles or
    AVX-512 BF16 (elsewhere bfloat16 is emulated and slower than float32)."""
    if device.type != "cpu":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def amp_on(setting, device: torch.device) -> bool:
    """Whether an ``amp`` setting (True, False, "auto") means bfloat16 steps on ``device``."""
    return setting is True or (setting == "auto" and native_bf16(device))


def autocast_for(setting, device: torch.device):
    """The learning step's autocast: bfloat16 matmuls when :func:`amp_on`, otherwise a
    no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp_on(setting, device))


def check_grid(args: QuantArgs | None, error: type[UserError] = UserError, where: str = "", method: str = "blockwise") -> None:
    """A grid whose rounding / clipping a block method can learn: integer, min-max observer."""
    if args is None:
        raise error(f"weights: {method} needs weight quantization arguments")
    if args.kind != "int":
        raise error(f"{where}weights.kind: {method} learns the rounding of integer grids, not {args.kind!r}")
    if args.granularity == "token":
        raise error(f"{where}weights.granularity: 'token' is for activations; use tensor, channel or group")
    if args.observer != "minmax":
        raise error(f"{where}weights.observer: {method} learns its own clipping from the min-max range; use observer: minmax")


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def ste_fake_quant(wg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, args: QuantArgs, offset=0.0) -> torch.Tensor:
    """Grouped weights ``wg`` [.., G, g] fake-quantized on the grid of the range ``[lo, hi]`` per
    group (symmetric: ``core.symmetric_scale``; asymmetric: min-max with a rounded zero point),
    codes ``round(w / s + offset)``, differentiable through the straight-through rounding (in
    ``wg``, the range and ``offset``). Shared by blockwise and omniquant."""
    if args.symmetric:
        s = symmetric_scale(lo, hi, args).unsqueeze(-1)
        v = offset if isinstance(offset, torch.Tensor) else None if offset == 0 else torch.full_like(wg, offset)
        return _SymmetricFakeQuant.apply(wg, v, s, args.qmin, args.qmax)
    else:
        lo, hi = lo.clamp_max(0), hi.clamp_min(0)
        s = ((hi - lo) / (args.qmax - args.qmin)).clamp_min(1e-12).unsqueeze(-1)
        z = torch.clamp(ste_round(-lo.unsqueeze(-1) / s), args.qmin, args.qmax)
    q = torch.clamp(ste_round(wg / s + offset) + z, args.qmin, args.qmax)
    return (q - z) * s


class _SymmetricFakeQuant(torch.autograd.Function):
    """``clamp(round(w / s + v), qmin, qmax) * s`` with the straight-through gradients of the
    unfused expression (round passes the gradient, the clamp stops it outside the grid), in
    a handful of passes over the weight instead of the dozens autograd records for the
    unfused form: the elementwise work on weight-sized tensors, not the block's matmuls, is
    most of a learning step's time. Gradients: ``w`` and ``v``: ``g`` where the code is
    inside the grid (times ``s`` for ``v``); ``s``: ``sum(g (q - inside w / s))`` per group."""

    @staticmethod
    def forward(ctx, w, v, s, qmin, qmax):
        r = torch.div(w, s) if v is None else torch.addcdiv(v, w, s)
        r = r.round_()
        inside = (r >= qmin) & (r <= qmax)
        q = r.clamp_(qmin, qmax)
        ctx.save_for_backward(w, s, q, inside)
        return q * s

    @staticmethod
    def backward(ctx, g):
        w, s, q, inside = ctx.saved_tensors
        gw = gv = gs = None
        need_w, need_v, need_s = ctx.needs_input_grad[:3]
        if need_w:
            gw = torch.where(inside, g, 0.0)
        if need_v:
            gv = torch.where(inside, g * s, 0.0)
        if need_s:
            t = torch.where(inside, w / s, 0.0)
            gs = (g * (q - t)).sum(-1, keepdim=True)
        return gw, gv, gs, None, None


def slice_call(x: torch.Tensor, args: tuple, kwargs: dict, start: int, stop: int):
    """Windows ``start:stop`` of a batch: ``x`` and every call tensor of 2+ dims whose first
    dimension is the batch's (masks, position ids, rotary tables; a 1-d cache_position and
    tables shared by the batch, first dimension 1, stay whole)."""
    n = x.shape[0]

    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] == n and n > 1:
            return v[start:stop]
        if isinstance(v, tuple):
            return tuple(cut(e) for e in v)
        return v

    return x[start:stop], tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


def block_forward(block: nn.Module, tensors: dict[str, torch.Tensor], x, args, kwargs) -> torch.Tensor:
    """The block's hidden-state output with ``tensors`` (parameter / buffer name -> value)
    in place of its own."""
    y = functional_call(block, tensors, (x, *args), kwargs)
    return y[0] if isinstance(y, tuple) else y


def step_chunks(xs: Sequence[torch.Tensor], wps: int) -> list[tuple[int, int, int]]:
    """(batch, start, stop) of every step's windows, in turn over the batches."""
    chunks = []
    for b in range(len(xs)):
        n = xs[b].shape[0]
        chunks += [(b, i, min(n, i + wps)) for i in range(0, n, wps)]
    return chunks


def output_error(block: nn.Module, tensors: dict[str, torch.Tensor], xs, call_args, ys) -> float:
    """Mean squared error of the block's output over every calibration batch with
    ``tensors`` substituted (no gradient)."""
    with torch.no_grad():
        total, count = 0.0, 0
        for b in range(len(xs)):
            args, kwargs = call_args[b]
            y = block_forward(block, tensors, xs[b], args, kwargs)
            total += float((y.float() - ys[b].float()).pow(2).sum())
            count += y.numel()
    return total / max(count, 1)


def capture_block(ctx, batches: int | None):
    """One pass of the block as it is (full precision): per batch its input, its call
    arguments and its output (the target)."""
    xs, calls, ys = [], [], []

    def pre(_m, args, kwargs):
        xs.append(args[0].detach())
        calls.append((tuple(args[1:]), dict(kwargs)))

    h = ctx.block.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        ctx.run(batches=batches, each=lambda _b, y: ys.append(y.detach()))
    finally:
        h.remove()
    return xs, calls, ys


def parallel_data(ctx, batches: int | None, method: str = "blockwise"):
    """The full-precision model's inputs of this block, their call arguments and the
    full-precision block's outputs on them (the engine's stream, ``needs_fp_stream``)."""
    if ctx.fp_inputs is None or ctx.fp_outputs is None:
        raise UserError(f"{method} mode parallel: the engine gave this block no full-precision inputs")
    n = len(ctx.fp_inputs) if batches is None else min(batches, len(ctx.fp_inputs))
    return [ctx.fp_inputs[b] for b in range(n)], [ctx.call_args[b] for b in range(n)], [ctx.fp_outputs[b] for b in range(n)]


def corrective_data(ctx, batches: int | None, method: str = "blockwise"):
    """This block's compressed inputs (the outputs of the compressed blocks before it) with
    their call arguments, and as targets the full-precision model's outputs of this block
    (the engine's stream, ``needs_fp_stream``): the block learns to undo the error that
    reaches it too, as AutoRound does."""
    if ctx.fp_outputs is None:
        raise UserError(f"{method} mode corrective: the engine gave this block no full-precision outputs")
    n = len(ctx.inputs) if batches is None else min(batches, len(ctx.inputs))
    return [ctx.inputs[b] for b in range(n)], [ctx.call_args[b] for b in range(n)], [ctx.fp_outputs[b] for b in range(n)]


def check_activations(args: QuantArgs | None, error: type[UserError], method: str) -> None:
    """Activations a block method fake-quantizes while learning: per token, integer grid."""
    if args is not None and (args.kind != "int" or args.granularity != "token"):
        raise error(f"activations: {method} quantizes activations per token on an integer grid (kind: int, granularity: token)")


@contextlib.contextmanager
def act_quant_hooks(block: nn.Module, locs, args: QuantArgs | None):
    """Fake-quantize the inputs of the named linears (straight-through) while inside."""
    if args is None:
        yield
        return

    def hook(_m, a):
        x = a[0]
        return (x + (fake_quantize(x.detach(), args) - x.detach()),) + tuple(a[1:])

    handles = [get_module(block, loc).register_forward_pre_hook(hook) for loc in locs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
