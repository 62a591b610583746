"""Model size: bits per weight and bytes, counting what a packed checkpoint would hold.

Convention: compressed linears count what their storage form says
(:meth:`llmpress.storage.form.StorageForm.bits_per_weight`; integer grids: their integer
bits plus scales (16-bit) and zero points); every other tensor counts at ``dense_bits``
(16 by default, the usual fp16/bf16 storage), for the baseline and the compressed model
alike, so the ratio is fair. Tied weights (embeddings shared with the output head) count once.
"""

from __future__ import annotations

import torch.nn as nn

from ..registry import ModuleRecord
from ..storage.form import counts_as_compressed


def model_size(model: nn.Module, records: dict[str, ModuleRecord] | None = None, dense_bits: int = 16) -> dict:
    records = records or {}
    seen: set[int] = set()
    total_bits = 0.0
    linear_params = 0
    linear_bits = 0.0
    n_params = 0
    quantized = {}
    for name, mod in model.named_modules():
        rec = records.get(name) or (records.get(name[: -len(".linear")]) if name.endswith(".linear") else None)
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = p.numel()
            n_params += n
            if rec is not None and pname == "weight" and counts_as_compressed(rec):
                bpw = rec.bits_per_weight(dense_bits)
                quantized[name] = bpw
            else:
                bpw = dense_bits
            total_bits += n * bpw
            if pname == "weight" and (isinstance(mod, nn.Linear) or rec is not None) and p.dim() == 2:
                linear_params += n
                linear_bits += n * bpw
    return {
        "n_params": n_params,
        "size_mb": total_bits / 8 / 1e6,
        "bits_per_weight": linear_bits / linear_params if linear_params else float(dense_bits),
        "bits_per_param_all": total_bits / n_params if n_params else 0.0,
        "quantized_linears": len(quantized),
        "dense_bits": dense_bits,
    }
