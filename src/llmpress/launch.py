"""``llmpress compress ... --nproc N``: the same command on N local processes joined in one
torch.distributed process group (gloo on CPU, NCCL on CUDA, one GPU per process), as
torchrun would start them (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``). Rank 0 prints and writes; the exit code is the first failing rank's.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time


def without_nproc(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world: int, port: int, entry, argv: list[str]) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    if "OMP_NUM_THREADS" not in os.environ:  # the cores shared out, not each rank on all of them
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // world))
    raise SystemExit(entry(argv))


def spawn(n: int, argv: list[str], entry) -> int:
    """Run ``entry(argv)`` (the CLI's ``main``, ``--nproc`` removed from ``argv``) on ``n``
    processes; their exit code."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_child, args=(r, n, port, entry, argv), name=f"llmpress-rank{r}") for r in range(n)]
    for p in procs:
        p.start()
    try:
        while True:
            codes = [p.exitcode for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed or all(c == 0 for c in codes):
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        failed = [130]
    if failed:  # a rank that stopped leaves the others waiting in a collective
        for p in procs:
            if p.exitcode is None:
                p.terminate()
    for p in procs:
        p.join()
    return failed[0] if failed else 0
