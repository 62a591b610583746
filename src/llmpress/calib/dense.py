"""The dense model run block by block over calibration windows, for ``plan-bits``
(llmpress/bitplan.py): each decoder block's linears' Hessians ``H = 2/n X^T X`` (one matrix for
the linears that read the same input) and, where asked, a token-weighted cost Hessian per
linear; the block's inputs, call arguments and outputs, so a block can be re-run with one linear
changed (:func:`block_output_cost`, EXL2's measurement) or learned at a setting. One block's
matrices are alive at a time."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .. import progress
from ..arch import get_arch, get_module
from .accumulators import HessianAccumulator
from .activations import ActivationStore, capture_block_inputs, run_batches

__all__ = ["DenseBlock", "block_hessians", "block_output_cost", "collect_hessians", "dense_blocks", "shared_inputs", "split_block"]


def shared_inputs(model: nn.Module, names: list[str]) -> dict[str, str]:
    """name -> the first of ``names`` that reads the same input (the linears one norm feeds,
    q/k/v and gate/up, share it: one Hessian serves them all)."""
    spec = get_arch(model)
    first: dict[tuple[str, int], str] = {}
    owner = {}
    for n in names:
        prefix, local = split_block(n, spec.blocks)
        k = next((i for i, f in enumerate(spec.norm_feeds) if local in f.linears), None)
        owner[n] = n if k is None else first.setdefault((prefix, k), n)
    return owner


def split_block(name: str, blocks: str) -> tuple[str, str]:
    """'model.layers.3.mlp.up_proj' -> ('model.layers.3', 'mlp.up_proj')."""
    idx, _, local = name[len(blocks) + 1 :].partition(".")
    return f"{blocks}.{idx}", local


def collect_hessians(model: nn.Module, names: list[str], windows: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """H = 2/n X^T X of each named linear of the decoder blocks from a dense pass over
    ``windows`` (one matrix, the same tensor, for the linears that read the same input)."""
    return {n: H for blk in block_hessians(model, names, windows, batch_size) for n, H in blk.items()}


def block_hessians(model: nn.Module, names: list[str], windows: torch.Tensor, batch_size: int = 8) -> Iterator[dict[str, torch.Tensor]]:
    """Per decoder block in order, ``H = 2/n X^T X`` of its linears among ``names`` (in
    ``names`` order), from the dense model run block by block over ``windows``: the blocks'
    inputs are kept (one hidden state per window), and only one block's matrices are alive
    while the caller uses them (one tensor for the linears that read the same input)."""
    return (d.hessians for d in dense_blocks(model, names, windows, batch_size))


@dataclass(kw_only=True)
class DenseBlock:
    """One decoder block of the dense pass: its linears' Hessians, and what re-running it
    needs (its inputs and call arguments per batch, its dense outputs as references)."""

    layer: nn.Module
    hessians: dict[str, torch.Tensor]
    inputs: ActivationStore
    call_args: list
    outputs: ActivationStore
    cost_hessians: dict[str, torch.Tensor] = field(default_factory=dict)  # token-weighted (per linear), where asked


@torch.no_grad()
def dense_blocks(
    model: nn.Module,
    names: list[str],
    windows: torch.Tensor,
    batch_size: int = 8,
    last_outputs: bool = False,
    token_weights: dict[str, torch.Tensor] | None = None,
) -> Iterator[DenseBlock]:
    """The dense model run block by block over ``windows`` (:func:`block_hessians`); each
    block handed over with its inputs and outputs before the next block runs (the last
    block's outputs only with ``last_outputs``: they feed nothing). ``token_weights``: per
    linear, a weight per token of ``windows`` (their shape); such a linear also gets its own
    ``2/n sum_t a_t x_t x_t^T`` in ``cost_hessians`` (q, k and v each one: their gradients differ)."""
    spec = get_arch(model)
    owner = shared_inputs(model, names)
    dev = next(model.parameters()).device
    inputs = ActivationStore()
    call_args = capture_block_inputs(model, spec, list(windows.to(dev).split(batch_size)), inputs)
    layers = get_module(model, spec.blocks)
    by_block: dict[str, list[str]] = {}
    for n in names:
        by_block.setdefault(split_block(n, spec.blocks)[0], []).append(n)
    for i in progress.track(range(len(layers)), "plan-bits: Hessians and layer errors", "block"):
        mine = by_block.get(f"{spec.blocks}.{i}", [])
        accs = {n: HessianAccumulator() for n in mine if owner[n] == n}
        handles = [get_module(model, n).register_forward_hook(lambda _m, inp, _o, a=accs[n]: a.add(inp[0].detach())) for n in accs]
        weighted = {n: HessianAccumulator() for n in mine if token_weights is not None and n in token_weights}
        handles += [get_module(model, n).register_forward_hook(_weighted_hook(a, token_weights[n])) for n, a in weighted.items()]
        outputs = ActivationStore()
        try:
            keep = outputs.append if (i + 1 < len(layers) or last_outputs) else None
            run_batches(layers[i], inputs, call_args[i], each=None if keep is None else lambda _b, y, k=keep: k(y))
        finally:
            for h in handles:
                h.remove()
        done = {n: a.result() for n, a in accs.items()}
        costs = {n: a.result() for n, a in weighted.items()}
        del accs, weighted
        yield DenseBlock(
            layer=layers[i], hessians={n: done[owner[n]] for n in mine}, inputs=inputs, call_args=call_args[i], outputs=outputs, cost_hessians=costs
        )
        del done, costs
        inputs.clear()
        inputs = outputs


def _weighted_hook(acc: HessianAccumulator, weights: torch.Tensor):
    """A forward hook adding its linear's input, each token scaled by the square root of its
    weight, to ``acc``; the batches come in window order, so a running offset finds them."""
    flat = weights.reshape(-1).float()
    pos = [0]

    def hook(_m, inp, _o):
        x = inp[0].detach()
        x = x.reshape(-1, x.shape[-1]).float()
        w = flat[pos[0] : pos[0] + x.shape[0]].to(x.device)
        pos[0] += x.shape[0]
        acc.add(x * w.sqrt().unsqueeze(1))

    return hook


@torch.no_grad()
def block_output_cost(
    block: DenseBlock, linear: nn.Linear, w_hat: torch.Tensor, batches: int, fisher: torch.Tensor | None = None, tokens: torch.Tensor | None = None
) -> float:
    """The error of ``block``'s output with ``linear`` (one of its linears) set to ``w_hat``
    and the rest dense, on its first ``batches`` calibration batches: the mean over tokens of
    ``sum_c f_c (y_c - y_dense_c)^2`` (``fisher`` f per hidden channel of the block's output;
    1 without; ``tokens``: a weight per token of the calibration windows, their shape). What
    EXL2's measurement pass measures: the attention softmax and the MLP's gate see the error,
    which a linear's own output error does not say."""
    dense = linear.weight.detach().clone()
    total, count = [0.0], [0]
    flat = None if tokens is None else tokens.reshape(-1).double()

    def each(b: int, y: torch.Tensor) -> None:
        d = (y.float() - block.outputs[b].float()).pow(2).reshape(-1, y.shape[-1])
        if flat is not None:
            d = d * flat[count[0] : count[0] + d.shape[0]].to(d.device, d.dtype).unsqueeze(1)
        total[0] += float(d.sum(0).double() @ fisher) if fisher is not None else float(d.sum())
        count[0] += d.shape[0]

    try:
        linear.weight.copy_(w_hat.to(dense.dtype))
        run_batches(block.layer, block.inputs, block.call_args, batches=batches, each=each)
    finally:
        linear.weight.copy_(dense)
    return 2.0 * total[0] / max(count[0], 1)  # 2x: the layer measure's H = 2/n X^T X convention
