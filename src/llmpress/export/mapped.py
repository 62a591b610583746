"""Pages of a memory-mapped weights file that a load no longer needs, handed back to the kernel.

safetensors maps a weights file privately and returns tensors that view it, so every page a
load reads (the sha256 check reads them all) stays resident for as long as any tensor of the
file is alive, which is the whole life of the model when, say, its embeddings are such a view.
For a layer whose runtime module *decodes* its stored tensors into new memory (a pruned
``sparse`` layer, an LLM.int8() weight), those pages are dead weight: a 20%-sparse SmolLM2
held 455 MB of them next to the 425 MB of decoded linears. ``MADV_DONTNEED`` on a private file
mapping drops a page from the process; if anything read it again it would be faulted back in
from the file, unchanged, so the call never alters what a tensor holds (only pages written
in place, which nothing here does, would revert). Linux only; elsewhere a no-op.

Tensors a model keeps as views of the mapping are moved into memory of their own at load
(:func:`own_memory`): the pages of a mapping are the kernel's to drop and read again from the
file under memory pressure, in the middle of a decode, and a model's speed should not depend
on the page cache. Once, beside another heavy process, a matrix-vector product over gemma-3-270m's
mapped 670 MB head ran at half the speed of one over a copy (90 against 48 ms); on the idle
machine the two run at the same speed (benchmarks/mapped_load.py), so the move is for
robustness, not a measured speed-up. It costs one copy of the weights at load, no memory.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import torch

MADV_DONTNEED = 4
_PAGE = mmap.PAGESIZE


def mapped_ranges(files: list[Path] | None = None) -> list[tuple[int, int]]:
    """(start, end) addresses of this process's mappings of ``files`` (empty off Linux); with
    ``files`` None, of every mapped ``.safetensors`` file."""
    want = None if files is None else {str(Path(f).resolve()) for f in files}
    out = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(None, 5)
                path = parts[5].strip() if len(parts) == 6 else ""
                if path and (path.endswith(".safetensors") if want is None else path in want):
                    lo, hi = parts[0].split("-")
                    out.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return []
    return out


def drop_pages(t: torch.Tensor, ranges: list[tuple[int, int]]) -> int:
    """Release the whole pages of ``t``'s memory that lie in one of ``ranges`` (a mapped weights
    file); bytes released (0 when ``t`` is not a view of such a mapping)."""
    if not ranges or t.device.type != "cpu" or os.name != "posix":
        return 0
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    if not any(lo <= start and end <= hi for lo, hi in ranges):
        return 0
    first = -(-start // _PAGE) * _PAGE  # whole pages only: the neighbours' bytes stay
    last = end // _PAGE * _PAGE
    if last <= first:
        return 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED) != 0:
            return 0
    except (OSError, AttributeError):
        return 0
    return last - first


def _inside(t: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    if t.device.type != "cpu" or t.numel() == 0:
        return False
    start = t.data_ptr()
    return any(lo <= start < hi for lo, hi in ranges)


def own_memory(module: torch.nn.Module, ranges: list[tuple[int, int]] | None = None) -> int:
    """Move every parameter and buffer of ``module`` that views a mapped weights file (``ranges``;
    None: every mapped ``.safetensors``) into memory of its own, one tensor at a time, releasing
    the file's pages behind it, so the peak stays the weights plus one tensor. Ties survive:
    a tensor object shared by several modules is moved once, and two views of the same bytes
    become views of the same copy. Bytes moved."""
    ranges = mapped_ranges() if ranges is None else ranges
    if not ranges:
        return 0
    moved, done, copies = 0, set(), {}
    for mod in module.modules():
        for t in [*mod._parameters.values(), *mod._buffers.values()]:
            if t is None or id(t) in done or not _inside(t, ranges):
                continue
            done.add(id(t))
            key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
            old = t.data
            if key not in copies:
                copies[key] = _copy_out(old, ranges)
                moved += old.numel() * old.element_size()
            t.data = copies[key]
            drop_pages(old, ranges)
            del old
    return moved


def _copy_out(old: torch.Tensor, ranges: list[tuple[int, int]], chunk_bytes: int = 64 << 20) -> torch.Tensor:
    """A copy of ``old`` in memory of its own; a contiguous one is copied ``chunk_bytes`` at a
    time, each chunk's file pages released once copied (gemma-3-270m's 670 MB embedding would
    otherwise be resident twice at the end of its copy)."""
    if not old.is_contiguous():
        return old.clone(memory_format=torch.contiguous_format)
    new = torch.empty_like(old, memory_format=torch.contiguous_format)
    src, dst = old.reshape(-1), new.view(-1)
    step = max(1, chunk_bytes // max(old.element_size(), 1))
    for i in range(0, src.numel(), step):
        dst[i : i + step].copy_(src[i : i + step])
        drop_pages(src[i : i + step], ranges)
    return new
