"""A decoder block's calibration activations: captured once, stored, and run through the block.

``capture_block_inputs`` records what enters every block (hidden states of block 0, each
block's keyword arguments); ``ActivationStore`` keeps per-batch tensors in memory or on
disk; ``run_batches`` is the one loop that runs a block over its calibration batches.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn as nn

from ..arch import ArchSpec, get_module


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


def run_batches(
    block: nn.Module,
    inputs: ActivationStore,
    call_args: list,
    *,
    batches: int | None = None,
    each: Callable[[int, torch.Tensor], None] | None = None,
    before: Callable[[int], None] | None = None,
    until: Sequence[nn.Module] = (),
) -> None:
    """Run ``block`` on its calibration batches (the first ``batches`` of them), without grad.

    ``each(b, y)`` receives batch ``b``'s hidden-state output (the first element of a
    tuple output). ``before(b)`` runs ahead of batch ``b``. With ``until``, each forward
    stops when the first of those sub-modules is called and ``each`` receives that
    sub-module's input instead. An output is dropped before the next batch runs, so only
    what ``each`` keeps stays in memory.
    """
    n = len(inputs) if batches is None else min(batches, len(inputs))
    for b in range(n):
        if before is not None:
            before(b)
        args, kwargs = call_args[b]
        with torch.no_grad():
            y = _forward_until(block, inputs[b], args, kwargs, until) if until else block(inputs[b], *args, **kwargs)
            if isinstance(y, tuple):
                y = y[0]
            if each is not None:
                each(b, y)
        del y


class _Reached(Exception):
    """Carries the input of a sub-module out of a forward that ends there."""

    def __init__(self, x: torch.Tensor):
        super().__init__()
        self.x = x


def _raise_input(_module: nn.Module, inputs: tuple) -> None:
    raise _Reached(inputs[0].detach())


def _forward_until(block: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict, until: Sequence[nn.Module]) -> torch.Tensor:
    """The input of the first of ``until`` that ``block``'s forward calls; the rest of the
    forward is skipped (a forward hook can end a forward only by raising)."""
    handles = [m.register_forward_pre_hook(_raise_input) for m in until]
    try:
        block(x, *args, **kwargs)
    except _Reached as reached:
        return reached.x
    finally:
        for h in handles:
            h.remove()
    raise RuntimeError(f"the block's forward never reached {[type(m).__name__ for m in until]}")
