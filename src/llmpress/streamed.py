"""Compress a model larger than memory: weights read block by block, written as soon as compressed.

``llmpress compress FOLDER --stream`` (``run_pipeline(stream=True)``):

1. :class:`StreamedModel` builds the model from config.json on the meta device (no memory),
   checks the safetensors files against it (:class:`llmpress.weights.WeightIndex`: a missing
   shard, a tensor no file holds, a shape config.json contradicts, each named), and reads the
   tensors outside the decoder blocks (embeddings, final norm, head; rotary tables are rebuilt).
2. The sequential engine runs as always, with :class:`StreamIO` as its block hooks: block
   ``i``'s weights are read (memory-mapped, each tensor once) just before its stages, and once
   it is compressed its tensors go to their own file in the output folder
   (:class:`llmpress.export.sharded.ShardedWriter`) and the block returns to the meta device.
3. Perplexity is measured in the same pass (:class:`llmpress.eval.streamed.EvalStreams`):
   the test windows' hidden states go through each original block (baseline) and through
   the compressed block (result), so neither evaluation needs the whole model in memory.

Peak memory: embeddings + head + one block + the calibration activations (on disk with
``--offload-dir``) + the evaluation activations (always on disk). What streaming does not do
yet, refused before anything loads (:func:`check_streamable`): model-scope stages (rotations,
OWL, the KV-cache quantizer transform the whole model at once), LLM.int8() and OS+ shifts
(run-time modules) and several ranks. ``--resume`` works as in memory (the finished blocks
kept beside the output folder); a resumed streamed run reads and writes the finished blocks
again (from their checkpoints), so the output folder is still written in one piece.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn as nn

from .arch import get_arch, get_module
from .errors import UserError
from .eval.memory import trim_malloc
from .registry import METHODS
from .weights import WeightIndex, check_finite_tensors

__all__ = ["StreamedModel", "StreamIO", "check_streamable", "streamed_perplexities"]


def check_streamable(recipe, ranks: int = 1) -> None:
    """Refuse, from the recipe alone, what a streamed compress cannot do (see the module doc)."""
    for i, st in enumerate(recipe.stages):
        why = None
        if METHODS[st.method].scope == "model":
            why = "transforms the whole model at once"
        elif st.method == "llm_int8":
            why = "adds run-time modules"
        elif st.method == "smoothquant" and getattr(st.config, "shift", False):
            why = "adds run-time norm shifts (shift: true)"
        if why:
            raise UserError(f"--stream: recipe stage {i} ({st.method}) {why}, which a streamed compress does not do yet; run it without --stream")
    if ranks > 1:
        raise UserError("--stream runs in one process for now; drop --nproc / torchrun, or --stream")


class StreamedModel:
    """A causal LM whose decoder blocks live on the meta device until :meth:`load_block`."""

    def __init__(
        self, folder: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", trust_remote_code: bool = False
    ):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.folder = Path(folder)
        self.dtype, self.device = dtype, torch.device(device)
        self.index = WeightIndex(self.folder)  # a missing shard fails here, before any model code
        config = AutoConfig.from_pretrained(self.folder, local_files_only=True, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        self.model.eval()
        self.model.llmpress_source = str(folder)
        self.spec = get_arch(self.model)
        self.layers = get_module(self.model, self.spec.blocks)
        state = self.model.state_dict()
        self.tied = {k for k in state if self._tied_to(k) is not None}
        self.index.check({k: tuple(v.shape) for k, v in state.items()}, tied=self.tied)
        self.outside_loaded = False
        self.loaded: set[int] = set()  # blocks materialized now
        self.max_loaded = 0  # the most blocks ever materialized at once (tests)
        self._load_outside()

    def _tied_to(self, name: str) -> str | None:
        """The tensor ``name`` shares (tied output embeddings), or None."""
        cfg = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        if name == f"{self.spec.lm_head}.weight" and getattr(cfg, "tie_word_embeddings", False):
            return f"{self.spec.embed}.weight"
        return None

    def _outside_modules(self):
        blocks = self.spec.blocks + "."
        return [(n, m) for n, m in self.model.named_modules() if n != self.spec.blocks and not n.startswith(blocks)]

    def _load_outside(self) -> None:
        """Every tensor outside the decoder blocks, read; buffers computed at construction
        (rotary tables, embedding scales) taken from a one-block copy of the model built on the CPU."""
        donor = None
        for name, mod in self._outside_modules():
            for n in [n for n in mod._non_persistent_buffers_set if mod._buffers.get(n) is not None]:
                donor = donor if donor is not None else _one_block_copy(self.model.config)
                mod._buffers[n] = get_module(donor, name)._buffers[n].to(self.device)
        del donor
        self.reload_outside()

    def reload_outside(self) -> None:
        """Read the stored tensors outside the blocks that are not in memory (all of them at
        first; after :meth:`release_outside`, what it released)."""
        for name, mod in self._outside_modules():
            persistent = [(n, p) for n, p in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]
                          if n not in mod._non_persistent_buffers_set]  # fmt: skip
            tensors = {n: self._read(f"{name}.{n}" if name else n)
                       for n, p in persistent if p.device.type == "meta" and self._tied_to(f"{name}.{n}" if name else n) is None}  # fmt: skip
            if tensors:
                mod.load_state_dict(tensors, strict=False, assign=True)
        for k in self.tied:
            owner, _, leaf = k.rpartition(".")
            src_owner, _, src_leaf = self._tied_to(k).rpartition(".")
            setattr(get_module(self.model, owner), leaf, getattr(get_module(self.model, src_owner), src_leaf))
        self.outside_loaded = True

    def release_outside(self) -> None:
        """The stored tensors outside the blocks (embeddings, head, final norm) back on the meta
        device while the blocks are processed: nothing between the block inputs' capture and the
        end of the last block needs them. :meth:`reload_outside` reads them again."""
        for _name, mod in self._outside_modules():
            for n, p in list(mod.named_parameters(recurse=False)):
                if p.device.type != "meta":
                    setattr(mod, n, nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad))
            for n, b in list(mod.named_buffers(recurse=False)):
                if n not in mod._non_persistent_buffers_set and b is not None and b.device.type != "meta":
                    mod._buffers[n] = torch.empty_like(b, device="meta")
        self.outside_loaded = False
        trim_malloc()

    def _read(self, name: str) -> torch.Tensor:
        t = self.index.read(name, self.dtype)
        return t if self.device.type == "cpu" else t.to(self.device)

    def load_block(self, i: int) -> nn.Module:
        """Block ``i`` with its weights read from the folder (each tensor once)."""
        block, prefix = self.layers[i], f"{self.spec.blocks}.{i}"
        if any(b.device.type == "meta" for n, b in block.named_buffers() if n.rpartition(".")[2] in _non_persistent(block)):
            raise UserError(f"--stream: block {prefix} has buffers computed when built; run without --stream")
        tensors = {n: self._read(f"{prefix}.{n}") for n in block.state_dict()}
        block.load_state_dict(tensors, strict=True, assign=True)
        check_finite_tensors(tensors, prefix + ".", "the output folder was not written")
        self.loaded.add(i)
        self.max_loaded = max(self.max_loaded, len(self.loaded))
        return block

    def free_block(self, i: int) -> None:
        """Block ``i`` back on the meta device: its memory is returned."""
        self.layers[i].to("meta")
        self.loaded.discard(i)
        trim_malloc()


def _one_block_copy(config) -> nn.Module:
    """The model with one decoder block, its weights allocated but never written (so they
    take no memory): where the buffers a model computes when built are taken from."""
    import copy

    from .export.skeleton import skeleton

    cfg = copy.deepcopy(config)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    text.num_hidden_layers = 1
    if getattr(text, "layer_types", None):
        text.layer_types = text.layer_types[:1]
    return skeleton(cfg)


def _non_persistent(block: nn.Module) -> set[str]:
    return {n for m in block.modules() for n in m._non_persistent_buffers_set}


class StreamIO:
    """The engine's block hooks for a streamed compress: read a block before its stages
    (and run the baseline evaluation through it), write and free it once compressed (after
    the compressed evaluation went through it)."""

    def __init__(self, streamed: StreamedModel, *, writer=None, evals=None):
        self.streamed, self.writer, self.evals = streamed, writer, evals
        self.seconds = {"stream_read": 0.0, "stream_eval": 0.0, "stream_write": 0.0}
        self.block_seconds: list[float] = []  # wall time of each block, from its read to its write
        self._started = 0.0

    def _timed(self, key: str, fn, *args) -> None:
        t = time.perf_counter()
        fn(*args)
        self.seconds[key] += time.perf_counter() - t

    def load(self, i: int, block: nn.Module, prefix: str) -> None:
        self._started = time.perf_counter()
        if self.streamed.outside_loaded:  # the inputs of block 0 are captured: embeddings and head wait on disk
            self.streamed.release_outside()
        self._timed("stream_read", self.streamed.load_block, i)
        if self.evals is not None:
            self._timed("stream_eval", self.evals.baseline_block, i, block)

    def after_blocks(self) -> None:
        """The last block is written: the tensors outside the blocks come back (the head is
        compressed next, when targeted), and the baseline perplexity is measured with the
        original head."""
        self._timed("stream_read", self.streamed.reload_outside)
        if self.evals is not None:
            self._timed("stream_eval", self.evals.finish_baseline)

    def done(self, i: int, block: nn.Module, prefix: str, records: dict) -> None:
        if self.evals is not None:
            self._timed("stream_eval", self.evals.compressed_block, i, block)
        if self.writer is not None:
            self._timed("stream_write", self.writer.write_block, block, prefix, records)
        self.streamed.free_block(i)
        self.block_seconds.append(time.perf_counter() - self._started)


def streamed_perplexities(sm: StreamedModel, windows: dict[str, torch.Tensor], *, batch_size: int, folder: str | None = None,
                          bars: bool = True) -> dict[str, float]:  # fmt: skip
    """Perplexity of the model of ``sm`` on each source's windows, one block in memory at a time
    (the hidden states between blocks on disk, in a temporary folder under ``folder``)."""
    import tempfile

    from . import progress
    from .eval.streamed import EvalStreams

    with tempfile.TemporaryDirectory(prefix="llmpress-eval-", dir=folder) as work:
        evals = EvalStreams(sm.model, sm.spec, windows, batch_size=batch_size, folder=Path(work))
        sm.release_outside()
        for i in progress.track(range(len(sm.layers)), "ppl (streamed)", "block", on=bars):
            evals.baseline_block(i, sm.load_block(i))
            sm.free_block(i)
        sm.reload_outside()
        evals.finish_baseline()
    return evals.baseline
