"""Perplexity measured block by block, for a model whose blocks are never all in memory.

:class:`EvalStreams` holds the test windows' hidden states between blocks (on disk) in two
streams: through the original blocks (the baseline) and through the compressed ones. A
streamed compress (:mod:`llmpress.streamed`) runs each block of both just before and just
after compressing it, so one pass over the weights gives the baseline perplexity, the
compression and the compressed perplexity. The computation is the one
:func:`llmpress.eval.perplexity.perplexity` makes (the same batches, block calls, final norm
and chunked head), so the figures equal the in-memory evaluation's. With ``kl``
(:class:`llmpress.eval.kl.BaselineLogprobs`), the baseline pass records its next-token
log-probabilities and the compressed pass is compared with them (KL divergence, top-1).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from ..arch import ArchSpec, get_module
from ..calib.activations import ActivationStore, capture_block_inputs, run_batches
from ..errors import UserError
from .kl import BaselineLogprobs
from .memory import trim_malloc
from .perplexity import hidden_nll, split_head


class EvalStreams:
    """Baseline and compressed hidden states of every source's test windows, block by block."""

    def __init__(self, model: nn.Module, spec: ArchSpec, windows: dict[str, torch.Tensor], *, batch_size: int, folder: Path | None,
                 kl: BaselineLogprobs | None = None):  # fmt: skip
        parts = split_head(model)
        if parts is None:
            raise UserError("--stream: this model's logits are not its head applied to the final hidden states; evaluate it without --stream")
        self.model, self.spec, self.softcap, self.folder = model, spec, parts[2], folder
        self.windows, self.kl = windows, kl
        self.batches = [(src, b) for src, w in windows.items() for b in w.split(batch_size)]
        store = ActivationStore(folder)
        self.call_args = capture_block_inputs(model, spec, [b for _, b in self.batches], store)
        self.base = self.comp = store
        self.baseline: dict[str, float] | None = None

    def _advance(self, block: nn.Module, i: int, store: ActivationStore) -> ActivationStore:
        out = ActivationStore(self.folder)
        with torch.no_grad():
            run_batches(block, store, self.call_args[i], each=lambda _b, y: out.append(y))
        return out

    def baseline_block(self, i: int, block: nn.Module) -> None:
        """The baseline stream through the original block ``i`` (before any stage touches it)."""
        out = self._advance(block, i, self.base)
        if self.base is not self.comp:
            self.base.clear()
        self.base = out

    def finish_baseline(self) -> None:
        """The baseline perplexity, after the last block (with the original head: before the
        head is compressed, when it is)."""
        self.baseline = self._perplexities(self.base, self.kl.recorder if self.kl else None)
        self.base.clear()

    def compressed_block(self, i: int, block: nn.Module) -> None:
        out = self._advance(block, i, self.comp)
        self.comp.clear()
        self.comp = out
        trim_malloc()

    def compressed(self) -> dict[str, float]:
        """The compressed perplexity per source (after the last block and the head were compressed)."""
        ppl = self._perplexities(self.comp, self.kl.comparer if self.kl else None)
        self.comp.clear()
        return ppl

    @torch.no_grad()
    def _perplexities(self, store: ActivationStore, kl=None) -> dict[str, float]:
        norm = get_module(self.model, self.spec.final_norm)
        head = self.model.get_output_embeddings()
        nll: dict[str, float] = {}
        count: dict[str, int] = {}
        sinks = {s: kl(s) for s in self.windows} if kl is not None else {}
        for s, sink in sinks.items():
            sink.start(self.windows[s])
        for b, (src, ids) in enumerate(self.batches):
            nll[src] = nll.get(src, 0.0) + hidden_nll(head, self.softcap, norm(store[b]), ids, sinks.get(src))
            count[src] = count.get(src, 0) + ids[:, 1:].numel()
        for sink in sinks.values():
            sink.finish()
        return {s: math.exp(nll[s] / count[s]) for s in nll}
