"""OmniQuant (Shao et al., 2023): learnable weight clipping (LWC) and learnable equivalent
transformations (LET), trained block by block against the full-precision block output.

Per decoder block (inputs: the outputs of the already-compressed blocks, as ``blockwise``'s
sequential mode; target: the full-precision block on those inputs), minimize

    L = mean((block_q(x) - y)^2)

over, for each targeted linear and quantization group (weights ``w``, ``lo = min w``,
``hi = max w``):

    gamma = sigmoid(g), beta = sigmoid(b)          (start at sigmoid(lwc_init) ~ 1: min-max)
    asymmetric:  s = (gamma hi - beta lo) / (2^N - 1),  z = round(-beta lo / s)
    symmetric:   s = gamma max(|lo|, |hi|) / qmax,      z = 0
    w^ = s (clamp(round(w / s) + z, qmin, qmax) - z)           (round: straight-through)

so a range only narrows (gamma, beta < 1), never widens beyond min-max; and, per
equivalence point the block allows (:mod:`llmpress.transform.equivalent`: norm -> q/k/v,
v -> o, norm -> gate/up, up -> down), a per-channel scale ``s = exp(log_s)`` (and, with
``shift``, a shift ``delta``): ``X W^T = ((X - delta) / s)(W diag(s))^T + W delta``, the
linear's weight quantized after the transformation. With ``activations`` the targeted
linears' inputs are fake-quantized (straight-through) during training as at run time.
AdamW, no weight decay: ``lr`` for LWC, ``let_lr`` for LET; with ``amp`` (default ``auto``:
where bfloat16 matmuls are native) the steps run under bfloat16 autocast, the parameters,
the loss and the folding stay float32 / float64.

The scales start at 1 (weight-only) or at SmoothQuant's ``max|X|^a / max|W|^(1-a)`` with
``a = let_alpha`` (with activations); the shifts at the channel midpoints (OS+). At the end
the transformation is folded into the block (float64), the codes are hard on the grid of
``_int_params(beta lo, gamma hi)`` (the stage's QuantArgs: an ordinary integer grid that
the packed checkpoint stores bit for bit), the best step's parameters are kept, and
round-to-nearest on the untransformed block is kept instead if it does better on all the
calibration batches. q/k scaling (OmniQuant's attention LET) is not learned: it only helps
a quantized q/k (KV cache), and RoPE / QK-norm constrain it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .. import progress
from ..arch import get_module, set_module
from ..errors import RecipeError, UserError
from ..registry import register
from ..runtime.act_quant import ActQuantLinear
from ..transform.equivalent import block_tensors, fold_let, let_groups, let_tensors, prepare_shifts, shift_allowed, undo_shifts
from ..transform.scaling import head_geometry, heads_to_kv, smooth_scales
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
    output_error,
    slice_call,
    ste_fake_quant,
    step_chunks,
)
from .core import QParams, _int_params, dequantize, group_view, quantize, quantize_weight

_EPS = 1e-12


class ClipQuant:
    """LWC for one linear: clipping logits ``g`` (hi) and ``b`` (lo, asymmetric grids) [R, G]."""

    def __init__(self, weight: torch.Tensor, args: QuantArgs, *, learn: bool, init: float = 4.0, name: str | None = None):
        check_grid(args, UserError, f"layer {name}: " if name else "", method="omniquant")
        check_group_divides(args, weight.shape[-1], f"layer {name}: " if name else "")
        self.args, self.name = args, name
        rows = group_view(weight.detach().float(), args, name).shape[:2]
        dev = weight.device
        self.g = torch.full(rows, float(init), device=dev, requires_grad=True) if learn else None
        self.b = torch.full(rows, float(init), device=dev, requires_grad=True) if learn and not args.symmetric else None

    def params(self) -> list[torch.Tensor]:
        return [p for p in (self.g, self.b) if p is not None]

    def factors(self) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """(gamma, beta): sigmoid of the logits, 1.0 where not learned (beta = gamma, symmetric)."""
        gamma = 1.0 if self.g is None else torch.sigmoid(self.g)
        beta = gamma if self.args.symmetric else (1.0 if self.b is None else torch.sigmoid(self.b))
        return gamma, beta

    def _range(self, wg: torch.Tensor):
        gamma, beta = self.factors()
        r = self.args.clip_ratio
        return wg.amin(-1) * r * beta, wg.amax(-1) * r * gamma

    def soft(self, w: torch.Tensor) -> torch.Tensor:
        """Fake-quantized ``w``, differentiable in ``w`` and the clipping logits."""
        wg = group_view(w.float(), self.args, self.name)
        lo, hi = self._range(wg)
        return ste_fake_quant(wg, lo, hi, self.args).reshape(w.shape).to(w.dtype)

    def hard(self, w: torch.Tensor) -> tuple[torch.Tensor, QParams]:
        """(``w`` on the integer grid of the learned range, its qparams)."""
        with torch.no_grad():
            lo, hi = self._range(group_view(w.detach().float(), self.args, self.name))
            qp = _int_params(lo, hi, self.args)
            return dequantize(quantize(w.detach(), qp, self.args), qp, self.args, w.dtype), qp


@dataclass(kw_only=True)
class LetState:
    """The learnable transformation of a block: groups, log-scales, shifts (None: not learned)."""

    groups: list
    log_s: list[torch.Tensor] = field(default_factory=list)
    shifts: list[torch.Tensor | None] = field(default_factory=list)
    made: list[str] = field(default_factory=list)  # structure created for the shifts

    def params(self) -> list[torch.Tensor]:
        return [*self.log_s, *(z for z in self.shifts if z is not None)]

    def scales(self) -> list[torch.Tensor]:
        return [ls.exp() for ls in self.log_s]

    def tensors(self, block, spec, base) -> dict[str, torch.Tensor]:
        return let_tensors(block, spec, self.groups, self.scales(), self.shifts, base) if self.groups else {}


def quantized_tensors(block, spec, quants: dict[str, ClipQuant], let: LetState, base, *, hard: bool) -> dict[str, torch.Tensor]:
    """The tensors the block computes with: LET applied, then each targeted weight quantized."""
    t = let.tensors(block, spec, base)
    for loc, q in quants.items():
        w = t.get(f"{loc}.weight", base[f"{loc}.weight"])
        t[f"{loc}.weight"] = q.hard(w)[0] if hard else q.soft(w)
    return t


@dataclass(kw_only=True)
class OmniResult:
    error_rtn: float  # block output MSE, round-to-nearest on the min-max grid, untransformed block
    error: float  # the same for the learned result (hard codes)
    kept_rtn: bool = False
    best_step: int = 0
    losses: list[float] = field(default_factory=list)


def train(block, spec, quants, let: LetState, data, cfg: OmniQuant, bar=None) -> tuple[int, list[float]]:
    """AdamW on the clipping logits and the LET parameters; ends at the best step (or the last,
    without ``keep_best``). Returns (best step, per-step losses)."""
    xs, calls, ys = data
    groups = [{"params": [p for q in quants.values() for p in q.params()], "lr": cfg.lr}, {"params": let.params(), "lr": cfg.let_lr}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)
    learned = [p for g in groups for p in g["params"]]
    chunks = step_chunks(xs, cfg.windows_per_step)
    base = block_tensors(block)
    best, best_loss, best_step, losses = None, math.inf, 0, []
    with torch.enable_grad(), autocast_for(cfg.amp, xs[0].device):
        for step in range(cfg.iters):
            b, i, j = chunks[step % len(chunks)]
            x, args, kwargs = slice_call(xs[b], *calls[b], i, j)
            t = quantized_tensors(block, spec, quants, let, base, hard=False)
            loss = (block_forward(block, t, x, args, kwargs).float() - ys[b][i:j].float()).pow(2).mean()
            value = float(loss.detach())
            losses.append(value)
            if cfg.keep_best and value < best_loss:
                best_loss, best_step, best = value, step, [p.detach().clone() for p in learned]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if bar is not None:
                bar.update(1, f"loss {value:.3g}")
    if best is not None:
        with torch.no_grad():
            for p, v in zip(learned, best):
                p.copy_(v)
    return best_step, losses


def learn_block(block, spec, quants, let: LetState, data, cfg: OmniQuant, bar=None) -> OmniResult:
    """Train, compare with round-to-nearest (both with the activation quantization), and leave
    the block as the winner computes (LET folded, hard weights written); the quantizers'
    state and ``let`` describe the result (``let`` emptied when RTN wins)."""
    xs, calls, ys = data
    frozen = [(p, p.requires_grad) for p in block.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    try:
        with act_quant_hooks(block, list(quants), cfg.activations):
            best_step, losses = train(block, spec, quants, let, data, cfg, bar)
            base = block_tensors(block)
            with autocast_for(cfg.amp, xs[0].device):  # the comparison at the steps' precision
                with torch.no_grad():
                    err = output_error(block, quantized_tensors(block, spec, quants, let, base, hard=True), xs, calls, ys)
                    rtn = {f"{loc}.weight": quantize_weight(base[f"{loc}.weight"], q.args)[0] for loc, q in quants.items()}
                err_rtn = output_error(block, rtn, xs, calls, ys)
    finally:
        for p, req in frozen:
            p.requires_grad_(req)
    res = OmniResult(error_rtn=err_rtn, error=err, best_step=best_step, losses=losses)
    if err > err_rtn:
        res.error, res.kept_rtn = err_rtn, True
        undo_shifts(block, let.made)
        let.groups, let.log_s, let.shifts = [], [], []
        for q in quants.values():
            q.g = q.b = None
    elif let.groups:
        with torch.no_grad():
            fold_let(block, spec, let.groups, [s.detach() for s in let.scales()], [None if z is None else z.detach() for z in let.shifts])
    return res


def init_let(ctx, cfg: OmniQuant) -> tuple[LetState, list]:
    """The block's LET groups with their starting scales / shifts; also the groups skipped
    because an online rotation sits in between."""
    groups, rotated = let_groups(ctx.block, ctx.spec, ctx.targets) if cfg.let else ([], [])
    let = LetState(groups=groups)
    if not groups:
        return let, rotated
    shift = cfg.shift_on
    need = {g.linears[0]: {"channel_stats"} | ({"channel_minmax"} if shift and shift_allowed(g) else set()) for g in groups}
    stats = ctx.collect(need) if cfg.activations is not None or shift else {}
    for g in groups:
        geo = head_geometry(ctx.block, ctx.spec) if g.kind == "v" else None
        red = (lambda t, r, _geo=geo: heads_to_kv(t, _geo, r)) if geo else (lambda t, r: t)
        n = get_module(ctx.block, ctx.spec.v).out_features if geo else get_module(ctx.block, g.linears[0]).in_features
        z, act = None, None
        if shift and shift_allowed(g):
            st = stats[g.linears[0]]["channel_minmax"]
            lo, hi = red(st["min"], "min"), red(st["max"], "max")
            z, act = ((hi + lo) / 2).float(), ((hi - lo) / 2).float()
        elif cfg.activations is not None:
            act = red(stats[g.linears[0]]["channel_stats"]["absmax"], "max").float()
        s0 = torch.ones(n, device=get_module(ctx.block, g.linears[0]).weight.device)
        if cfg.activations is not None and act is not None:
            wmax = torch.stack([get_module(ctx.block, p).weight.detach().abs().amax(0).float() for p in g.linears]).amax(0)
            s0 = smooth_scales(act, red(wmax, "max"), cfg.let_alpha)
        let.log_s.append(s0.log().clone().requires_grad_(True))
        let.shifts.append(None if z is None else z.clone().requires_grad_(True))
    if shift:
        let.made = prepare_shifts(ctx.block, ctx.spec, [g for g, z in zip(groups, let.shifts) if z is not None])
    return let, rotated


# --------------------------------------------------------------------------- method
@dataclass(kw_only=True, frozen=True)
class OmniQuant:
    """OmniQuant stage (see the module docstring). ``weights``: the grid (observer min-max;
    LWC learns the clipping). ``activations``: per-token fake quantization of the targeted
    linears' inputs, during training and at run time (None: weight-only). ``iters`` AdamW
    steps per block of ``windows_per_step`` windows; ``lr`` for the clipping logits, ``let_lr``
    for the scales (log space) and shifts; ``lwc`` / ``let`` switch either part off; ``shift``
    adds LET shifts (None: only with activations; creates biases, see docs/learned.md);
    ``let_alpha`` the SmoothQuant exponent of the scales' start (with activations);
    ``lwc_init`` the clipping logits' start (sigmoid(4) = 0.982); ``batches`` calibration
    batches learned on (None: all); ``amp``: the steps' matmuls (and the final comparison
    with round-to-nearest) in bfloat16 (``auto``: where bfloat16 is native, as ``blockwise``)."""

    weights: QuantArgs = field(default_factory=lambda: QuantArgs(bits=4, group_size=64))
    activations: QuantArgs | None = None
    iters: int = 200
    lr: float = 0.05
    let_lr: float = 0.005
    lwc: bool = True
    let: bool = True
    shift: bool | None = False
    let_alpha: float = 0.5
    lwc_init: float = 4.0
    windows_per_step: int = 2
    keep_best: bool = True
    batches: int | None = None
    amp: bool | str = "auto"

    def __post_init__(self):
        check_block_options(self, RecipeError)
        check_grid(self.weights, RecipeError, method="omniquant")
        for key in ("lwc", "let", "keep_best"):
            if not isinstance(getattr(self, key), bool):
                raise RecipeError(f"{key}={getattr(self, key)!r}: expected true or false")
        if not (self.lwc or self.let):
            raise RecipeError("lwc and let are both false: nothing to learn (use the rtn method)")
        if self.shift is not None and not isinstance(self.shift, bool):
            raise RecipeError(f"shift={self.shift!r}: expected true, false or null")
        if isinstance(self.let_alpha, bool) or not isinstance(self.let_alpha, (int, float)) or not 0.0 <= self.let_alpha <= 1.0:
            raise RecipeError(f"let_alpha={self.let_alpha!r}: expected a value in [0, 1]")
        if isinstance(self.lwc_init, bool) or not isinstance(self.lwc_init, (int, float)) or not math.isfinite(self.lwc_init):
            raise RecipeError(f"lwc_init={self.lwc_init!r}: expected a number")
        check_activations(self.activations, RecipeError, "omniquant")
        if self.batches is not None and (isinstance(self.batches, bool) or not isinstance(self.batches, int) or self.batches < 1):
            raise RecipeError(f"batches={self.batches!r}: expected an integer of at least 1 (or null: all)")

    @property
    def shift_on(self) -> bool:
        return self.activations is not None if self.shift is None else self.shift


@register(
    "omniquant",
    OmniQuant,
    scope="block",
    joint_grids=True,
    summary="OmniQuant: learnable weight clipping + equivalent transformations (scales/shifts folded), learned per block by AdamW",
)
def omniquant(ctx, cfg: OmniQuant) -> None:
    quants = {  # plan-bits stages learn together, each linear on its own grid (ctx.grid)
        loc: ClipQuant(get_module(ctx.block, loc).weight.data, ctx.grid(loc, cfg.weights), learn=cfg.lwc, init=cfg.lwc_init, name=full)
        for loc, full in ctx.targets.items()
    }
    let, rotated = init_let(ctx, cfg)
    data = capture_block(ctx, cfg.batches)
    with progress.bar(cfg.iters, f"omniquant block {ctx.index}", "step") as bar:
        res = learn_block(ctx.block, ctx.spec, quants, let, data, cfg, bar=bar)
    del data
    let_of: dict[str, list[str]] = {}
    for g in let.groups:
        for p in (*g.linears, g.prev):
            let_of.setdefault(p, []).append(f"{g.prev}->{'/'.join(x.rsplit('.', 1)[-1] for x in g.linears)}")
    for loc, q in quants.items():
        lin = get_module(ctx.block, loc)
        w, qp = q.hard(lin.weight.data)
        lin.weight.data.copy_(w)
        rec = ctx.record(loc)
        rec.methods.append("omniquant")
        rec.weight_args, rec.qparams = q.args, qp
        gamma, _ = q.factors()
        rec.notes["omniquant"] = {
            "block_mse_rtn": res.error_rtn,
            "block_mse": res.error,
            "kept_rtn": res.kept_rtn,
            "best_step": res.best_step,
            "clip_mean": round(float(gamma.detach().mean()) if torch.is_tensor(gamma) else 1.0, 4),
            "let": let_of.get(loc, []),
            "let_skipped_rotated": [g.prev for g in rotated],
            "bf16_steps": amp_on(cfg.amp, lin.weight.device),
        }
        if cfg.activations is not None:
            rec.act_args = cfg.activations
            if not isinstance(lin, ActQuantLinear):
                set_module(ctx.block, loc, ActQuantLinear(lin, cfg.activations))
