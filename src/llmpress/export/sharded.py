"""The output of a streamed compress, written one decoder block at a time.

:class:`ShardedWriter` writes each compressed block's tensors to their own safetensors file
as soon as the block is done, and the tensors outside the blocks (embeddings, final norm,
head) to the last file at the end, with the folder's config, tokenizer and manifest:

- ``packed``: the packed checkpoint (:mod:`llmpress.export.packed`) with its tensors in
  ``model.llmpress-0000K-of-0000N.safetensors`` files: format ``llmpress-packed-v3``
  (``weights_files`` lists each file and its size), loaded by :func:`load_packed` as usual;
- ``hf-fakequant``: a Hugging Face sharded folder (``model-0000K-of-0000N.safetensors`` and
  ``model.safetensors.index.json``) of the dequantized weights, with llmpress.json.

The tensors and the manifest equal those the in-memory save writes for the same model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from ..registry import ModuleRecord
from ..runtime.act_quant import plain_state_dict
from .packed import FORMAT_SHARDED, _find_ties, encode_records, sha256, warn_dense, write_folder_files


class ShardedWriter:
    """Writes a streamed compress's checkpoint of ``format`` into the (temporary) ``folder``."""

    def __init__(self, folder: Path, format: str, parts: int):
        self.folder, self.format, self.parts = Path(folder), format, parts
        self.files: list[dict] = []
        self.layers: dict[str, dict] = {}
        self.dense: list[str] = []
        self.tensors: dict[str, dict] = {}  # name -> dtype, shape, sha256
        self.weight_map: dict[str, str] = {}

    def _file_name(self) -> str:
        k = len(self.files) + 1
        stem = "model.llmpress" if self.format == "packed" else "model"
        return f"{stem}-{k:05d}-of-{self.parts:05d}.safetensors"

    def _write(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        if len(self.files) >= self.parts:
            raise RuntimeError(f"more than the {self.parts} announced weights files")
        name = self._file_name()
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(tensors, str(self.folder / name), metadata={"format": "pt"})
        self.files.append({"name": name, "file_bytes": (self.folder / name).stat().st_size})
        for k, v in tensors.items():
            self.weight_map[k] = name
            if self.format == "packed":
                self.tensors[k] = {"dtype": str(v.dtype), "shape": list(v.shape), "sha256": sha256(v)}

    def write_block(self, block: nn.Module, prefix: str, records: dict[str, ModuleRecord]) -> None:
        """Block ``prefix``'s tensors (compressed linears in their storage form) to the next file."""
        state = {f"{prefix}.{k}": v for k, v in plain_state_dict(block).items()}
        if self.format == "packed":
            layers, tensors, dense = encode_records(block, state, records, prefix=prefix + ".")
            self.layers.update(layers)
            self.dense += dense
            state = {**tensors, **state}
        self._write(state)

    def finish(self, model: nn.Module, tokenizer, records: dict[str, ModuleRecord], blocks: str, extra_meta: dict | None = None) -> dict:
        """The tensors outside the blocks to the last file, then config, tokenizer and manifest."""
        state = {k: v for k, v in plain_state_dict(model).items() if not k.startswith(blocks + ".")}
        outside = {n: r for n, r in records.items() if not n.startswith(blocks + ".")}
        if self.format == "packed":
            layers, tensors, dense = encode_records(model, state, outside)
            self.layers.update(layers)
            self.dense += dense
            warn_dense(self.dense)
            tied_quant, tied = _find_ties(model, state, self.layers, tensors)
            self._write(tensors)
            manifest = {
                "format": FORMAT_SHARDED,
                "weights_files": self.files,
                "file_bytes": sum(f["file_bytes"] for f in self.files),
                "dtype": str(next(p.dtype for p in model.parameters() if p.is_floating_point())),
                "layers": self.layers,
                "tied": tied,
                "tied_quant_embeddings": tied_quant,
                "dense_layers": self.dense,
                "tensors": self.tensors,
                **(extra_meta or {}),
            }
            write_folder_files(self.folder, model, tokenizer, manifest)
            return manifest
        seen: dict[int, str] = {}
        for k in list(state):  # a tied head is stored once, as save_pretrained does
            ptr = state[k].data_ptr()
            if ptr in seen:
                del state[k]
            else:
                seen[ptr] = k
        self._write(state)
        total = sum(f["file_bytes"] for f in self.files)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        meta = {
            "format": "llmpress-fakequant-v1",
            "activation_quant": {n: r.act_args.to_dict() for n, r in records.items() if r.act_args is not None},
            **(extra_meta or {}),
        }
        write_folder_files(self.folder, model, tokenizer, meta)  # config, tokenizer, llmpress.json: as the packed folder
        return meta
