"""Pages of a mapped weights file released after a load decodes them, and loaded models moved off
the mapping into memory of their own (export/mapped.py)."""

import sys
from pathlib import Path

import pytest
import torch
from conftest import random_windows, save_tiny_model, tiny_llama, tiny_tokenizer
from safetensors.torch import load_file, save_file

import llmpress
from llmpress.export.mapped import drop_pages, mapped_ranges, own_memory

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


def _views(model, ranges) -> list[str]:
    return [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.numel() and any(lo <= t.data_ptr() < hi for lo, hi in ranges)]


def test_own_memory_moves_views_keeps_ties_aliases_and_values(tmp_path):
    path = (tmp_path / "w.safetensors").resolve()
    want = {"a": torch.randn(256, 512), "b": torch.randn(512)}
    save_file(want, str(path))
    got = load_file(str(path))
    ranges = mapped_ranges([path])
    if not ranges:
        pytest.skip("this safetensors copies tensors instead of mapping the file")
    tied = torch.nn.Parameter(got["a"], requires_grad=False)
    m = torch.nn.Module()
    m.x, m.y = torch.nn.Linear(512, 256, bias=False), torch.nn.Linear(512, 256, bias=False)
    m.x.weight = m.y.weight = tied  # one tensor object in two modules
    m.x.register_buffer("alias", got["a"])  # another object over the same bytes
    m.y.register_buffer("b", got["b"])
    m.y.register_buffer("own", torch.ones(3))  # not a view: left alone
    own = m.y.own
    assert set(_views(m, ranges)) == {"x.weight", "x.alias", "y.b"}
    moved = own_memory(m, ranges)
    assert moved == (256 * 512 + 512) * 4  # the shared bytes once
    assert _views(m, ranges) == []
    assert m.x.weight is m.y.weight and isinstance(m.x.weight, torch.nn.Parameter)
    assert m.x.alias.data_ptr() == m.x.weight.data_ptr() and m.y.own is own
    assert torch.equal(m.x.weight, want["a"]) and torch.equal(m.y.b, want["b"])
    assert own_memory(m, ranges) == 0 and own_memory(m, []) == 0


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_loaded_models_do_not_run_on_views_of_their_file(tmp_path, family):
    from transformers import AutoModelForCausalLM

    folder = save_tiny_model(tmp_path / family, family=family)
    raw = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    files = list(Path(folder).glob("*.safetensors"))
    if not _views(raw, mapped_ranges(files)):
        pytest.skip("this transformers copies the weights instead of mapping the file")
    model, _ = llmpress.load(str(folder))
    assert _views(model, mapped_ranges(files)) == []
    assert model.lm_head.weight is model.get_input_embeddings().weight
    ids = random_windows(2, 16)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, raw(ids).logits)


def test_packed_loads_do_not_run_on_views_of_their_file(tmp_path, monkeypatch):
    from helpers import QUIET

    from llmpress import api, stage
    from llmpress.export import packed_load
    from llmpress.quant import QuantArgs

    model = tiny_llama()
    rep = llmpress.compress(model, stage("rtn", weights=QuantArgs(bits=4, group_size=32), ignore=["lm_head"]), engine=QUIET)
    out = api.save(model, tiny_tokenizer(), tmp_path / "ck", report=rep)
    files = list(Path(out).glob("*.safetensors"))
    with monkeypatch.context() as mp:  # without the move, the embeddings and norms view the file
        mp.setattr(packed_load, "own_memory", lambda *a, **k: 0)
        bare, _ = llmpress.load_compressed(str(out), backend="dequant")
        if not _views(bare, mapped_ranges(files)):
            pytest.skip("this safetensors copies tensors instead of mapping the file")
        del bare
    loaded, _ = llmpress.load_compressed(str(out), backend="dequant")
    assert _views(loaded, mapped_ranges(files)) == []
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = random_windows(2, 16)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_a_large_view_is_copied_a_chunk_at_a_time_and_released(tmp_path):
    from llmpress.export.mapped import _copy_out

    path = (tmp_path / "w.safetensors").resolve()
    want = torch.randn(1024, 1024)
    save_file({"a": want}, str(path))
    got = load_file(str(path))["a"]
    ranges = mapped_ranges([path])
    if not ranges:
        pytest.skip("this safetensors copies tensors instead of mapping the file")
    assert float(got.sum()) == pytest.approx(float(want.sum()), rel=1e-5)  # every page resident
    before = _resident_kb(path)
    new = _copy_out(got, ranges, chunk_bytes=256 * 1024)  # 16 chunks
    assert torch.equal(new, want) and new.data_ptr() != got.data_ptr() and new.is_contiguous()
    assert before - _resident_kb(path) >= 4096 - 2 * 256 // 4  # the 4 MiB released as copied, but chunk-edge pages
    assert torch.equal(got, want)  # the view reads back from the file, unchanged
