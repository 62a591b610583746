"""Saving a compressed model and loading it back: :func:`save` (the packed checkpoint or an HF
folder of fake-quantized weights) and :func:`load_compressed`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from . import io_safety, models
from .arch import get_module, set_module
from .calib.plan import CompressResult
from .errors import UserError
from .quant.args import QuantArgs
from .registry import ModuleRecord
from .report import Report
from .runtime.act_quant import ActQuantLinear

META_FILE = "llmpress.json"
SAVE_FORMATS = ("packed", "hf-fakequant")


def save(model: nn.Module, tokenizer, out: Path, *, report: Report | None = None, overwrite: bool = False, format: str = "packed") -> Path:
    """Save the compressed model.

    ``report``: what :func:`compress` returned; its ``result`` (per-layer records, the
    linears with run-time activation quantization) says how each layer is stored. Without
    it the weights are stored as they are (dense), which is refused for a model that
    compress() changed (it carries activation quantizers) since the checkpoint would lose them.
    ``format="packed"`` (default): the packed checkpoint of :mod:`llmpress.export.packed`
    (low-bit codes, scales, zero points, masks; :func:`load_compressed` rebuilds it with
    runtime modules). ``"hf-fakequant"``: an HF safetensors folder of the dequantized
    weights + llmpress.json (loads in plain transformers, full size).
    The model is read, not changed. Written into a temporary sibling folder and renamed at
    the end: an interrupted save leaves nothing at ``out``.
    """
    if format not in SAVE_FORMATS:
        raise UserError(f"save format {format!r} unknown; expected one of {', '.join(SAVE_FORMATS)}")
    result = _result_of(model, report)
    runtime = None
    if format == "hf-fakequant":  # what the folder cannot hold is refused before anything is written
        from .export.runtime_state import fakequant_meta

        runtime = fakequant_meta(model)  # KV-cache quantizers, LLM.int8(); refuses online rotations, per-block sizes
    out = Path(out)
    if os.path.lexists(out):
        io_safety.check_out(out, overwrite)  # the one message for an existing folder (without overwrite) or file
    try:
        with io_safety.atomic_folder(out, overwrite=overwrite) as tmp:
            _save_into(tmp, model, tokenizer, report, format, result, runtime)
    except OSError as e:
        raise io_safety.write_error(out, e) from None
    return out


def _result_of(model: nn.Module, report: Report | None) -> CompressResult:
    """The compress result a save writes: ``report.result``, or none for an untouched model."""
    result = getattr(report, "result", None)
    if result is not None:
        return result
    wrapped = [n for n, m in model.named_modules() if isinstance(m, ActQuantLinear)]
    if wrapped:
        raise UserError(
            f"the model was compressed ({wrapped[0]} quantizes its inputs at run time): pass report=, what compress() returned, "
            "so the checkpoint stores each layer as compressed"
        )
    return CompressResult()


def _save_into(tmp: Path, model: nn.Module, tokenizer, report: Report | None, format: str, result: CompressResult, runtime: dict | None) -> None:
    """Write the checkpoint of ``format`` into the (temporary) folder ``tmp``
    (``runtime``: hf-fakequant's :func:`~llmpress.export.runtime_state.fakequant_meta`)."""
    if format == "packed":
        from .export.packed import write_packed

        write_packed(model, tokenizer, tmp, result.records, {"report": report.to_dict() if report else None})
    else:
        from .runtime.act_quant import plain_state_dict

        # plain Linear names on disk, so transformers loads the folder
        model.save_pretrained(tmp, state_dict=plain_state_dict(model), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        acts = _act_args(model)
        meta = {
            "format": "llmpress-fakequant-v1",
            "activation_quant": {n: a.to_dict() for n, a in acts.items()},
            **(runtime or {}),
            "report": report.to_dict() if report else None,
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=repr))


def _act_args(model: nn.Module) -> dict[str, QuantArgs]:
    """The activation quantizer of each wrapped linear, by its plain name."""
    return {n: m.args for n, m in model.named_modules() if isinstance(m, ActQuantLinear)}


def load_compressed(path: str, device: str = "cpu", backend: str = "auto", dtype: torch.dtype | None = None):
    """Load a folder written by :func:`save`, or any model :func:`llmpress.models.load` takes.

    Packed checkpoints are rebuilt with runtime modules: ``backend="auto"`` uses the CPU
    low-bit kernels where they apply, ``"dequant"`` the exact dequantize-then-matmul
    fallback (outputs equal the fake-quantized model's). ``hf-fakequant`` folders get
    their dynamic activation quantization back.
    """
    from .export.packed import packed_version
    from .export.packed_load import load_packed, read_manifest
    from .export.runtime_state import attach_fakequant

    if Path(path).is_dir() and packed_version(read_manifest(path)) is not None:
        return load_packed(path, device=device, dtype=dtype, backend=backend)
    model, tok = models.load(path, device=device, **({"dtype": dtype} if dtype else {}))
    meta_path = Path(path) / META_FILE
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        for n, a in (meta.get("activation_quant") or {}).items():
            set_module(model, n, ActQuantLinear(get_module(model, n), QuantArgs.from_dict(a)))
        attach_fakequant(model, meta, str(path))
    return model, tok


def saved_records(path: str) -> dict[str, ModuleRecord]:
    """Bits accounting of a saved folder, rebuilt from its report's per-layer summary."""
    meta = Path(path) / META_FILE
    if not meta.exists():
        return {}
    rep = json.loads(meta.read_text()).get("report") or {}
    out = {}
    for name, info in (rep.get("layers") or {}).items():
        r = ModuleRecord(name=name, out_features=info["shape"][0], in_features=info["shape"][1])
        if info.get("weight_args"):
            r.weight_args = QuantArgs.from_dict(info["weight_args"])
        out[name] = r
    return out
