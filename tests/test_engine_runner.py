"""The engine's one per-batch block runner (calib.activations.run_batches) and the store."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from llmpress.calib.activations import ActivationStore, run_batches
from llmpress.calib.engine import ActivationStore as EngineStore
from llmpress.calib.engine import BlockContext, EngineOptions


class _Block(nn.Module):
    """x -> (mlp(norm(x) * scale) + x, None): a tuple output, like a decoder block."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(4)
        self.up = nn.Linear(4, 6)
        self.down = nn.Linear(6, 4)
        self.calls: list[str] = []
        for n in ("norm", "up", "down"):
            getattr(self, n).register_forward_pre_hook(lambda _m, _i, _n=n: self.calls.append(_n))

    def forward(self, x, *, scale=1.0):
        return self.down(torch.relu(self.up(self.norm(x) * scale))) + x, None


def _inputs(n=3, folder=None):
    store = ActivationStore(folder)
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        store.append(torch.randn(2, 5, 4, generator=g))
    return store, [((), {"scale": 1.0 + b}) for b in range(n)]


@pytest.mark.parametrize("on_disk", [False, True], ids=["memory", "disk"])
def test_outputs_per_batch_without_grad(tmp_path, on_disk):
    blk = _Block()
    inputs, call_args = _inputs(folder=tmp_path if on_disk else None)
    got, order = [], []
    run_batches(blk, inputs, call_args, before=order.append, each=lambda b, y: got.append((b, y, torch.is_grad_enabled())))
    assert order == [0, 1, 2] and [b for b, _, _ in got] == [0, 1, 2]
    assert not any(g for _, _, g in got)
    for b, y, _ in got:
        assert torch.equal(y, blk(inputs[b], scale=1.0 + b)[0])  # the first element of the tuple
    assert torch.is_grad_enabled()


def test_batches_limits_the_run():
    blk = _Block()
    inputs, call_args = _inputs()
    seen = []
    run_batches(blk, inputs, call_args, batches=2, each=lambda b, _y: seen.append(b))
    assert seen == [0, 1]
    run_batches(blk, inputs, call_args, batches=10, each=lambda b, _y: seen.append(b))
    assert seen == [0, 1, 0, 1, 2]


def test_until_stops_the_forward_and_hands_over_the_input():
    blk = _Block()
    inputs, call_args = _inputs()
    got = []
    run_batches(blk, inputs, call_args, until=[blk.down, blk.up], each=lambda b, x: got.append(x))
    assert blk.calls == ["norm", "up"] * 3  # up is the first of them reached; down never runs
    for b, x in enumerate(got):
        assert torch.equal(x, blk.norm(inputs[b]) * (1.0 + b))
    assert len(blk.up._forward_pre_hooks) == 1 and len(blk.down._forward_pre_hooks) == 1  # the stop hooks are gone


def test_until_a_module_the_forward_never_calls():
    blk = _Block()
    inputs, call_args = _inputs()
    with pytest.raises(RuntimeError, match="never reached"):
        run_batches(blk, inputs, call_args, until=[nn.Linear(4, 4)])


def test_block_context_runs_a_copy_and_collects():
    blk = _Block()
    inputs, call_args = _inputs()
    ctx = BlockContext(index=0, prefix="model.layers.0", block=blk, spec=None, inputs=inputs, call_args=call_args, targets={}, records={})
    other = _Block()
    with torch.no_grad():
        other.down.weight.mul_(2)
    outs = []
    ctx.run(block=other, batches=2, each=lambda b, y: outs.append(y))
    assert len(outs) == 2 and torch.equal(outs[1], other(inputs[1], scale=2.0)[0])
    ups = ctx.outputs(blk.up, batches=1)
    assert len(ups) == 1 and torch.equal(ups[0], blk.up(blk.norm(inputs[0])))
    stats = ctx.collect({"down": {"channel_stats"}})
    x = torch.cat([torch.relu(blk.up(blk.norm(inputs[b]) * (1.0 + b))).reshape(-1, 6) for b in range(3)])
    torch.testing.assert_close(stats["down"]["channel_stats"]["absmax"], x.abs().amax(0))


def test_engine_names_still_importable():
    assert EngineStore is ActivationStore and EngineOptions().fused
