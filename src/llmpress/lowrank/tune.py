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
block (``after_module_stages``), so it sees the factors; float factors only (factors
quantized in the factoring stage are refused when the recipe is read).
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


def _factors(ctx) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[int, torch.Tensor]]:
    """Per target its (A, B) as stored by the factoring stage, and one float32 leaf tensor per
    distinct factor (QSVD's q/k/v share one B: one leaf)."""
    pairs, leaves = {}, {}
    for loc, full in ctx.targets.items():
        rec = ctx.record(loc)
        if rec.form != "lowrank":
            raise UserError(f"layer {full}: lowrank_tune needs a low-rank factoring stage before it on this linear")
        if rec.weight_args is not None:
            raise UserError(f"layer {full}: lowrank_tune trains float factors; these are quantized (drop weights from the factoring stage)")
        A, B = rec.payload["A"], rec.payload["B"]
        for t in (A, B):
            leaves.setdefault(id(t), t.detach().float().clone().requires_grad_(True))
        pairs[loc] = (A, B)
    return pairs, leaves


def tune_block(ctx, cfg: LowRankTune, pairs, leaves, xs, calls, ys, bar=None) -> dict:
    """Adam on the factor leaves against the targets; the leaves end at the tuned values, or
    back at the start if the tuning did not lower the block's error over every batch."""
    block = ctx.block

    dtypes = {loc: get_module(block, loc).weight.dtype for loc in pairs}  # the model's (bfloat16 models train float32 leaves)

    def weights():
        return {f"{loc}.weight": (leaves[id(A)] @ leaves[id(B)]).to(dtypes[loc]) for loc, (A, B) in pairs.items()}

    frozen = [(p, p.requires_grad) for p in block.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    start = {k: v.detach().clone() for k, v in leaves.items()}
    device = xs[0].device
    with torch.no_grad(), autocast_for(cfg.amp, device):
        before = output_error(block, weights(), xs, calls, ys)
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
    if kept:
        with torch.no_grad():
            for k, v in leaves.items():
                v.copy_(start[k])
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
    pairs, leaves = _factors(ctx)
    data = parallel_data if cfg.mode == "parallel" else corrective_data
    xs, calls, ys = data(ctx, cfg.batches, method="lowrank_tune")
    with progress.bar(cfg.iters, f"lowrank_tune block {ctx.index}", "step") as bar:
        res = tune_block(ctx, cfg, pairs, leaves, xs, calls, ys, bar=bar)
    del xs, calls, ys
    tuned = {}  # one stored tensor per leaf, so a shared B stays one tensor
    for loc, (A, B) in pairs.items():
        lin = get_module(ctx.block, loc)
        dtype = lin.weight.dtype
        a = tuned.setdefault(id(A), leaves[id(A)].detach().to(dtype).contiguous())
        b = tuned.setdefault(id(B), leaves[id(B)].detach().to(dtype).contiguous())
        lin.weight.data.copy_(a @ b)
        rec = ctx.record(loc)
        rec.payload["A"], rec.payload["B"] = a, b
        rec.methods.append("lowrank_tune")
        rec.notes["lowrank_tune"] = res
