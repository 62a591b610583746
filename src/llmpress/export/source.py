"""What an exporter to another format may read: a packed checkpoint without run-time parts."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from . import runtime_state
from .packed import check_packed, packed_version
from .packed_load import read_manifest


def exportable_manifest(src: Path, target: str, consequence: str) -> dict:
    """The manifest of a packed checkpoint another format can hold (no run-time parts:
    rotations, KV-cache or activation quantizers, LLM.int8(), OS+ shifts), else a UserError
    naming ``target`` and what its runtime would do without them (``consequence``)."""
    meta = read_manifest(src)
    if packed_version(meta) is None:
        raise UserError(f"{src}: not a packed llmpress checkpoint (write one with `llmpress compress ... --out DIR`)")
    check_packed(src, meta)
    extras = runtime_state.summary(meta)
    if extras:
        raise UserError(f"{src}: {', '.join(extras)} cannot be stored in {target} ({consequence}); export a checkpoint without them")
    return meta
