"""What the engine does inside one decoder block: gather statistics, apply stages.

``collect_stats`` runs a block's calibration batches with accumulators on the inputs of
some of its sub-modules; ``RunState`` applies each targeted linear's stages and keeps the
records and timings of the whole run; ``BlockContext`` is what a block-scope method sees.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..arch import ArchSpec, get_module, set_module
from ..eval.memory import trim_malloc
from ..recipe import Stage
from ..registry import ModuleContext, ModuleRecord, get_method
from ..runtime.act_quant import ActQuantLinear
from .accumulators import ACCUMULATORS, Accumulator, finish
from .activations import ActivationStore, run_batches
from .dist import ONE_RANK, Group


def attach(modules: dict[str, nn.Module], needs: dict[str, set[str]]):
    """One accumulator per needed statistic on each module's input (forward pre-hooks)."""
    accs: dict[str, dict[str, Accumulator]] = {}
    handles = []
    for name, mod in modules.items():
        if not needs.get(name):
            continue
        accs[name] = {k: ACCUMULATORS[k]() for k in sorted(needs[name])}
        handles.append(mod.register_forward_pre_hook(_feeder(accs[name])))
    return accs, handles


def _feeder(accs: dict[str, Accumulator]):
    def hook(_m, inputs):
        x = inputs[0].detach()
        for a in accs.values():
            a.add(x)

    return hook


def collect_stats(
    runner: nn.Module, modules: dict[str, nn.Module], needs: dict[str, set[str]], inputs: ActivationStore, call_args: list, group: Group = ONE_RANK
) -> dict[str, dict]:
    """Statistics of each named module's input over the calibration batches run through
    ``runner`` (the block, or whatever leads to the modules), reduced over the ranks of
    ``group``; the accumulators are freed."""
    accs, handles = attach(modules, needs)
    try:
        run_batches(runner, inputs, call_args)
    finally:
        for h in handles:
            h.remove()
    return {name: finish(accs[name], group) for name in sorted(accs)}


def apply_stages(
    name: str, module: nn.Module, stages: tuple[tuple[int, Stage], ...], stats: dict, records: dict, seconds: dict, settings: dict | None = None
) -> None:
    """Run each (index, stage) handler on one linear, timing it under ``stage{i}:{method}``;
    ``settings``: what model-scope stages left for this linear (``ModuleContext.settings``)."""
    rec = records.setdefault(name, ModuleRecord(name=name, out_features=module.out_features, in_features=module.in_features))
    for j, (i, st) in enumerate(stages):
        t = time.perf_counter()
        later = {k for _, s in stages[j + 1 :] for k in get_method(s.method).needs}
        last = frozenset(k for k in get_method(st.method).needs if k not in later)
        ctx = ModuleContext(name=name, module=module, stats=stats, record=rec, settings=settings or {}, last_use=last)
        get_method(st.method).apply(ctx, st.config)
        rec.methods.append(st.method)
        seconds[f"stage{i}:{st.method}"] = seconds.get(f"stage{i}:{st.method}", 0.0) + time.perf_counter() - t


def wrap_act_quant(root: nn.Module, prefix: str, names: list[str], records: dict) -> None:
    """Wrap each named linear whose record asks for activation quantization (once)."""
    for n in names:
        rec = records.get(n)
        if rec is not None and rec.act_args is not None:
            local = n[len(prefix) + 1 :] if prefix else n
            lin = get_module(root, local)
            if not isinstance(lin, ActQuantLinear):
                set_module(root, local, ActQuantLinear(lin, rec.act_args))


def solve_seconds(seconds: dict) -> float:
    """Seconds spent in stage handlers so far."""
    return sum(v for k, v in seconds.items() if k.startswith("stage"))


@dataclass(kw_only=True)
class RunState:
    """One engine run: the plan's targets and needs, and what the run produced."""

    spec: ArchSpec
    targets: dict[str, tuple[tuple[int, Stage], ...]]  # full name -> (index, stage) pairs acting on it
    needs: dict[str, frozenset[str]]  # full name -> statistics its stages need
    settings: dict[str, dict] = field(default_factory=dict)  # full name -> settings from model-scope stages
    offload: Path | None = None  # folder for activations kept on disk
    records: dict[str, ModuleRecord]
    seconds: dict[str, float]
    forward_s: float = 0.0  # calibration forwards (solvers excluded)
    group: Group = field(default_factory=Group)  # data-parallel ranks (llmpress.calib.dist)

    def apply(self, name: str, module: nn.Module, stats: dict) -> None:
        apply_stages(name, module, self.targets[name], stats, self.records, self.seconds, self.settings.get(name))
        trim_malloc()  # a solver's freed temporaries would stay resident (malloc's arenas) and pile up layer after layer

    def apply_group(self, items: list[tuple[str, nn.Module, dict]]) -> None:
        """(full name, module, statistics) of linears solved at the same point: with several
        ranks each is solved on one rank (by cost) and its weight and record broadcast from
        there, in the order given; on one rank, :meth:`apply` each."""
        if not self.group.active:
            for name, mod, stats in items:
                self.apply(name, mod, stats)
            return
        owners = self.group.assign({name: _solve_cost(mod, self.needs.get(name, ())) for name, mod, _ in items})
        for name, mod, stats in items:
            if owners[name] == self.group.rank:
                self.apply(name, mod, stats)
        for name, mod, _ in items:
            self.group.broadcast_(mod.weight.data, owners[name])
            if mod.bias is not None:
                self.group.broadcast_(mod.bias.data, owners[name])
            self.records[name] = self.group.broadcast(self.records.get(name), owners[name])

    def local_targets(self, prefix: str) -> dict[str, str]:
        """The targeted linears under ``prefix``: local name -> full name."""
        return {n[len(prefix) + 1 :]: n for n in self.targets if n.startswith(prefix + ".")}


def _solve_cost(module: nn.Module, needs) -> float:
    """Relative cost of a linear's solve: second-order solvers ~ out * in^2, the rest ~ out * in."""
    n = float(module.out_features * module.in_features)
    return n * module.in_features if "hessian" in needs else n


def local_all(block: nn.Module, prefix: str) -> dict[str, str]:
    return {n: f"{prefix}.{n}" for n, m in block.named_modules() if isinstance(m, nn.Linear)}


@dataclass(kw_only=True)
class BlockContext:
    """What a block-scope method sees: one decoder block, its calibration inputs, its targets.

    ``collect`` runs the calibration batches through the block with accumulators on the
    named sub-modules' inputs; ``outputs`` runs it and returns what it produces (to score
    a candidate transform against the original outputs); ``run`` runs it (or a copy) and
    hands each batch's output to a callback.
    """

    index: int
    prefix: str
    block: nn.Module
    spec: ArchSpec
    inputs: ActivationStore
    call_args: list
    targets: dict[str, str]  # local name -> full name, linears this stage targets
    records: dict[str, ModuleRecord]
    group: Group = field(default_factory=Group)  # data-parallel ranks: ``inputs`` are this rank's share
    total_batches: int | None = None  # calibration batches over all ranks (default: len(inputs))
    batch_windows: int | None = None  # windows per batch (default: the first batch's)
    # the full-precision model's inputs of this block and this block's outputs on them, per
    # batch: only when a block stage's config has ``needs_fp_stream`` (None otherwise)
    fp_inputs: ActivationStore | None = None
    fp_outputs: ActivationStore | None = None
    # local name -> grid (QuantArgs) of each target, when stages that differ only in their
    # grid run as one call (a method registered with ``joint_grids``); None: the config's own
    grids: dict[str, Any] | None = None
    # local name -> what model-scope stages left for that linear (lowrank_alloc's "rank")
    settings: dict[str, dict] = field(default_factory=dict)
    _first: list = field(default_factory=list, repr=False)  # the global first batches gathered here (several ranks)

    def grid(self, loc: str, default):
        """The grid of target ``loc``: its own in a joint call (``grids``), else ``default``."""
        return (self.grids or {}).get(loc) or default

    @property
    def n_batches(self) -> int:
        return len(self.inputs) if self.total_batches is None else self.total_batches

    @property
    def windows_per_batch(self) -> int:
        return self.batch_windows or (self.inputs[0].shape[0] if len(self.inputs) else 0)

    def collect(self, needs: dict[str, set[str]]) -> dict[str, dict]:
        """Statistics over every calibration batch (all ranks')."""
        mods = {loc: get_module(self.block, loc) for loc in needs}
        return collect_stats(self.block, mods, needs, self.inputs, self.call_args, self.group)

    def run(self, *, block: nn.Module | None = None, batches: int | None = None, each=None) -> None:
        """Run ``block`` (default this block; a modified copy to score it) on the first
        ``batches`` calibration batches (of all ranks: every rank runs the same ones, so a
        search finds the same transform everywhere); ``each(b, y)`` receives each output."""
        inputs, call_args = self._leading(batches)
        run_batches(self.block if block is None else block, inputs, call_args, batches=batches, each=each)

    def _leading(self, batches: int | None):
        """(inputs, call arguments) holding the first ``batches`` batches of all ranks: this
        rank's own on one rank; else gathered once from the ranks that hold them."""
        if not self.group.active:
            return self.inputs, self.call_args
        n = self.n_batches if batches is None else min(batches, self.n_batches)
        mine = self.group.share(self.n_batches)
        for g in range(len(self._first), n):
            owner = self.group.owner_of(g, self.n_batches)
            local = g - mine.start
            self._first.append(self.group.broadcast((self.inputs[local], self.call_args[local]) if owner == self.group.rank else None, owner))
        return [x for x, _ in self._first], [a for _, a in self._first]

    def outputs(self, module: nn.Module | None = None, batches: int | None = None) -> list[torch.Tensor]:
        """Outputs of ``module`` (a sub-module of the block, default the block) per batch."""
        got: list[torch.Tensor] = []
        target = module if module is not None else self.block
        h = target.register_forward_hook(lambda _m, _i, o: got.append(o[0] if isinstance(o, tuple) else o))
        try:
            self.run(batches=batches)
        finally:
            h.remove()
        return got

    def record(self, local: str) -> ModuleRecord:
        mod = get_module(self.block, local)
        full = f"{self.prefix}.{local}"
        return self.records.setdefault(full, ModuleRecord(name=full, out_features=mod.out_features, in_features=mod.in_features))
