"""The sequential engine: compress a model block by block on calibration data.

1. Capture the inputs of every decoder block for each calibration batch by swapping the
   blocks for pass-through recorders and running the model once: only embeddings run;
   each recorder keeps its block's keyword arguments (masks, rotary embeddings), the
   first one the hidden states.
2. For each block: attach the statistics accumulators that the stages targeting its
   linears need, run the calibration batches through the block, call each stage's
   handler per module, then run the block again so the next block sees the compressed
   outputs. With ``true_sequential`` the linears are taken group by group in data-flow
   order (q/k/v, o, gate/up, down), each group's statistics gathered after the earlier
   groups were compressed.
Only one block's inputs and outputs are held at a time (optionally on disk).
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .. import progress
from ..arch import ArchSpec, get_module, set_module
from ..calib.accumulators import ACCUMULATORS, Accumulator
from ..eval.memory import trim_malloc
from ..recipe import Recipe, Stage
from ..registry import METHODS, ModuleContext, ModuleRecord, get_method
from ..runtime.act_quant import ActQuantLinear

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class EngineOptions:
    batch_size: int = 8
    # statistics of each group of linears gathered after the earlier groups were compressed
    true_sequential: bool = True
    # with true_sequential, the staged single pass (see _solve_block_fused): about the cost
    # of one block forward per block, on blocks with the standard attention + MLP layout
    fused: bool = True
    offload_dir: str | None = None  # keep block activations on disk instead of in memory
    progress: bool = True


@dataclass
class EngineResult:
    records: dict[str, ModuleRecord]
    seconds: dict[str, float] = field(default_factory=dict)


class ActivationStore:
    """A list of per-batch tensors, in memory or as safetensors files in a folder."""

    def __init__(self, folder: Path | None = None):
        self.folder = folder
        self.items: list = []

    def append(self, t: torch.Tensor) -> None:
        if self.folder is None:
            self.items.append(t)
            return
        from safetensors.torch import save_file

        path = self.folder / f"act-{id(self)}-{len(self.items)}.safetensors"
        save_file({"x": t.detach().cpu().contiguous()}, str(path))
        self.items.append((path, t.device, t.dtype))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        it = self.items[i]
        if self.folder is None:
            return it
        from safetensors.torch import load_file

        path, device, dtype = it
        return load_file(str(path))["x"].to(device=device, dtype=dtype)

    def clear(self) -> None:
        if self.folder is not None:
            for it in self.items:
                Path(it[0]).unlink(missing_ok=True)
        self.items = []


class _Recorder(nn.Module):
    """Stands in for a decoder block during input capture: records, runs nothing."""

    def __init__(self, block: nn.Module, index: int, sink: dict):
        super().__init__()
        self.index = index
        self.sink = sink
        # attributes models read from their blocks while looping (gemma3: attention_type)
        for attr in ("attention_type", "layer_idx"):
            if hasattr(block, attr):
                setattr(self, attr, getattr(block, attr))

    def forward(self, hidden_states, *args, **kwargs):
        if self.index == 0:
            self.sink["hidden"].append(hidden_states)
        kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_value", None)
        self.sink["kwargs"][self.index].append((args, kwargs))
        return hidden_states


def capture_block_inputs(model: nn.Module, spec: ArchSpec, batches: list[torch.Tensor], store: ActivationStore):
    """Hidden states entering block 0, and each block's call arguments, per batch."""
    layers = get_module(model, spec.blocks)
    sink = {"hidden": [], "kwargs": defaultdict(list)}
    originals = list(layers)
    for i, blk in enumerate(originals):
        layers[i] = _Recorder(blk, i, sink)
    base = get_module(model, spec.blocks.rsplit(".", 1)[0])
    try:
        with torch.no_grad():
            for ids in batches:
                base(input_ids=ids, use_cache=False)
                store.append(sink["hidden"].pop())
    finally:
        for i, blk in enumerate(originals):
            layers[i] = blk
    return sink["kwargs"]


def _run_block(block: nn.Module, store: ActivationStore, call_args: list, out: ActivationStore | None) -> None:
    with torch.no_grad():
        for b in range(len(store)):
            args, kwargs = call_args[b]
            y = block(store[b], *args, **kwargs)
            if isinstance(y, tuple):
                y = y[0]
            if out is not None:
                out.append(y)


def _attach(modules: dict[str, nn.Module], needs: dict[str, set[str]]):
    accs: dict[str, dict[str, Accumulator]] = {}
    handles = []
    for name, mod in modules.items():
        if not needs.get(name):
            continue
        accs[name] = {k: ACCUMULATORS[k]() for k in sorted(needs[name])}

        def hook(_m, inputs, _accs=accs[name]):
            x = inputs[0].detach()
            for a in _accs.values():
                a.add(x)

        handles.append(mod.register_forward_pre_hook(hook))
    return accs, handles


def _apply_stages(name: str, module: nn.Module, stages: list[Stage], stats: dict, records: dict, seconds: dict) -> None:
    rec = records.setdefault(name, ModuleRecord(name=name, out_features=module.out_features, in_features=module.in_features))
    for i, st in stages:
        t = time.perf_counter()
        get_method(st.method).apply(ModuleContext(name=name, module=module, stats=stats, record=rec), st.config)
        rec.methods.append(st.method)
        seconds[f"stage{i}:{st.method}"] = seconds.get(f"stage{i}:{st.method}", 0.0) + time.perf_counter() - t


def _wrap_act_quant(root: nn.Module, prefix: str, names: list[str], records: dict) -> None:
    for n in names:
        rec = records.get(n)
        if rec is not None and rec.act_args is not None:
            local = n[len(prefix) + 1 :] if prefix else n
            lin = get_module(root, local)
            if not isinstance(lin, ActQuantLinear):
                set_module(root, local, ActQuantLinear(lin, rec.act_args))


@dataclass(kw_only=True)
class BlockContext:
    """What a block-scope method sees: one decoder block, its calibration inputs, its targets.

    ``collect`` runs the calibration batches through the block with accumulators on the
    named sub-modules' inputs; ``outputs`` runs it and returns what it produces (to score
    a candidate transform against the original outputs).
    """

    index: int
    prefix: str
    block: nn.Module
    spec: ArchSpec
    inputs: ActivationStore
    call_args: list
    targets: dict[str, str]  # local name -> full name, linears this stage targets
    records: dict[str, ModuleRecord]

    def collect(self, needs: dict[str, set[str]]) -> dict[str, dict]:
        mods = {loc: get_module(self.block, loc) for loc in needs}
        accs, handles = _attach(mods, needs)
        try:
            _run_block(self.block, self.inputs, self.call_args, None)
        finally:
            for h in handles:
                h.remove()
        out = {}
        for loc, a in accs.items():
            out[loc] = {k: acc.result() for k, acc in a.items()}
            for acc in a.values():
                acc.free()
        return out

    def outputs(self, module: nn.Module | None = None, batches: int | None = None) -> list[torch.Tensor]:
        """Outputs of ``module`` (a sub-module of the block, default the block) per batch."""
        got: list[torch.Tensor] = []
        target = module if module is not None else self.block
        h = target.register_forward_hook(lambda _m, _i, o: got.append(o[0] if isinstance(o, tuple) else o))
        try:
            n = len(self.inputs) if batches is None else min(batches, len(self.inputs))
            with torch.no_grad():
                for b in range(n):
                    args, kwargs = self.call_args[b]
                    self.block(self.inputs[b], *args, **kwargs)
        finally:
            h.remove()
        return got

    def record(self, local: str) -> ModuleRecord:
        mod = get_module(self.block, local)
        full = f"{self.prefix}.{local}"
        return self.records.setdefault(full, ModuleRecord(name=full, out_features=mod.out_features, in_features=mod.in_features))


def plan(model: nn.Module, spec: ArchSpec, recipe: Recipe) -> dict[str, list[tuple[int, Stage]]]:
    """Map each targeted linear's full name to the (index, stage) pairs that act on it."""
    out: dict[str, list[tuple[int, Stage]]] = {}
    prefix = spec.blocks + "."
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        in_blocks = name.startswith(prefix)
        sts = [(i, s) for i, s in enumerate(recipe.stages) if METHODS[s.method].scope == "module" and s.matches(name, in_blocks)]
        if sts:
            out[name] = sts
    return out


def _desc(recipe: Recipe) -> str:
    """The engine's bar names the methods it runs: ``compress (awq, gptq)``."""
    names = dict.fromkeys(s.method for s in recipe.stages if METHODS[s.method].scope != "model")
    return f"compress ({', '.join(names)})" if names else "compress"


def run(model: nn.Module, spec: ArchSpec, recipe: Recipe, calib: torch.Tensor | None, opts: EngineOptions | None = None) -> EngineResult:
    """Apply the recipe's module stages; sequentially over blocks when any stage needs data.
    ``opts.progress`` False silences every bar and notice below (block-scope methods too)."""
    opts = opts or EngineOptions()
    with progress.scope(opts.progress):
        return _run(model, spec, recipe, calib, opts)


def _run(model: nn.Module, spec: ArchSpec, recipe: Recipe, calib: torch.Tensor | None, opts: EngineOptions) -> EngineResult:
    targets = plan(model, spec, recipe)
    records: dict[str, ModuleRecord] = {}
    seconds: dict[str, float] = {}
    needs = {n: {a for _, s in sts for a in METHODS[s.method].needs} for n, sts in targets.items()}
    block_stages = [(i, s) for i, s in enumerate(recipe.stages) if METHODS[s.method].scope == "block"]
    if not any(needs.values()) and not block_stages:
        for name, sts in progress.track(targets.items(), _desc(recipe), "linear", on=opts.progress):
            _apply_stages(name, get_module(model, name), sts, {}, records, seconds)
            trim_malloc()  # a layer's temporaries, freed between kept qparams, go back (up to ~150 MB on SmolLM2)
        _wrap_act_quant(model, "", list(targets), records)
        return EngineResult(records, seconds)
    if calib is None:
        raise ValueError("this recipe needs calibration data (a stage gathers statistics)")
    outside = [n for n in targets if not n.startswith(spec.blocks + ".") and needs[n]]
    if any(n != spec.lm_head for n in outside):
        raise ValueError(f"statistics for linears outside the decoder blocks are only gathered for {spec.lm_head}: {outside}")

    device = next(model.parameters()).device
    tmp = None
    if opts.offload_dir:
        Path(opts.offload_dir).expanduser().mkdir(parents=True, exist_ok=True)  # a new folder is fine
        tmp = Path(tempfile.mkdtemp(prefix="llmpress-act-", dir=Path(opts.offload_dir).expanduser()))
    try:
        return _run_sequential(model, spec, targets, needs, calib.to(device), opts, tmp, records, seconds, block_stages, _desc(recipe))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _copy_stat(v):
    if isinstance(v, torch.Tensor):
        return v.clone()
    if isinstance(v, dict):
        return {k: _copy_stat(x) for k, x in v.items()}
    return v


def _solve_seconds(seconds: dict) -> float:
    return sum(v for k, v in seconds.items() if k.startswith("stage"))


class _Stop(Exception):
    """Ends a block forward once the inputs a stage needs were seen."""


class _Replay(nn.Module):
    """Stands in for a sub-module (attention or MLP): returns its cached output for batch ``b``."""

    def __init__(self, outputs: "ActivationStore", as_tuple: bool):
        super().__init__()
        self.outputs = outputs
        self.as_tuple = as_tuple
        self.b = 0

    def forward(self, *args, **kwargs):
        y = self.outputs[self.b]
        return (y, None) if self.as_tuple else y


def _fusable(block: nn.Module, spec: ArchSpec, local: dict[str, str]) -> bool:
    """The staged pass needs the standard layout: every targeted linear one of the arch's
    seven, attention and MLP as sub-modules, the MLP's input linears sharing one input."""
    names = set(spec.block_linears())
    if not local or not set(local) <= names or spec.gate is None:
        return False
    try:
        for path in names:
            if not isinstance(get_module(block, path), nn.Linear):
                return False
        get_module(block, spec.o.rpartition(".")[0])
        get_module(block, spec.down.rpartition(".")[0])
    except (AttributeError, IndexError):
        return False
    return True


def _solve_block_fused(block, spec, prefix, local, targets, needs, inputs, call_args, tmp, records, seconds):
    """Compress one block in data-flow order for about the cost of one forward pass.

    Stage 1: the shared input of q/k/v (the first of them to run records it, then the
    forward stops). Stage 2: with q/k/v compressed, the input of o (attention output
    before o), recorded and cached. Stage 3: o's output computed once from the cache; the
    attention module is replaced by a replay of it, and the shared input of gate/up is
    recorded. Stage 4: with gate/up compressed, down's input recorded and cached.
    Output: attention and MLP both replayed (MLP = compressed down on the cached input),
    so each linear's matmul runs once. Statistics of every group are gathered after the
    earlier groups were compressed (true sequential).
    """
    attn_path = spec.o.rpartition(".")[0]
    mlp_path = spec.down.rpartition(".")[0]
    attn_mod, mlp_mod = get_module(block, attn_path), get_module(block, mlp_path)
    groups = ((spec.q, spec.k, spec.v), (spec.o,), (spec.gate, spec.up), (spec.down,))

    def stage(group, keep: "ActivationStore | None"):
        """Run every batch until the group's shared input is seen; gather stats, maybe keep it."""
        mods = {loc: get_module(block, loc) for loc in group}
        mneeds = {loc: needs.get(local.get(loc, ""), set()) for loc in group}
        # the group's linears share one input: one accumulator per statistic serves them all
        accs = {k: ACCUMULATORS[k]() for k in sorted(set().union(*mneeds.values()))}

        def hook(_m, inp):
            x = inp[0].detach()
            for acc in accs.values():
                acc.add(x)
            if keep is not None:
                keep.append(x)
            raise _Stop

        handles = [m.register_forward_pre_hook(hook) for m in mods.values()]
        try:
            with torch.no_grad():
                for b in range(len(inputs)):
                    for r in replays:
                        r.b = b
                    args, kwargs = call_args[b]
                    try:
                        block(inputs[b], *args, **kwargs)
                    except _Stop:
                        pass
                    else:
                        raise RuntimeError(f"{prefix}: the forward never reached {group}")
        finally:
            for h in handles:
                h.remove()
        results = {k: acc.result() for k, acc in accs.items()}
        for acc in accs.values():
            acc.free()
        for loc, mod in mods.items():
            if loc in local:
                st = {k: _copy_stat(results[k]) for k in mneeds[loc]}  # a solver may edit its copy
                _apply_stages(local[loc], mod, targets[local[loc]], st, records, seconds)
        _wrap_act_quant(block, prefix, [local[loc] for loc in group if loc in local], records)

    replays: list[_Replay] = []

    def replay(sub_path: str, linear_path: str, cached_in: ActivationStore, as_tuple: bool) -> None:
        """Run the (compressed) linear once over its cached inputs; the sub-module at
        ``sub_path`` then returns those outputs instead of recomputing them."""
        lin = get_module(block, linear_path)
        out = ActivationStore(tmp)
        with torch.no_grad():
            for b in range(len(cached_in)):
                out.append(lin(cached_in[b]))
        cached_in.clear()
        replays.append(_Replay(out, as_tuple))
        set_module(block, sub_path, replays[-1])

    attn_in, mlp_mid = ActivationStore(tmp), ActivationStore(tmp)
    outputs = ActivationStore(tmp)
    try:
        stage(groups[0], None)
        stage(groups[1], attn_in)
        replay(attn_path, spec.o, attn_in, as_tuple=True)
        stage(groups[2], None)
        stage(groups[3], mlp_mid)
        replay(mlp_path, spec.down, mlp_mid, as_tuple=False)
        with torch.no_grad():
            for b in range(len(inputs)):
                for r in replays:
                    r.b = b
                args, kwargs = call_args[b]
                y = block(inputs[b], *args, **kwargs)
                outputs.append(y[0] if isinstance(y, tuple) else y)
    finally:
        set_module(block, attn_path, attn_mod)
        set_module(block, mlp_path, mlp_mod)
        for store in [attn_in, mlp_mid] + [r.outputs for r in replays]:
            store.clear()
    return outputs


def local_all(block: nn.Module, prefix: str) -> dict[str, str]:
    return {n: f"{prefix}.{n}" for n, m in block.named_modules() if isinstance(m, nn.Linear)}


def _run_sequential(model, spec, targets, needs, calib, opts, tmp, records, seconds, block_stages, desc: str = "compress") -> EngineResult:
    batches = list(calib.split(opts.batch_size))
    inputs = ActivationStore(tmp)
    t = time.perf_counter()
    call_args = capture_block_inputs(model, spec, batches, inputs)
    seconds["capture"] = time.perf_counter() - t
    layers = get_module(model, spec.blocks)
    n_blocks = len(layers)
    forward_s = 0.0
    for i in progress.track(range(n_blocks), desc, "block", on=opts.progress):
        block = layers[i]
        prefix = f"{spec.blocks}.{i}"
        local = {n[len(prefix) + 1 :]: n for n in targets if n.startswith(prefix + ".")}
        for si, st in block_stages:
            sel = {loc: full for loc, full in local_all(block, prefix).items() if st.matches(full, True)}
            if sel:
                tb = time.perf_counter()
                METHODS[st.method].apply(BlockContext(index=i, prefix=prefix, block=block, spec=spec, inputs=inputs, call_args=call_args[i], targets=sel, records=records), st.config)
                seconds[f"stage{si}:{st.method}"] = seconds.get(f"stage{si}:{st.method}", 0.0) + time.perf_counter() - tb
        if opts.true_sequential and opts.fused and _fusable(block, spec, local):
            tf, solve0 = time.perf_counter(), _solve_seconds(seconds)
            outputs = _solve_block_fused(block, spec, prefix, local, targets, needs, inputs, call_args[i], tmp, records, seconds)
            forward_s += time.perf_counter() - tf - (_solve_seconds(seconds) - solve0)  # forwards only
            inputs.clear()
            inputs = outputs
            continue
        groups = spec.groups() if opts.true_sequential else (tuple(spec.block_linears()),)
        # linears of this block that no group names (unusual layouts) join the last group
        named = {x for g in groups for x in g}
        extra = tuple(x for x in local if x not in named)
        if extra:
            groups = groups[:-1] + (groups[-1] + extra,)
        for group in groups:
            members = {loc: get_module(block, loc) for loc in group if loc in local}
            if not members:
                continue
            member_needs = {loc: needs[local[loc]] for loc in members}
            stats: dict[str, dict] = {loc: {} for loc in members}
            if any(member_needs.values()):
                accs, handles = _attach(members, member_needs)
                tf = time.perf_counter()
                try:
                    _run_block(block, inputs, call_args[i], None)
                finally:
                    for h in handles:
                        h.remove()
                forward_s += time.perf_counter() - tf
                for loc, a in accs.items():
                    stats[loc] = {k: acc.result() for k, acc in a.items()}
                    for acc in a.values():
                        acc.free()
            for loc, mod in members.items():
                _apply_stages(local[loc], mod, targets[local[loc]], stats[loc], records, seconds)
                stats[loc] = None
            _wrap_act_quant(block, prefix, [local[loc] for loc in members], records)  # later groups see it
        _wrap_act_quant(block, prefix, list(local.values()), records)
        last = i == n_blocks - 1
        if not last or spec.lm_head in needs and needs[spec.lm_head]:
            outputs = ActivationStore(tmp)
            tf = time.perf_counter()
            _run_block(block, inputs, call_args[i], outputs)
            forward_s += time.perf_counter() - tf
            inputs.clear()
            inputs = outputs
    if needs.get(spec.lm_head):
        head = get_module(model, spec.lm_head)
        norm = get_module(model, spec.final_norm)
        accs, handles = _attach({spec.lm_head: head}, {spec.lm_head: needs[spec.lm_head]})
        with torch.no_grad():
            for b in range(len(inputs)):
                head(norm(inputs[b]))
        for h in handles:
            h.remove()
        st = {k: acc.result() for k, acc in accs[spec.lm_head].items()}
        _apply_stages(spec.lm_head, head, targets[spec.lm_head], st, records, seconds)
    lm_only = {n: s for n, s in targets.items() if not n.startswith(spec.blocks + ".") and not needs[n]}
    for name, sts in lm_only.items():
        _apply_stages(name, get_module(model, name), sts, {}, records, seconds)
    _wrap_act_quant(model, "", list(lm_only), records)
    inputs.clear()
    seconds["calibration_forward"] = forward_s
    return EngineResult(records, seconds)
