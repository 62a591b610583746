"""The sequential engine: compress a model block by block on calibration data.

1. Capture the inputs of every decoder block for each calibration batch by swapping the
   blocks for pass-through recorders and running the model once: only embeddings run;
   each recorder keeps its block's keyword arguments (masks, rotary embeddings), the
   first one the hidden states.
2. For each block: run its block-scope stages, then attach the statistics accumulators
   that the stages targeting its linears need, run the calibration batches through the
   block, call each stage's handler per module, run the block-scope stages whose config
   says ``after_module_stages`` (``lowrank_tune``, which trains the factors the module
   stages left), then run the block again so the next block sees the compressed outputs.
   With ``true_sequential`` the linears are taken group by group in data-flow order
   (q/k/v, o, gate/up, down), each group's statistics gathered after the earlier groups
   were compressed; ``fused`` does that in about one forward per block (see
   :mod:`llmpress.calib.fused`).
Only one block's inputs and outputs are held at a time (optionally on disk).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .. import progress
from ..arch import get_module
from ..errors import UserError
from ..eval.memory import trim_malloc
from ..registry import METHODS, ModuleRecord
from . import dist
from .activations import ActivationStore, capture_block_inputs, run_batches
from .block import BlockContext, RunState, collect_stats, local_all, solve_seconds, wrap_act_quant
from .fused import fusable, solve_block_fused
from .plan import Plan, build_plan, joint_runs
from .resume import BlockCheckpoints, check_resumable, fingerprint

__all__ = [
    "ActivationStore",
    "BlockContext",
    "EngineOptions",
    "EngineResult",
    "capture_block_inputs",
    "build_plan",
    "local_all",
    "run",
]

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class EngineOptions:
    batch_size: int = 8
    # statistics of each group of linears gathered after the earlier groups were compressed
    true_sequential: bool = True
    # with true_sequential, the staged single pass (see calib/fused.py): about the cost
    # of one block forward per block, on blocks with the standard attention + MLP layout
    fused: bool = True
    offload_dir: str | None = None  # keep block activations on disk instead of in memory
    progress: bool = True
    # after each block, what it left goes here (calib/resume.py); with resume, a run picks up
    # after the last block a killed run finished
    checkpoint_dir: str | None = None
    resume: bool = False
    # block hooks of a streamed compress (llmpress.streamed.StreamIO): ``load(i, block, prefix)``
    # before block i's stages reads its weights, ``done(i, block, prefix, records)`` once it is
    # compressed writes and frees it, ``after_blocks()`` before the head; the blocks are then
    # never all in memory
    blocks: object | None = None


@dataclass
class EngineResult:
    records: dict[str, ModuleRecord]
    seconds: dict[str, float] = field(default_factory=dict)


def run(model: nn.Module, plan: Plan, calib: torch.Tensor | None, opts: EngineOptions | None = None,
        settings: dict[str, dict] | None = None) -> EngineResult:  # fmt: skip
    """Execute ``plan``'s block and module stages; sequentially over blocks when any stage
    needs data. ``settings``: per-linear settings left by model-scope stages (handed to the
    module stages as ``ModuleContext.settings``). ``opts.progress`` False silences every bar
    and notice below (block-scope methods too)."""
    opts = opts or EngineOptions()
    with progress.scope(opts.progress):
        return _run(model, plan, calib, opts, settings or {})


def _run(model: nn.Module, plan: Plan, calib: torch.Tensor | None, opts: EngineOptions, settings: dict[str, dict]) -> EngineResult:
    spec = plan.spec
    state = RunState(spec=spec, targets=plan.targets, needs=plan.needs, settings=settings, records={}, seconds={}, group=dist.current())
    if not plan.engine_needs_data and opts.blocks is not None:
        return _run_data_free_blocks(model, state, plan.description(), opts)
    if not plan.engine_needs_data:
        return _run_data_free(model, state, plan.description(), opts.progress)
    if calib is None:
        raise ValueError("this recipe needs calibration data (a stage gathers statistics)")
    device = next(model.parameters()).device
    if opts.offload_dir:
        Path(opts.offload_dir).expanduser().mkdir(parents=True, exist_ok=True)  # a new folder is fine
        state.offload = Path(tempfile.mkdtemp(prefix="llmpress-act-", dir=Path(opts.offload_dir).expanduser()))
    ckpt = None
    if opts.checkpoint_dir:
        check_resumable(plan.recipe, state.group.world)
        ckpt = BlockCheckpoints(opts.checkpoint_dir, fingerprint(model, plan.recipe.to_dict(), calib))
    try:
        return _run_sequential(model, state, calib.to(device), opts, list(plan.block_stages), plan.description(), ckpt)
    finally:
        if state.offload is not None:
            shutil.rmtree(state.offload, ignore_errors=True)


def _run_data_free(model: nn.Module, state: RunState, desc: str, bars: bool) -> EngineResult:
    """No stage needs data: each targeted linear's stages, one linear at a time."""
    for name, _ in progress.track(state.targets.items(), desc, "linear", on=bars):
        state.apply(name, get_module(model, name), {})
        trim_malloc()  # a layer's temporaries, freed between kept qparams, go back to the system
    wrap_act_quant(model, "", list(state.targets), state.records)
    return EngineResult(state.records, state.seconds)


def _run_data_free_blocks(model: nn.Module, state: RunState, desc: str, opts: EngineOptions) -> EngineResult:
    """No stage needs data, the blocks streamed (``opts.blocks``): each block read, its
    linears compressed one at a time, written; then the linears outside the blocks."""
    layers = get_module(model, state.spec.blocks)
    for i in progress.track(range(len(layers)), desc, "block", on=opts.progress):
        prefix = f"{state.spec.blocks}.{i}"
        opts.blocks.load(i, layers[i], prefix)
        local = state.local_targets(prefix)
        for loc, name in local.items():
            state.apply(name, get_module(layers[i], loc), {})
        wrap_act_quant(layers[i], prefix, list(local.values()), state.records)
        opts.blocks.done(i, layers[i], prefix, state.records)
    opts.blocks.after_blocks()
    outside = [n for n in state.targets if not n.startswith(state.spec.blocks + ".")]
    for name in outside:
        state.apply(name, get_module(model, name), {})
    wrap_act_quant(model, "", outside, state.records)
    return EngineResult(state.records, state.seconds)


def _run_sequential(
    model: nn.Module, state: RunState, calib: torch.Tensor, opts: EngineOptions, block_stages: list, desc: str, ckpt: BlockCheckpoints | None = None
) -> EngineResult:
    """Block by block: each block's stages on the outputs of the compressed blocks before it
    (``ckpt``: each finished block kept on disk; blocks a killed run finished are loaded)."""
    spec = state.spec
    inputs = ActivationStore(state.offload)
    t = time.perf_counter()
    batch_size = _batch_size(calib.shape[0], opts.batch_size, state.group.world, opts.progress)
    batches = list(calib.split(batch_size))
    mine = [batches[i] for i in state.group.share(len(batches))]  # every batch on one rank: contiguous shares
    call_args = capture_block_inputs(model, spec, mine, inputs)
    state.seconds["capture"] = time.perf_counter() - t
    layers = get_module(model, spec.blocks)
    head_needs = state.needs.get(spec.lm_head)
    start = 0 if ckpt is None else _resume(ckpt, opts.resume, state, layers, opts.blocks)
    after = [(j, st) for j, st in block_stages if getattr(st.config, "after_module_stages", False)]
    before = [(j, st) for j, st in block_stages if (j, st) not in after]
    fp = _FullPrecisionStream(inputs, state) if any(getattr(st.config, "needs_fp_stream", False) for _, st in block_stages) else None
    if start:
        inputs.clear()
        inputs = ActivationStore(state.offload)
        for x in ckpt.inputs(start, calib.device) if start < len(layers) or head_needs else ():
            inputs.append(x)
    for i in progress.track(range(len(layers)), desc, "block", on=opts.progress):
        if i < start:
            continue
        block, prefix = layers[i], f"{spec.blocks}.{i}"
        if opts.blocks is not None:
            opts.blocks.load(i, block, prefix)
        ctx = BlockContext(index=i, prefix=prefix, block=block, spec=spec, inputs=inputs, call_args=call_args[i], targets={}, records=state.records,
                           group=state.group, total_batches=len(batches), batch_windows=batch_size,
                           settings={n[len(prefix) + 1 :]: v for n, v in state.settings.items() if n.startswith(prefix + ".")})  # fmt: skip
        if fp is not None:
            ctx.fp_inputs, ctx.fp_outputs = fp.inputs, fp.step(block, call_args[i])
        _run_block_stages(state, before, ctx)
        if fp is not None and not after:
            fp.advance()
        keep_outputs = i < len(layers) - 1 or bool(head_needs)
        outputs = _solve_block(state, opts, block, prefix, inputs, call_args[i], keep_outputs and not after)
        if after:  # stages that act on what the module stages left (lowrank_tune), then the outputs again
            if outputs is not None:
                outputs.clear()
            _run_block_stages(state, after, ctx)
            if fp is not None:
                fp.advance()
            outputs = _block_outputs(state, block, inputs, call_args[i]) if keep_outputs else None
        if ckpt is not None:
            ckpt.save(i, block, prefix, state.records, outputs)
        if opts.blocks is not None:
            opts.blocks.done(i, block, prefix, state.records)
        if outputs is not None:
            inputs.clear()
            inputs = outputs
    if opts.blocks is not None:
        opts.blocks.after_blocks()
    if head_needs:
        _solve_lm_head(model, state, inputs)
    inputs.clear()
    outside = [n for n in state.targets if not n.startswith(spec.blocks + ".") and not state.needs[n]]
    for name in outside:
        state.apply(name, get_module(model, name), {})
    wrap_act_quant(model, "", outside, state.records)
    state.seconds["calibration_forward"] = state.forward_s
    return EngineResult(state.records, state.seconds)


class _FullPrecisionStream:
    """The full-precision model's block inputs, carried beside the compressed ones for block
    stages that ask for them (``needs_fp_stream`` on their config: parallel- and corrective-mode
    reconstruction). One more activation store; one forward per block of the block as it
    is before its stages (whose outputs are the next block's full-precision inputs)."""

    def __init__(self, captured: ActivationStore, state: RunState):
        if state.group.active:
            raise UserError(
                "a block stage needs the full-precision inputs of every block (parallel or corrective mode): not with several processes yet"
            )
        self.state = state
        self.inputs = ActivationStore(state.offload)
        for b in range(len(captured)):
            self.inputs.append(captured[b])
        self.outputs: ActivationStore | None = None

    def step(self, block: nn.Module, call_args: list) -> ActivationStore:
        t = time.perf_counter()
        self.outputs = ActivationStore(self.state.offload)
        run_batches(block, self.inputs, call_args, each=lambda _b, y: self.outputs.append(y))
        self.state.forward_s += time.perf_counter() - t
        return self.outputs

    def advance(self) -> None:
        self.inputs.clear()
        self.inputs, self.outputs = self.outputs, None


def _resume(ckpt: BlockCheckpoints, resume: bool, state: RunState, layers, blocks=None) -> int:
    """Load the blocks a killed run finished (when ``resume``); the first block to compress.
    Streamed (``blocks``): each finished block is read, replaced by its checkpoint and written
    again, through the same hooks as a compressed block (so the evaluation streams pass it too)."""
    done = ckpt.start(resume)
    for i in range(done + 1):
        prefix = f"{state.spec.blocks}.{i}"
        if blocks is not None:
            blocks.load(i, layers[i], prefix)
        recs = ckpt.restore(i, layers[i], prefix)
        state.records.update(recs)
        wrap_act_quant(layers[i], prefix, list(recs), state.records)
        if blocks is not None:
            blocks.done(i, layers[i], prefix, state.records)
    if done >= 0:
        progress.note(f"resumed after block {done}: {done + 1} of {len(layers)} blocks loaded from {ckpt.folder}")
    return done + 1


def _batch_size(windows: int, batch_size: int, ranks: int, bars: bool) -> int:
    """Windows per calibration batch: ``batch_size``, smaller when there would be fewer
    batches than ranks (every rank needs one)."""
    if windows < ranks:
        raise UserError(f"{windows} calibration windows for {ranks} ranks: every rank needs one; use more --calib-samples or fewer processes")
    if -(-windows // batch_size) >= ranks:
        return batch_size
    smaller = windows // ranks  # at least 1; ceil(windows / smaller) >= ranks
    if bars:  # one rank says it (a warning: shown with --no-progress too)
        log.warning("%d calibration windows in batches of %d leave ranks without data: batches of %d instead", windows, batch_size, smaller)
    return smaller


def _run_block_stages(state: RunState, block_stages: list, ctx: BlockContext) -> None:
    """Each block-scope stage (AWQ, SmoothQuant, block-wise reconstruction) on the block's
    linears it targets; stages that learn together (:func:`joint_runs`) in one call, each
    target with its own grid (``ctx.grids``)."""
    linears = local_all(ctx.block, ctx.prefix)
    for run in joint_runs(block_stages):
        sel, grids = {}, {}
        for _, st in run:
            for loc, full in linears.items():
                if loc not in sel and st.matches(full, True):
                    sel[loc], grids[loc] = full, getattr(st.config, "weights", None)
        if sel:
            si, st = run[0]
            t = time.perf_counter()
            METHODS[st.method].apply(dataclasses.replace(ctx, targets=sel, grids=grids if len(run) > 1 else None), st.config)
            key = f"stage{si}:{st.method}"
            state.seconds[key] = state.seconds.get(key, 0.0) + time.perf_counter() - t


def _solve_block(
    state: RunState, opts: EngineOptions, block: nn.Module, prefix: str, inputs: ActivationStore, call_args: list, keep_outputs: bool
) -> ActivationStore | None:
    """Compress one block's targeted linears; its outputs for the next block (None when
    ``keep_outputs`` is False and the grouped path need not compute them)."""
    local = state.local_targets(prefix)
    if opts.true_sequential and opts.fused and fusable(block, state.spec, local):
        t, solve0 = time.perf_counter(), solve_seconds(state.seconds)
        outputs = solve_block_fused(state, block, prefix, local, inputs, call_args)
        state.forward_s += time.perf_counter() - t - (solve_seconds(state.seconds) - solve0)  # forwards only
        return outputs
    groups = state.spec.groups() if opts.true_sequential else (tuple(state.spec.block_linears()),)
    for group in _with_unnamed(groups, local):
        _solve_group(state, block, prefix, local, group, inputs, call_args)
    wrap_act_quant(block, prefix, list(local.values()), state.records)
    return _block_outputs(state, block, inputs, call_args) if keep_outputs else None


def _block_outputs(state: RunState, block: nn.Module, inputs: ActivationStore, call_args: list) -> ActivationStore:
    """The block's outputs on ``inputs``: the next block's inputs."""
    outputs = ActivationStore(state.offload)
    t = time.perf_counter()
    run_batches(block, inputs, call_args, each=lambda _b, y: outputs.append(y))
    state.forward_s += time.perf_counter() - t
    return outputs


def _with_unnamed(groups: tuple[tuple[str, ...], ...], local: dict[str, str]) -> tuple[tuple[str, ...], ...]:
    """Linears of the block that no group names (unusual layouts) join the last group."""
    named = {x for g in groups for x in g}
    extra = tuple(x for x in local if x not in named)
    return groups[:-1] + (groups[-1] + extra,) if extra else groups


def _solve_group(
    state: RunState, block: nn.Module, prefix: str, local: dict[str, str], group: tuple[str, ...], inputs: ActivationStore, call_args: list
) -> None:
    """Statistics of one group's targeted linears from a full pass over the block, then
    their stages; their activation quantizers are wrapped so later groups see them."""
    members = {loc: get_module(block, loc) for loc in group if loc in local}
    if not members:
        return
    member_needs = {loc: state.needs[local[loc]] for loc in members}
    stats: dict[str, dict] = {}
    if any(member_needs.values()):
        t = time.perf_counter()
        stats = collect_stats(block, members, member_needs, inputs, call_args, state.group)
        state.forward_s += time.perf_counter() - t
    state.apply_group([(local[loc], mod, stats.pop(loc, {})) for loc, mod in members.items()])
    wrap_act_quant(block, prefix, [local[loc] for loc in members], state.records)


def _solve_lm_head(model: nn.Module, state: RunState, hidden: ActivationStore) -> None:
    """The head's statistics from the last block's outputs through the final norm (the norm
    runs into an identity tap that stands for the head's input: no [tokens, vocab] logits)."""
    spec = state.spec
    head = get_module(model, spec.lm_head)
    tap = nn.Identity()
    to_head = nn.Sequential(get_module(model, spec.final_norm), tap)
    stats = collect_stats(to_head, {spec.lm_head: tap}, {spec.lm_head: state.needs[spec.lm_head]}, hidden, [((), {})] * len(hidden), state.group)
    state.apply_group([(spec.lm_head, head, stats[spec.lm_head])])
