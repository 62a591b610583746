"""Size figures of packed checkpoints: the bytes of a checkpoint against its theoretical
size (:func:`checkpoint_accounting`) and the size of a model loaded from one (:func:`packed_model_size`)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..storage.form import LinearSpec, get_form
from .skeleton import skeleton as _skeleton

_DTYPES = {
    str(d): d
    for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool)
}


def checkpoint_accounting(meta: dict) -> dict:
    """Bytes of a packed checkpoint against its theoretical size.

    Theoretical: per compressed linear its storage form's ``stored_bits`` (integer grids:
    ``bits`` per weight plus scales and zero points at ``bits``; sparse masks: 1 bit per
    weight plus the kept values); every other tensor at its stored dtype. Given with the
    scales at their stored width (float32) and at 16 bits (what ``bits_per_weight``
    accounting assumes).
    """

    def numel(shape) -> int:
        n = 1
        for d in shape:
            n *= d
        return n

    def nbytes(info) -> int:
        return numel(info["shape"]) * torch.empty((), dtype=_DTYPES[info["dtype"]]).element_size()

    tensors = meta.get("tensors") or {}
    theory = {32: 0.0, 16: 0.0}
    layer_keys = set()
    for name, d in (meta.get("layers") or {}).items():
        spec = LinearSpec.from_dict(d, f"layers.{name}")
        if spec.kind == "dense":
            continue
        keys = {k for k in tensors if k.startswith(name + ".") and not k.endswith((".weight", ".bias"))}
        layer_keys |= keys
        layer_bytes = {k[len(name) + 1 :]: nbytes(tensors[k]) for k in keys}
        for sb in theory:
            theory[sb] += get_form(spec.kind).stored_bits(spec, layer_bytes, sb)
    other = sum(nbytes(v) for k, v in tensors.items() if k not in layer_keys)
    return {
        "file_bytes": meta.get("file_bytes"),
        "tensor_bytes": sum(nbytes(v) for v in tensors.values()),
        "compressed_linear_bytes": sum(nbytes(tensors[k]) for k in layer_keys),
        "other_bytes": other,
        "theoretical_bytes": theory[32] / 8 + other,
        "theoretical_bytes_16bit_scales": theory[16] / 8 + other,
    }


def packed_model_size(model: nn.Module) -> dict | None:
    """:func:`llmpress.eval.size.model_size` of a model loaded by :func:`load_packed` (None
    for other models): counted on a meta-device skeleton of the architecture, since
    runtime modules hold buffers, not parameters; plus the checkpoint's bytes."""
    meta = getattr(model, "llmpress_manifest", None)
    if meta is None:
        return None
    from ..eval.size import model_size

    skel = _skeleton(model.config, meta=True)
    sizes = (meta.get("structure") or {}).get("block_sizes")
    if sizes:  # blocks of their own sizes: the skeleton of the config has the largest block's
        from ..arch import get_arch
        from ..prune.structure import resize_blocks

        resize_blocks(skel, get_arch(skel), sizes)
    size = model_size(skel, getattr(model, "llmpress_records", {}))
    size["checkpoint_bytes"] = meta.get("file_bytes")
    return size
