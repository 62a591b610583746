"""Data-parallel calibration (llmpress.calib.dist): two CPU ranks (gloo) give the one-process result."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from conftest import random_windows, tiny_llama
from safetensors.torch import load_file, save_file

import llmpress
from llmpress import QuantArgs, stage
from llmpress.calib.dist import Group

W4 = QuantArgs(bits=4, group_size=32)
RECIPES = {
    "rtn": [stage("rtn", weights=W4)],
    "gptq": [stage("gptq", weights=W4)],
    "sparsegpt": [stage("sparsegpt", sparsity=0.5)],
    "wanda": [stage("wanda", sparsity=0.5)],
    "awq": [stage("awq", weights=W4, search_windows=4, grid=4)],
    "awq+gptq": [stage("awq", weights=W4, quantize=False, search_windows=4, grid=4), stage("gptq", weights=W4)],
    "smoothquant": "smoothquant-w8a8",
}
BATCH = 2  # 12 windows: 6 batches, 3 per rank


def _compress(name: str):
    m = tiny_llama(seed=1)
    engine = llmpress.api.EngineOptions(batch_size=BATCH, progress=False)
    rep = llmpress.compress(m, RECIPES[name], data=random_windows(12, 24, seed=3), engine=engine)
    state = {k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}
    return state, rep


def _rank(rank: int, world: int, init: str, out: str, names: list[str]) -> None:
    import json

    import torch.distributed as dist

    from llmpress.calib import block, engine

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    seen = {"batches": 0, "solves": 0}
    capture, apply = engine.capture_block_inputs, block.apply_stages

    def counting_capture(model, spec, batches, store):
        seen["batches"] += len(batches)
        return capture(model, spec, batches, store)

    def counting_apply(*a, **kw):
        seen["solves"] += 1
        return apply(*a, **kw)

    engine.capture_block_inputs, block.apply_stages = counting_capture, counting_apply
    try:
        for name in names:
            seen.update(batches=0, solves=0)
            state, rep = _compress(name)
            save_file(state, os.path.join(out, f"{name}-{rank}.safetensors"))
            with open(os.path.join(out, f"{name}-{rank}.json"), "w") as f:
                json.dump({**seen, "sparsity": {n: r.sparsity for n, r in rep.result.records.items()}}, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_rank, args=(2, str(out / "init"), str(out), list(RECIPES)), nprocs=2, join=True)
    return out


@pytest.fixture
def one_thread():
    """The ranks run on one thread each; so does the one-process reference (GEMM blocking, and so
    float rounding, may depend on the thread count). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", list(RECIPES))
def test_two_ranks_equal_one_process(two_ranks, name, one_thread):
    want, rep = _compress(name)
    for rank in (0, 1):
        got = load_file(str(two_ranks / f"{name}-{rank}.safetensors"))
        assert set(got) == set(want)
        diff = [k for k in want if not torch.equal(got[k], want[k])]
        assert not diff, f"rank {rank}: {diff[:4]}"  # bit for bit (see calib.dist / HessianAccumulator.reduce)
    info = [json.loads((two_ranks / f"{name}-{rank}.json").read_text()) for rank in (0, 1)]
    for i in info:
        assert i["sparsity"] == {n: r.sparsity for n, r in rep.result.records.items()}  # the records travel with the weights
    # each rank ran its half of the 6 calibration batches (none when no stage needs data)
    assert [i["batches"] for i in info] == ([0, 0] if name == "rtn" else [3, 3])
    linears = sum(1 for n, mod in tiny_llama().named_modules() if isinstance(mod, torch.nn.Linear) and n != "lm_head")
    solves = [i["solves"] for i in info]
    if name == "rtn":  # data-free: every rank rounds every linear itself
        assert solves == [linears, linears]
    elif name == "awq":  # block-scope only: the search runs on every rank, no per-linear solve
        assert solves == [0, 0]
    else:  # each linear solved on one rank, both ranks busy
        assert sum(solves) == linears and min(solves) > 0


def test_shares_owners_and_costs():
    g = Group(rank=1, world=3)
    assert [list(Group(rank=r, world=3).share(7)) for r in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert g.owner_of(4, 7) == 1 and g.owner_of(6, 7) == 2
    owners = Group(rank=0, world=2).assign({"a": 1.0, "b": 5.0, "c": 4.0, "d": 2.0})
    assert owners == {"b": 0, "c": 1, "d": 1, "a": 0}  # b | c, then d onto the lighter, then a
    assert Group().assign({"a": 1.0}) == {"a": 0} and not Group().active


class _Record:
    """Rank 1 of a pair in one process: keeps what its accumulator contributes, in call order."""

    active, rank, world = True, 1, 2

    def __init__(self):
        self.sent = []

    def _keep(self, v):
        self.sent.append(v.clone() if isinstance(v, torch.Tensor) else v)
        return v

    sum_ = max_ = min_ = sum_int = _keep

    def gather(self, obj):
        self._keep(obj)
        return [obj]


class _Combine:
    """Rank 0 of the pair: each collective combines its value with rank 1's, as gloo would."""

    active, rank, world = True, 0, 2

    def __init__(self, other: _Record):
        self.got = list(other.sent)

    def sum_(self, t):
        return t.add_(self.got.pop(0))

    def max_(self, t):
        return torch.maximum(t, self.got.pop(0), out=t)

    def min_(self, t):
        return torch.minimum(t, self.got.pop(0), out=t)

    def sum_int(self, n):
        return n + self.got.pop(0)

    def gather(self, obj):
        return [obj, self.got.pop(0)]


@pytest.mark.parametrize("name", ["hessian", "channel_stats", "token_absmax", "channel_minmax"])
def test_each_statistic_reduces_to_the_one_process_value(name):
    import llmpress.transform.scaling  # noqa: F401  (registers channel_minmax)
    from llmpress.calib.accumulators import ACCUMULATORS

    xs = [torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(i)) * (i + 1) for i in range(4)]
    one, a, b = ACCUMULATORS[name](), ACCUMULATORS[name](), ACCUMULATORS[name]()
    for i, x in enumerate(xs):
        one.add(x)
        (a if i < 2 else b).add(x)  # contiguous shares: batches 0-1 on rank 0, 2-3 on rank 1
    rec = _Record()
    b.reduce(rec)
    a.reduce(_Combine(rec))
    want, got = one.result(), a.result()
    if isinstance(want, dict):
        assert want.keys() == got.keys()
        for k in want:
            assert torch.equal(torch.as_tensor(got[k]), torch.as_tensor(want[k])), k
    else:
        assert torch.equal(got, want)


def test_batches_shrink_so_every_rank_has_one():
    from llmpress.calib.engine import _batch_size
    from llmpress.errors import UserError

    assert _batch_size(128, 8, 2, False) == 8
    assert _batch_size(4, 8, 2, False) == 2  # 1 batch of 8 for 2 ranks: 2 of 2
    assert _batch_size(5, 8, 4, False) == 1  # 5 batches of 1 for 4 ranks (batches of 2 would leave one rank idle)
    with pytest.raises(UserError, match="3 calibration windows for 4 ranks"):
        _batch_size(3, 8, 4, False)


@pytest.mark.parametrize("recipe", ["blockwise-w4g64", "duquant-w4a4kv4-blockwise"])
def test_full_precision_stream_refused_with_several_processes_before_loading(tmp_path, capsys, recipe):
    """Corrective / parallel reconstruction needs the dense model's block inputs, which ranks do not
    carry: refused from the recipe before any process starts or any model loads (the folder is missing)."""
    from helpers import cli_fails

    from llmpress.calib.dist import check_ranks
    from llmpress.recipe import load_recipe

    cli_fails(
        capsys,
        ["compress", str(tmp_path / "no-such-model"), "--recipe", recipe, "--nproc", "2", "--out", str(tmp_path / "o")],
        "mode corrective",
        "one process",
    )
    assert not (tmp_path / "o").exists()
    check_ranks(load_recipe(recipe), 1)  # one process: fine
    check_ranks(load_recipe("gptq-w4g64"), 2)  # no full-precision stream: fine
