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
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import torch

MADV_DONTNEED = 4
_PAGE = mmap.PAGESIZE


def mapped_ranges(files: list[Path]) -> list[tuple[int, int]]:
    """(start, end) addresses of this process's mappings of ``files`` (empty off Linux)."""
    want = {str(Path(f).resolve()) for f in files}
    out = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].strip() in want:
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
