"""The staged single pass: compress one block in data-flow order for about one forward.

With true-sequential statistics each group of linears (q/k/v, o, gate/up, down) must see
the outputs of the groups compressed before it. Run naively that is one block forward
per group; here each stage's forward stops where the group's input is reached, and what
was already compressed is replayed from a cache instead of recomputed:

1. q/k/v: their shared input (the forward stops there).
2. o: its input (attention output before o), recorded and cached.
3. o's output is computed once from the cache; attention is replaced by a replay of it,
   and the shared input of gate/up is recorded.
4. down: its input, recorded and cached; down's output computed once, the MLP replayed.
The block's outputs then come from a forward where attention and MLP are both replays,
so each linear's matmul runs once.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..arch import ArchSpec, get_module, set_module
from .accumulators import ACCUMULATORS, finish
from .activations import ActivationStore, run_batches
from .block import RunState, wrap_act_quant


def fusable(block: nn.Module, spec: ArchSpec, local: dict[str, str]) -> bool:
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


class _Replay(nn.Module):
    """Stands in for a sub-module (attention or MLP): returns its cached output for batch ``b``."""

    def __init__(self, outputs: ActivationStore, as_tuple: bool):
        super().__init__()
        self.outputs = outputs
        self.as_tuple = as_tuple
        self.b = 0

    def forward(self, *args, **kwargs):
        y = self.outputs[self.b]
        return (y, None) if self.as_tuple else y


class _Passes:
    """Forward passes over one block's batches, with some sub-modules replayed from caches."""

    def __init__(self, block: nn.Module, inputs: ActivationStore, call_args: list, offload):
        self.block, self.inputs, self.call_args, self.offload = block, inputs, call_args, offload
        self.replaced: dict[str, tuple[nn.Module, _Replay]] = {}  # path -> (original, replay)

    def _point(self, b: int) -> None:
        for _, replay in self.replaced.values():
            replay.b = b

    def reach(self, modules: list[nn.Module], each) -> None:
        """``each(b, x)`` with the input of ``modules`` (they share it) for every batch."""
        run_batches(self.block, self.inputs, self.call_args, before=self._point, until=modules, each=each)

    def replay(self, linear_path: str, cached_in: ActivationStore, as_tuple: bool) -> None:
        """Run the (compressed) linear once over its cached inputs; the sub-module holding
        it then returns those outputs instead of recomputing them."""
        lin = get_module(self.block, linear_path)
        out = ActivationStore(self.offload)
        with torch.no_grad():
            for b in range(len(cached_in)):
                out.append(lin(cached_in[b]))
        cached_in.clear()
        path = linear_path.rpartition(".")[0]
        self.replaced[path] = (get_module(self.block, path), _Replay(out, as_tuple))
        set_module(self.block, path, self.replaced[path][1])

    def outputs(self) -> ActivationStore:
        out = ActivationStore(self.offload)
        run_batches(self.block, self.inputs, self.call_args, before=self._point, each=lambda _b, y: out.append(y))
        return out

    def restore(self) -> None:
        for path, (original, replay) in self.replaced.items():
            set_module(self.block, path, original)
            replay.outputs.clear()
        self.replaced = {}


class _GroupInput:
    """The accumulators of a group's shared input (one per statistic serves every member),
    and optionally a cache of that input."""

    def __init__(self, needs: set[str], keep: ActivationStore | None):
        self.accs = {k: ACCUMULATORS[k]() for k in sorted(needs)}
        self.keep = keep

    def add(self, _b: int, x: torch.Tensor) -> None:
        for acc in self.accs.values():
            acc.add(x)
        if self.keep is not None:
            self.keep.append(x)

    def results(self, group) -> dict:
        """The statistics, reduced over the ranks of ``group``; the accumulators are freed."""
        return finish(self.accs, group)


def _copy_stat(v):
    if isinstance(v, torch.Tensor):
        return v.clone()
    if isinstance(v, dict):
        return {k: _copy_stat(x) for k, x in v.items()}
    return v


def _solve_group(
    run: RunState, passes: _Passes, prefix: str, local: dict[str, str], group: tuple[str, ...], keep: ActivationStore | None = None
) -> None:
    """Gather the statistics of ``group``'s shared input (caching it in ``keep``), then
    compress the group's targeted linears and wrap their activation quantizers."""
    mods = {loc: get_module(passes.block, loc) for loc in group}
    needs = {loc: run.needs.get(local.get(loc, ""), set()) for loc in group}
    seen = _GroupInput(set().union(*needs.values()), keep)
    passes.reach(list(mods.values()), seen.add)
    results = seen.results(run.group)
    # a solver may edit its statistics: each linear gets its own copy, except the last one
    # that needs a statistic, which gets the original (a 14336-wide down_proj's float64
    # Hessian is 1.6 GB: a group of one makes no copy)
    solved = [loc for loc in mods if loc in local]
    last = {k: loc for loc in solved for k in needs[loc]}
    items = [(local[loc], mods[loc], {k: results[k] if last[k] == loc else _copy_stat(results[k]) for k in needs[loc]}) for loc in solved]
    del results
    run.apply_group(items)
    wrap_act_quant(passes.block, prefix, [local[loc] for loc in group if loc in local], run.records)


def solve_block_fused(
    run: RunState, block: nn.Module, prefix: str, local: dict[str, str], inputs: ActivationStore, call_args: list
) -> ActivationStore:
    """Compress the targeted linears of one block (``local``: local -> full name), each
    group's statistics gathered after the earlier groups were compressed; return the
    block's outputs for the next block."""
    spec = run.spec
    passes = _Passes(block, inputs, call_args, run.offload)
    attn_in, mlp_mid = ActivationStore(run.offload), ActivationStore(run.offload)
    try:
        _solve_group(run, passes, prefix, local, (spec.q, spec.k, spec.v))
        _solve_group(run, passes, prefix, local, (spec.o,), keep=attn_in)
        passes.replay(spec.o, attn_in, as_tuple=True)
        _solve_group(run, passes, prefix, local, (spec.gate, spec.up))
        _solve_group(run, passes, prefix, local, (spec.down,), keep=mlp_mid)
        passes.replay(spec.down, mlp_mid, as_tuple=False)
        return passes.outputs()
    finally:
        passes.restore()
        attn_in.clear()
        mlp_mid.clear()
