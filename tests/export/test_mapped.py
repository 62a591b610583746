"""Pages of a mapped weights file released after a load decodes them (export/mapped.py)."""

import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmpress.export.mapped import drop_pages, mapped_ranges

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps and madvise: Linux")


def _resident_kb(path) -> int:
    """Resident kB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's header line
                inside = len(head) == 6 and head[5] == str(path)
            elif inside and head[0] == "Rss:":
                total += int(head[1])
    return total


def test_dropped_pages_leave_the_process_and_the_values_stay(tmp_path):
    path = (tmp_path / "w.safetensors").resolve()
    want = {"a": torch.randn(512, 1024), "b": torch.randn(64, 64)}
    save_file(want, str(path))
    got = load_file(str(path))
    assert float(got["a"].sum()) == pytest.approx(float(want["a"].sum()), rel=1e-6)  # every page read
    ranges = mapped_ranges([path])
    if not ranges:
        pytest.skip("this safetensors copies tensors instead of mapping the file")
    before = _resident_kb(path)
    released = drop_pages(got["a"], ranges)
    after = _resident_kb(path)
    assert released >= 2 * 1024 * 1024 - 2 * 4096  # the 2 MiB tensor less at most a partial page at each end
    assert before - after >= released // 1024 - 8
    assert torch.equal(got["a"], want["a"]) and torch.equal(got["b"], want["b"])  # read back from the file, unchanged


def test_memory_outside_the_mapping_is_left_alone(tmp_path):
    path = (tmp_path / "w.safetensors").resolve()
    save_file({"a": torch.ones(256, 256)}, str(path))
    got = load_file(str(path))
    heap = torch.randn(512, 1024)
    keep = heap.clone()
    assert drop_pages(heap, mapped_ranges([path])) == 0 and torch.equal(heap, keep)
    assert drop_pages(got["a"], []) == 0 and mapped_ranges([tmp_path / "missing"]) == []
