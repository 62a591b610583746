"""The tensors of a Hugging Face safetensors folder, read one at a time (for streaming).

:class:`WeightIndex` maps each tensor name to its file (``model.safetensors`` or the shards
named by ``model.safetensors.index.json``) and its shape, from the files' headers only; it
checks the folder against a model skeleton before anything is read (a shard the index names
but the folder lacks, a tensor the model needs that no file holds, a shape that disagrees
with config.json: each a :class:`~llmpress.errors.UserError` naming the file) and then reads
tensors on demand through memory maps, counting the reads (``reads``).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import UserError

if TYPE_CHECKING:
    import torch.nn as nn

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class WeightIndex:
    """Where each tensor of a safetensors folder is, and reads of single tensors."""

    def __init__(self, folder: str | Path):
        from safetensors import SafetensorError, safe_open

        self.folder = Path(folder)
        self.files = self._files()
        self.where: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.reads: Counter[str] = Counter()
        for f in self.files:
            try:
                with safe_open(str(self.folder / f), framework="pt") as sf:
                    for k in sf.keys():
                        self.where[k] = f
                        self.shapes[k] = tuple(sf.get_slice(k).get_shape())
            except (SafetensorError, OSError) as e:
                raise UserError(
                    f"model folder {str(self.folder)!r}: {f} is damaged or truncated ({e}); download or convert the model again"
                ) from None

    def _files(self) -> list[str]:
        index = self.folder / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"model folder {str(self.folder)!r}: {INDEX_FILE} is not a valid index ({e})") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.folder / f).exists()]
            if missing:
                raise UserError(
                    f"model folder {str(self.folder)!r}: shard {missing[0]} named in {INDEX_FILE} is missing"
                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                    + "; download the model again"
                )
            return files
        if (self.folder / SINGLE_FILE).exists():
            return [SINGLE_FILE]
        found = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not found:
            raise UserError(f"model folder {str(self.folder)!r} has no safetensors weights (model.safetensors or {INDEX_FILE})")
        return found

    def check(self, expected: dict[str, tuple[int, ...]], tied: set[str] = frozenset()) -> None:
        """Refuse a folder that cannot fill a model whose state dict has ``expected`` shapes
        (``tied``: names that may be absent because they share another tensor)."""
        for k, shp in expected.items():
            if k not in self.shapes:
                if k in tied:
                    continue
                raise UserError(f"model folder {str(self.folder)!r}: no weights file holds {k}; the folder is incomplete")
            if self.shapes[k] != tuple(shp):
                raise UserError(
                    f"model folder {str(self.folder)!r}: {k} is {list(self.shapes[k])} in {self.where[k]}, config.json implies {list(shp)}; "
                    "restore the config.json that came with these weights"
                )

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor ``name`` out of its file (cast to ``dtype``). The file is mapped for this read
        only: pages of a file kept mapped would count in the process's resident memory as they
        are read, until the whole model's files did."""
        from safetensors import safe_open

        f = self.where.get(name)
        if f is None:
            raise UserError(f"model folder {str(self.folder)!r}: no weights file holds {name}")
        with safe_open(str(self.folder / f), framework="pt") as handle:
            t = handle.get_tensor(name)
        self.reads[name] += 1
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            return t.to(dtype)
        return t

    def bytes(self) -> int:
        return sum((self.folder / f).stat().st_size for f in self.files)


def _all_finite(t: torch.Tensor, chunk: int = 1 << 20) -> bool:
    """torch.isfinite(t).all() a million elements at a time: on a whole embedding matrix the
    temporaries alone would raise the peak RSS by a multiple of its size (the check runs on
    every compress)."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def check_finite_tensors(tensors: dict[str, torch.Tensor], prefix: str = "", after: str = "nothing was compressed") -> None:
    """Refuse NaN or Inf weights: every method would turn them into a useless checkpoint."""
    for name, t in tensors.items():
        if t.is_floating_point() and t.device.type != "meta" and not _all_finite(t.detach()):
            bad = t.detach().isnan().sum().item(), t.detach().isinf().sum().item()
            raise UserError(
                f"model weight {prefix}{name} has {bad[0]} NaN and {bad[1]} Inf values; the checkpoint is damaged: "
                f"use an intact copy of the model ({after})"
            )


def check_finite(model: nn.Module) -> None:
    """:func:`check_finite_tensors` on every parameter of ``model`` (those on the meta device skipped)."""
    check_finite_tensors(dict(model.named_parameters()))
