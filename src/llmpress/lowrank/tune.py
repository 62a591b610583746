"""Block-wise tuning of low-rank factors (``lowrank_tune``): after a block's linears are
factored (``svd``, ``asvd``, ``svd_llm``, ``wsvd``, ``qsvd``), train their factors A and B
together so that the block's output matches its target, the way block-wise reconstruction
trains rounding (:mod:`llmpress.quant.blockwise`) and as SVD-LLM's parameter update and
the seeds' "train D and U" do per layer: a truncation chosen layer by layer leaves the
interplay of a block's layers (attention then MLP, the norms between) and the error arriving
from the blocks before it; gradient steps on the whole block's output recover part of that.

Per block: loss ``mean((block(x; W_i = A_i B_i) - y)^2)`` over a few calibration windows per
step, Adam on every factor, each factor's step size ``lr`` times its own root-mean-square
(the factors' scales differ by orders of magnitude between methods and layers: a relative
rate is the same setting for all of them), a linear decay to 0. QSVD's shared B is one
parameter, so q/k/v keep one latent. At the end the factors are kept only if the block's
error over every calibration batch is lower than before the tuning. Ranks never change: the
stored bytes are the factoring stage's.

Modes as ``blockwise``'s: ``corrective`` (the default: inputs from the compressed blocks
before, targets the full-precision model's outputs of the block, so each block also undoes
the error that reaches it) and ``parallel`` (inputs and targets from the full-precision
model); not ``sequential``, whose targets (the uncompressed block on the compressed inputs)
are gone once the block is factored. The stage runs after the module stages of its
block (``after_module_stages``), so it sees the factors. Factors the factoring stage put on
a grid (``weights:``, by RTN or GPTQ) are trained through that grid (each step uses their
nearest-rounded values, the gradient passing straight through) and rounded to nearest again at
the end, with new scales: the bytes and the grid stay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import progress
from ..arch import get_module
from ..errors import RecipeError, UserError
from ..quant.block_recon import (
    amp_on,
    autocast_for,
    block_forward,
    check_block_options,
    corrective_data,
    output_error,
    parallel_data,
    slice_call,
    step_chunks,
)
from ..quant.core import fake_quantize, quantize_weight
from ..registry import register

MODES = ("corrective", "parallel")


@dataclass(kw_only=True, frozen=True)
class LowRankTune:
    """``iters`` Adam steps per block on ``windows_per_step`` calibration windows each, step
    size ``lr`` relative to each factor's root-mean-square; ``mode`` as ``blockwise``;
    ``batches``: calibration batches used (None: all); ``amp``: bfloat16 steps (``auto``: where
    native)."""

    iters: int = 100
    lr: float = 1e-3
    windows_per_step: int = 4
    mode: str = "corrective"
    batches: int | None = None
    amp: bool | str = "auto"

    after_module_stages = True  # the engine runs it after its block's module stages (llmpress.calib.engine)
    requires_factors = True  # the plan checks an earlier stage factors each target (llmpress.calib.plan)

    def __post_init__(self):
        check_block_options(self, RecipeError)
        if self.mode not in MODES:
            raise RecipeError(f"mode={self.mode!r}: expected one of {', '.join(MODES)} (sequential's targets, the unfactored block, are gone)")
        if self.batches is not None and (isinstance(self.batches, bool) or not isinstance(self.batches, int) or self.batches < 1):
            raise RecipeError(f"batches={self.batches!r}: expected an integer of at least 1 (or null: all)")

    @property
    def needs_fp_stream(self) -> bool:
        return True  # both modes' targets are the full-precision model's


def _factors(ctx) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[int, torch.Tensor], dict[int, object]]:
    """Per target its (A, B) as stored by the factoring stage, one float32 leaf tensor per
    distinct factor (QSVD's q/k/v share one B: one leaf) and each leaf's grid (None: float)."""
    pairs, leaves, grids = {}, {}, {}
    for loc, full in ctx.targets.items():
        rec = ctx.record(loc)
        if rec.form != "lowrank":
            raise UserError(f"layer {full}: lowrank_tune needs a low-rank factoring stage before it on this linear")
        A, B = rec.payload["A"], rec.payload["B"]
        for t in (A, B):
            leaves.setdefault(id(t), t.detach().float().clone().requires_grad_(True))
            grids[id(t)] = rec.weight_args
        pairs[loc] = (A, B)
    return pairs, leaves, grids


def _on_grid(leaf: torch.Tensor, args) -> torch.Tensor:
    """The leaf's nearest-rounded value on ``args``'s grid, the gradient straight through
    (the leaf itself without a grid)."""
    if args is None:
        return leaf
    return leaf + (fake_quantize(leaf.detach(), args) - leaf.detach())


def tune_block(block: torch.nn.Module, cfg: LowRankTune, pairs, leaves, xs, calls, ys, grids=None, bar=None) -> dict:
    """Adam on the factor leaves against the targets (through each leaf's grid in ``grids``).
    ``kept_start`` in the result: the tuned factors (rounded to their grids) did not lower the
    block's error over every batch below the stored factors' (the caller keeps those)."""
    grids = grids or {}
    dtypes = {loc: get_module(block, loc).weight.dtype for loc in pairs}  # the model's (bfloat16 models train float32 leaves)

    def weights():
        f = {k: _on_grid(v, grids.get(k)) for k, v in leaves.items()}
        return {f"{loc}.weight": (f[id(A)] @ f[id(B)]).to(dtypes[loc]) for loc, (A, B) in pairs.items()}

    frozen = [(p, p.requires_grad) for p in block.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    device = xs[0].device
    with torch.no_grad(), autocast_for(cfg.amp, device):  # the factors as stored (GPTQ's codes on a grid)
        before = output_error(block, {f"{loc}.weight": (A.float() @ B.float()).to(dtypes[loc]) for loc, (A, B) in pairs.items()}, xs, calls, ys)
    params = list(leaves.values())
    opt = torch.optim.Adam([{"params": [p], "lr": cfg.lr * float(p.detach().pow(2).mean().sqrt())} for p in params])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / cfg.iters)
    chunks = step_chunks(xs, cfg.windows_per_step)
    losses = []
    try:
        with torch.enable_grad(), autocast_for(cfg.amp, device):
            for step in range(cfg.iters):
                b, i, j = chunks[step % len(chunks)]
                x, args, kwargs = slice_call(xs[b], *calls[b], i, j)
                loss = (block_forward(block, weights(), x, args, kwargs).float() - ys[b][i:j].float()).pow(2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
                if bar is not None:
                    bar.update(1, f"loss {losses[-1]:.3g}")
    finally:
        for p, req in frozen:
            p.requires_grad_(req)
    with torch.no_grad(), autocast_for(cfg.amp, device):
        after = output_error(block, weights(), xs, calls, ys)
    kept = not (after < before) or not math.isfinite(after)
    return {"block_mse_before": before, "block_mse_after": before if kept else after, "kept_start": kept,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "bf16_steps": amp_on(cfg.amp, device)}  # fmt: skip


@register(
    "lowrank_tune",
    LowRankTune,
    scope="block",
    summary="train a block's low-rank factors together against the block's full-precision output (after factoring)",
)
def lowrank_tune(ctx, cfg: LowRankTune) -> None:
    pairs, leaves, grids = _factors(ctx)
    data = parallel_data if cfg.mode == "parallel" else corrective_data
    xs, calls, ys = data(ctx, cfg.batches, method="lowrank_tune")
    with progress.bar(cfg.iters, f"lowrank_tune block {ctx.index}", "step") as bar:
        res = tune_block(ctx.block, cfg, pairs, leaves, xs, calls, ys, grids=grids, bar=bar)
    del xs, calls, ys
    for loc in pairs:
        rec = ctx.record(loc)
        rec.methods.append("lowrank_tune")
        rec.notes["lowrank_tune"] = res
    if res["kept_start"]:
        return
    stored = {}  # per leaf: (tensor, its grid's payload entries), once, so a shared B stays one tensor

    def final(key: int, name: str, dtype) -> tuple[torch.Tensor, dict]:
        if key not in stored:
            v, args = leaves[key].detach(), grids[key]
            if args is None:
                stored[key] = (v.to(dtype).contiguous(), {})
            else:
                w, qp = quantize_weight(v, args, name)
                extra = {"scale": qp.scale} if qp.zero_point is None else {"scale": qp.scale, "zero_point": qp.zero_point}
                stored[key] = (w.to(dtype).contiguous(), extra)
        return stored[key]

    for loc, (A, B) in pairs.items():
        lin = get_module(ctx.block, loc)
        rec = ctx.record(loc)
        (a, qa), (b, qb) = final(id(A), f"{rec.name}.A", lin.weight.dtype), final(id(B), f"{rec.name}.B", lin.weight.dtype)
        lin.weight.data.copy_(a @ b)
        rec.payload.update({"A": a, "B": b, **{f"A.{k}": v for k, v in qa.items()}, **{f"B.{k}": v for k, v in qb.items()}})
