"""Block-wise reconstruction (AutoRound's scheme, Cheng et al., 2023): per decoder block,
learn every targeted linear's rounding offsets and per-group clipping factors by SignSGD,
minimizing the mean squared error between the quantized block's output and its target.

For each linear, per quantization group (weights ``w``, range ``[lo, hi]`` from min-max):

    lo' = beta * lo,  hi' = alpha * hi,          alpha, beta in [clip_min, 1]
    s   = (hi' - lo') / (qmax - qmin),  z = round(-lo' / s)          (asymmetric)
    s   = max(|lo'|, |hi'|) / qmax  (qmax + 1/2 with full_range; x_m' / qmin with signed_scale),  z = 0  (symmetric)
    q   = clamp(round(w / s + V) + z, qmin, qmax),  V in [-1/2, 1/2]
    w^  = s (q - z)

``round`` passes gradients straight through (STE). Loss: ``mean((block_q(x) - y)^2)``
over a few calibration windows per step. Update (SignSGD, linear decay to 0 as AutoRound):
``p <- clamp(p - lr_t sign(dL/dp))``, ``lr_t = lr (1 - t / iters)``, for V (clamped to
[-1/2, 1/2]) and alpha/beta (clamped to [clip_min, 1]: a range only narrows, never
widens beyond min-max). V, alpha, beta start at 0, 1, 1: step 0 is round-to-nearest on
the min-max grid. The parameters of the step with the lowest loss are kept (as AutoRound).
At the end the codes are hard, ``round(w / s + V) + z`` on the grid of ``_int_params(beta lo,
alpha hi)`` (the stage's QuantArgs, float16 scales included), so the record's qparams are an
ordinary integer grid that the packed checkpoint stores and verifies bit for bit. If the
learned block does worse than round-to-nearest over all the calibration batches, RTN is kept.

Mode ``sequential``: inputs are what the engine hands a block-scope stage (the outputs of
the already-compressed blocks before it), targets the full-precision block on those same
inputs. ``parallel``: inputs and targets both from the full-precision model; the config's
``needs_fp_stream`` makes the engine carry the full-precision block inputs beside the
compressed ones (one more activation store, one block forward per block; one process, no
block checkpoints). ``corrective`` (AutoRound's default): inputs from the compressed blocks,
targets the full-precision model's outputs of the block (the same stream as parallel mode),
so each block also learns to undo the error that reaches it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn

from .. import progress
from ..arch import get_module, set_module
from ..errors import RecipeError, UserError
from ..registry import register
from ..runtime.act_quant import ActQuantLinear
from .args import QuantArgs, check_group_divides
from .block_recon import (
    act_quant_hooks,
    amp_on,
    autocast_for,
    block_forward,
    capture_block,
    check_activations,
    check_block_options,
    check_grid,
    corrective_data,
    output_error,
    parallel_data,
    slice_call,
    ste_fake_quant,
    step_chunks,
)
from .core import QParams, _dequant, _int_params, group_view

__all__ = ["Blockwise", "BlockwiseOptions", "LearnedQuant", "block_error", "capture_block", "learn_block", "learned_weights", "slice_call"]

_EPS = 1e-12
MODES = ("sequential", "parallel", "corrective")


@dataclass(kw_only=True, frozen=True)
class BlockwiseOptions:
    """``iters`` SignSGD steps per block, ``lr`` for the offsets V (AutoRound: 1/iters),
    ``clip_lr`` for the clipping factors (default: ``lr``), ``windows_per_step`` calibration
    windows per step (taken in turn from the engine's batches), ``learn_clip`` with factors
    in [``clip_min``, 1], ``keep_best``: keep the step with the lowest loss; ``amp``: the
    learning steps' matmuls in bfloat16 (``auto``: where they are native, AMX / AVX-512 BF16
    CPUs and GPUs; the final comparison with nearest rounding too)."""

    iters: int = 100
    lr: float = 0.01
    clip_lr: float | None = None
    learn_clip: bool = True
    clip_min: float = 0.5
    windows_per_step: int = 2
    keep_best: bool = True
    amp: bool | str = "auto"

    def __post_init__(self):
        check_block_options(self)


class LearnedQuant:
    """One linear's learnable quantizer: offsets V [R, G, g], clipping factors alpha (hi)
    and beta (lo) [R, G]; on a symmetric grid the scale follows whichever scaled end is the
    larger in magnitude (as AutoRound's two factors)."""

    def __init__(self, weight: torch.Tensor, args: QuantArgs, *, learn_clip: bool, name: str | None = None):
        check_grid(args, UserError, f"layer {name}: " if name else "")
        if weight.dim() == 2:
            check_group_divides(args, weight.shape[1], f"layer {name}: " if name else "")
        self.args, self.shape, self.dtype = args, weight.shape, weight.dtype
        self.wg = group_view(weight.detach().float(), args, name).clone()
        lo, hi = self.wg.amin(-1), self.wg.amax(-1)
        self.lo, self.hi = lo * args.clip_ratio, hi * args.clip_ratio
        self.v = torch.zeros_like(self.wg, requires_grad=True)
        self.alpha = torch.ones_like(self.lo, requires_grad=True) if learn_clip else None
        self.beta = torch.ones_like(self.lo, requires_grad=True) if learn_clip else None  # the low end's own factor, symmetric grids too

    def params(self) -> list[torch.Tensor]:
        return [p for p in (self.v, self.alpha, self.beta) if p is not None]

    def _range(self):
        a = 1.0 if self.alpha is None else self.alpha
        b = 1.0 if self.beta is None else self.beta
        return self.lo * b, self.hi * a

    def soft(self) -> torch.Tensor:
        """The weight the block computes with during learning (differentiable in V, alpha, beta)."""
        lo, hi = self._range()
        return ste_fake_quant(self.wg, lo, hi, self.args, self.v).reshape(self.shape).to(self.dtype)

    def hard(self) -> tuple[torch.Tensor, QParams, torch.Tensor]:
        """(weight on the grid, its qparams, its integer codes) from the current V, alpha, beta."""
        with torch.no_grad():
            lo, hi = self._range()
            qp = _int_params(lo.detach(), hi.detach(), self.args)
            z = 0.0 if qp.zero_point is None else qp.zero_point.unsqueeze(-1)
            codes = torch.clamp(torch.round(self.wg / qp.scale.unsqueeze(-1) + self.v) + z, self.args.qmin, self.args.qmax)
            w = _dequant(codes, qp).reshape(self.shape).to(self.dtype)
        return w, qp, codes

    def clip_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, beta) as used (ones where not learned)."""
        a = torch.ones_like(self.lo) if self.alpha is None else self.alpha.detach()
        b = torch.ones_like(self.lo) if self.beta is None else self.beta.detach()
        return a, b

    def project(self, clip_min: float) -> None:
        with torch.no_grad():
            self.v.clamp_(-0.5, 0.5)
            for p in (self.alpha, self.beta):
                if p is not None:
                    p.clamp_(clip_min, 1.0)

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params()]

    def restore(self, values: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, v in zip(self.params(), values):
                p.copy_(v)

    def reset(self) -> None:
        """Back to round-to-nearest on the min-max grid."""
        with torch.no_grad():
            self.v.zero_()
            for p in (self.alpha, self.beta):
                if p is not None:
                    p.fill_(1.0)


def block_error(block: nn.Module, quants: dict[str, LearnedQuant], xs, call_args, ys, *, hard: bool = True) -> float:
    """Mean squared error of the block's output over every calibration batch, with the
    quantizers' hard (or soft) weights in place of the targeted linears' weights."""
    with torch.no_grad():
        weights = {f"{loc}.weight": (q.hard()[0] if hard else q.soft()) for loc, q in quants.items()}
    return output_error(block, weights, xs, call_args, ys)


@dataclass(kw_only=True)
class BlockResult:
    error_rtn: float  # block output MSE over all calibration batches, round-to-nearest (min-max grid)
    error: float  # the same for the result
    kept_rtn: bool = False  # the learned parameters did worse: round-to-nearest kept
    best_step: int = 0
    losses: list[float] = field(default_factory=list)  # per step (the mini-batch loss before the update)


def learn_block(
    block: nn.Module,
    quants: dict[str, LearnedQuant],
    xs: Sequence[torch.Tensor],
    call_args: Sequence,
    ys: Sequence[torch.Tensor],
    options: BlockwiseOptions | None = None,
    bar=None,
) -> BlockResult:
    """SignSGD on every quantizer's V (and clipping factors) against the block's targets
    ``ys`` for inputs ``xs`` (with their call arguments). The quantizers end at the best
    (or last) step, or back at round-to-nearest if that was better over all batches.
    The block's own weights are not changed (the caller writes ``hard()``)."""
    o = options or BlockwiseOptions()
    clip_lr = o.lr if o.clip_lr is None else o.clip_lr
    frozen = [(p, p.requires_grad) for p in block.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    chunks = step_chunks(xs, o.windows_per_step)
    best, best_loss, best_step, losses = None, math.inf, 0, []
    try:
        with torch.enable_grad(), autocast_for(o.amp, xs[0].device):
            for step in range(o.iters):
                b, i, j = chunks[step % len(chunks)]
                x, args, kwargs = slice_call(xs[b], *call_args[b], i, j)
                weights = {f"{loc}.weight": q.soft() for loc, q in quants.items()}
                loss = (block_forward(block, weights, x, args, kwargs).float() - ys[b][i:j].float()).pow(2).mean()
                value = float(loss.detach())
                losses.append(value)
                if o.keep_best and value < best_loss:
                    best_loss, best_step, best = value, step, {loc: q.snapshot() for loc, q in quants.items()}
                params = [(p, o.lr if p is q.v else clip_lr) for q in quants.values() for p in q.params()]
                grads = torch.autograd.grad(loss, [p for p, _ in params], allow_unused=True)
                decay = 1.0 - step / o.iters
                with torch.no_grad():
                    for (p, lr), g in zip(params, grads):
                        if g is not None:
                            p.sub_(torch.sign(g) * (lr * decay))
                for q in quants.values():
                    q.project(o.clip_min)
                if bar is not None:
                    bar.update(1, f"loss {value:.3g}")
    finally:
        for p, req in frozen:
            p.requires_grad_(req)
    if best is not None:
        for loc, q in quants.items():
            q.restore(best[loc])
    with autocast_for(o.amp, xs[0].device):  # the comparison at the steps' precision
        err = block_error(block, quants, xs, call_args, ys)
        saved = {loc: q.snapshot() for loc, q in quants.items()}
        for q in quants.values():
            q.reset()
        err_rtn = block_error(block, quants, xs, call_args, ys)
    if err > err_rtn:
        return BlockResult(error_rtn=err_rtn, error=err_rtn, kept_rtn=True, best_step=best_step, losses=losses)
    for loc, q in quants.items():
        q.restore(saved[loc])
    return BlockResult(error_rtn=err_rtn, error=err, best_step=best_step, losses=losses)


# --------------------------------------------------------------------------- method
@dataclass(kw_only=True, frozen=True)
class Blockwise(BlockwiseOptions):
    """Block-wise reconstruction stage (see the module docstring). ``weights``: the grid
    (observer min-max: the learned clipping replaces the MSE search). ``mode``:
    ``sequential`` (inputs: the compressed blocks' outputs), ``parallel`` (inputs and
    targets from the full-precision model) or ``corrective`` (compressed inputs, the
    full-precision model's targets).
    ``batches``: calibration batches learned on (None: all the engine has).
    ``activations``: per-token fake quantization of the targeted linears' inputs while
    learning (straight-through), kept at run time as with ``rtn``/``gptq`` (W4A4, W4A8)."""

    weights: QuantArgs = field(default_factory=lambda: QuantArgs(bits=4, group_size=64))
    mode: str = "sequential"
    batches: int | None = None
    activations: QuantArgs | None = None

    def __post_init__(self):
        check_block_options(self, RecipeError)
        check_grid(self.weights, RecipeError)
        if self.mode not in MODES:
            raise RecipeError(f"mode={self.mode!r}: expected one of {', '.join(MODES)}")
        if self.batches is not None and (isinstance(self.batches, bool) or not isinstance(self.batches, int) or self.batches < 1):
            raise RecipeError(f"batches={self.batches!r}: expected an integer of at least 1 (or null: all)")
        check_activations(self.activations, RecipeError, "blockwise")

    @property
    def needs_fp_stream(self) -> bool:
        """Parallel and corrective modes: the engine carries the full-precision model's block
        inputs (and runs each block on them before its stages)."""
        return self.mode in ("parallel", "corrective")

    def options(self) -> BlockwiseOptions:
        """The optimization's own settings (the fields this config inherits)."""
        return BlockwiseOptions(**{f.name: getattr(self, f.name) for f in fields(BlockwiseOptions)})


@register(
    "blockwise",
    Blockwise,
    scope="block",
    joint_grids=True,
    summary="block-wise reconstruction: rounding offsets + clipping learned per block by SignSGD (AutoRound-style)",
)
def blockwise(ctx, cfg: Blockwise) -> None:
    data = {"parallel": parallel_data, "corrective": corrective_data}.get(cfg.mode, capture_block)
    xs, calls, ys = data(ctx, cfg.batches)
    grids = {loc: ctx.grid(loc, cfg.weights) for loc in ctx.targets}  # plan-bits stages learn together, each its grid
    quants = {
        loc: LearnedQuant(get_module(ctx.block, loc).weight.data, grids[loc], learn_clip=cfg.learn_clip, name=full)
        for loc, full in ctx.targets.items()
    }
    with progress.bar(cfg.iters, f"blockwise block {ctx.index}", "step") as bar:
        with act_quant_hooks(ctx.block, list(quants), cfg.activations):  # the RTN comparison with them too
            res = learn_block(ctx.block, quants, xs, calls, ys, cfg.options(), bar=bar)
    del xs, calls, ys
    for loc, q in quants.items():
        w, qp, codes = q.hard()
        lin = get_module(ctx.block, loc)
        lin.weight.data.copy_(w)
        rec = ctx.record(loc)
        rec.methods.append("blockwise")
        rec.weight_args = grids[loc]
        rec.qparams = qp
        a, b = q.clip_factors()
        rec.notes["blockwise"] = {
            "block_mse_rtn": res.error_rtn,
            "block_mse": res.error,
            "kept_rtn": res.kept_rtn,
            "best_step": res.best_step,
            "clip_mean": round(float(a.mean()), 4),
            "clip_lo_mean": round(float(b.mean()), 4),
            "moved": round(float((codes != _rtn_codes(q)).float().mean()), 4),
            "bf16_steps": amp_on(cfg.amp, w.device),
        }
        if cfg.activations is not None:
            rec.act_args = cfg.activations
            if not isinstance(lin, ActQuantLinear):
                set_module(ctx.block, loc, ActQuantLinear(lin, cfg.activations))


def learned_weights(
    block: nn.Module, locs: Sequence[str], args: QuantArgs, xs, call_args, ys, options: BlockwiseOptions | None = None
) -> dict[str, torch.Tensor]:
    """The weights of ``block``'s linears ``locs`` (local names) after learning them together
    on ``args``'s grid against targets ``ys`` for inputs ``xs``, the block left as it was:
    what ``blockwise`` would make of them at that setting (plan-bits' ``--solver blockwise``)."""
    o = options or BlockwiseOptions()
    quants = {loc: LearnedQuant(get_module(block, loc).weight.data, args, learn_clip=o.learn_clip, name=loc) for loc in locs}
    learn_block(block, quants, xs, call_args, ys, o)
    return {loc: q.hard()[0] for loc, q in quants.items()}


def _rtn_codes(q: LearnedQuant) -> torch.Tensor:
    """Nearest-rounding codes of the quantizer's weight on its min-max grid."""
    qp = _int_params(q.lo, q.hi, q.args)
    z = 0.0 if qp.zero_point is None else qp.zero_point.unsqueeze(-1)
    return torch.clamp(torch.round(q.wg / qp.scale.unsqueeze(-1)) + z, q.args.qmin, q.args.qmax)
