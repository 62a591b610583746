"""Data-parallel calibration over torch.distributed.

Each rank holds a contiguous share of the calibration batches (rank 0 the first ones) and
runs the same engine on it. The ranks meet only where a result must be the same everywhere:

- statistics are reduced where they are consumed (:meth:`Group.sum_`, :meth:`Group.max_`):
  Hessian and channel sums add, maxima take the maximum, per-token lists concatenate in
  batch order;
- each linear's solve runs on one rank, chosen by cost (:meth:`Group.assign`, longest
  processing time first), and its weight and record are broadcast from there;
- block-scope searches (AWQ, SmoothQuant) run on every rank over the same global first
  batches, broadcast from the ranks holding them (``BlockContext.run``), so every rank
  finds the same transform without sending it.

Outside a process group (``torch.distributed`` not initialized) :func:`current` is the
one-rank group and every method here is a no-op: the single-process path is unchanged.
"""

from __future__ import annotations

import heapq
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import UserError


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    def share(self, n: int) -> range:
        """This rank's contiguous share of ``n`` items (the first ``n % world`` ranks take one more)."""
        return self.share_of(self.rank, n)

    def share_of(self, rank: int, n: int) -> range:
        base, extra = divmod(n, self.world)
        start = rank * base + min(rank, extra)
        return range(start, start + base + (1 if rank < extra else 0))

    def owner_of(self, item: int, n: int) -> int:
        return next(r for r in range(self.world) if item in self.share_of(r, n))

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce ``t`` in place (sum); returns it."""
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def min_(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return t

    def sum_int(self, n: int) -> int:
        return int(self.sum_(torch.tensor([n], dtype=torch.int64)).item()) if self.active else n

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj, src: int):
        """``obj`` of rank ``src`` on every rank (pickled: records, call arguments)."""
        if not self.active:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def broadcast_(self, t: torch.Tensor, src: int) -> None:
        """Rank ``src``'s values of ``t`` into ``t`` on every rank (in place; same shape everywhere)."""
        if self.active:
            dist.broadcast(t, src=src)

    def assign(self, costs: dict[str, float]) -> dict[str, int]:
        """Owner rank of each item: longest processing time first onto the least loaded rank
        (ties: the lower rank; items of equal cost in the given order), the same on every rank."""
        if not self.active:
            return dict.fromkeys(costs, 0)
        load = [(0.0, r) for r in range(self.world)]
        out = {}
        for name in sorted(costs, key=lambda k: (-costs[k], list(costs).index(k))):
            used, r = heapq.heappop(load)
            out[name] = r
            heapq.heappush(load, (used + costs[name], r))
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


ONE_RANK = Group()


def current() -> Group:
    """The process group this process belongs to (one rank when torch.distributed is off)."""
    if dist.is_available() and dist.is_initialized():
        return Group(rank=dist.get_rank(), world=dist.get_world_size())
    return Group()


def check_ranks(recipe, ranks: int) -> None:
    """Refuse, from the recipe alone, what several processes cannot run yet: a block stage that
    needs the full-precision stream of block inputs (parallel / corrective reconstruction)."""
    if ranks <= 1:
        return
    for i, st in enumerate(recipe.stages):
        if getattr(st.config, "needs_fp_stream", False):
            mode = getattr(st.config, "mode", "")
            raise UserError(
                f"recipe stage {i} ({st.method}{', mode ' + mode if mode else ''}) needs the full-precision inputs of every block, "
                "which several processes do not carry yet; run it in one process (drop --nproc / torchrun)"
            )


def launched() -> bool:
    """Whether this process was started by torchrun as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str) -> tuple[Group, str]:
    """Join the process group torchrun set up (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` ...):
    gloo on CPU, NCCL on CUDA with one GPU per rank (``cuda`` becomes ``cuda:LOCAL_RANK``).
    Returns (group, device); outside torchrun the one-rank group and ``device`` unchanged."""
    if not launched():
        return current(), device
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local}"
        import torch.cuda

        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return current(), device
