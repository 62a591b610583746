"""The packed checkpoint: what `llmpress compress --out DIR` writes (loading: :mod:`llmpress.export.packed_load`).

Folder layout::

    config.json, generation_config.json, tokenizer files   (Hugging Face, unchanged)
    model.llmpress.safetensors    every tensor: the model's uncompressed tensors under
                                  their usual names (embeddings, norms, biases, linears
                                  left dense) at their stored dtype, per compressed
                                  linear NAME the tensors of its storage form (llmpress.storage.forms)
                                  (NAME.qweight, NAME.scale, NAME.zero_point, ...), and
                                  under llmpress.runtime.* the run-time tensors (DuQuant
                                  blocks and permutations, dense rotation matrices)
    llmpress.json                 format, the model dtype, per compressed linear its
                                  LinearSpec (scheme, shape, activation quantization,
                                  sparsity), per tensor its dtype, shape and sha256,
                                  the weights file's size, tied names, the report; v2
                                  also ``runtime`` / ``llm_int8`` / ``structure``;
                                  v4 also ``structure.block_sizes``

Versions: ``llmpress-packed-v1`` holds tensors and linears' schemes only;
``llmpress-packed-v2`` adds the run-time part of the model
(:mod:`llmpress.export.runtime_state`: online rotations, KV-cache quantizers, LLM.int8()
linears, OS+ norm shifts and added biases). A model without a run-time part is written as
v1, so older llmpress reads it; an older llmpress refuses v2 (it would drop the run-time
part silently). ``llmpress-packed-v4``: decoder blocks of their own sizes
(``structure.block_sizes``, ``prune_width allocation: global``), which an older llmpress
would try to load into the config's uniform shapes. A version newer than :data:`VERSION` is
refused by name.

The weights file is deliberately not called model.safetensors: transformers cannot
read it, and refuses the folder instead of building a model with random weights.

Loading (:func:`llmpress.export.packed_load.load_packed`) checks every tensor against this
manifest before building a model. docs/checkpoint.md describes the format.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import torch
import torch.nn as nn

from ..arch import get_module
from ..errors import UserError
from ..eval.memory import trim_malloc
from ..registry import ModuleRecord
from ..runtime.act_quant import plain, plain_state_dict
from ..storage.form import LinearSpec, get_form
from . import runtime_state
from .codec import encode_linear
from .packed_size import _DTYPES, checkpoint_accounting, packed_model_size  # noqa: F401 (their home before)
from .skeleton import skeleton as _skeleton

log = logging.getLogger(__name__)

FORMAT_V1 = "llmpress-packed-v1"  # tensors and linears' schemes only
FORMAT_V2 = "llmpress-packed-v2"  # + run-time modules and structure edits (export/runtime_state.py)
FORMAT = FORMAT_V2
FORMAT_SHARDED = "llmpress-packed-v3"  # + the tensors in several files (a streamed compress, export/sharded.py)
FORMAT_BLOCK_SIZES = "llmpress-packed-v4"  # + decoder blocks of their own sizes (structure.block_sizes)
VERSION = 4
META_FILE = "llmpress.json"
WEIGHTS_FILE = "model.llmpress.safetensors"


def packed_version(meta: dict | None) -> int | None:
    """N of a manifest's ``llmpress-packed-vN`` format (None: not a packed checkpoint)."""
    m = re.fullmatch(r"llmpress-packed-v(\d+)", str((meta or {}).get("format", "")))
    return int(m.group(1)) if m else None


def check_packed(folder: Path, meta: dict | None) -> int:
    """The format version of a packed checkpoint this llmpress can read, else a UserError."""
    v = packed_version(meta)
    if v is None:
        raise UserError(f"{folder}: not a packed llmpress checkpoint (format {None if meta is None else meta.get('format')!r}, expected {FORMAT!r})")
    if v > VERSION:
        raise UserError(
            f"{folder}: written by a newer llmpress (format {meta['format']}; this llmpress reads up to {FORMAT_BLOCK_SIZES}): upgrade llmpress to load it"
        )
    return v


def sha256(t: torch.Tensor) -> str:
    # hashed through the buffer protocol: no bytes copy of the tensor (as large as an embedding matrix)
    return hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def write_packed(model: nn.Module, tokenizer, folder: Path, records: dict[str, ModuleRecord], extra_meta: dict | None = None) -> dict:
    """Write the packed checkpoint of ``model`` into the existing empty ``folder``.

    ``records``: what compress() did to each linear (``report.result.records``, see
    :class:`llmpress.calib.plan.CompressResult`). The model is read, not changed: its
    activation-quantization wrappers are stored under the plain linears' names.
    Returns the manifest written to llmpress.json. The format is :data:`FORMAT_V1` when
    the model has no run-time modules nor structure edits (readable by older llmpress),
    :data:`FORMAT_BLOCK_SIZES` when its blocks differ in size, :data:`FORMAT` otherwise.
    """
    from safetensors.torch import save_file

    state = plain_state_dict(model)  # the names without activation-quantization wrappers
    extras, extra_t = runtime_state.collect(model, state, set(_skeleton(model.config, meta=True).state_dict()))
    layers, tensors, dense_fallback = encode_records(model, state, records)
    warn_dense(dense_fallback)
    tied_quant, tied = _find_ties(model, state, layers, tensors)
    tensors.update(extra_t)
    path = folder / WEIGHTS_FILE
    # one metadata key: safetensors writes the metadata map in hash order, which differs
    # between processes, so two keys made the same command write different bytes
    save_file(tensors, str(path), metadata={"format": "pt"})
    manifest = {
        "format": _format_of(extras),
        "weights_file": WEIGHTS_FILE,
        "file_bytes": path.stat().st_size,
        "dtype": str(next(p.dtype for p in model.parameters() if p.is_floating_point())),
        "layers": layers,
        "tied": tied,
        "tied_quant_embeddings": tied_quant,
        "dense_layers": dense_fallback,
        "tensors": {k: {"dtype": str(v.dtype), "shape": list(v.shape), "sha256": sha256(v)} for k, v in tensors.items()},
        **extras,
        **(extra_meta or {}),
    }
    write_folder_files(folder, model, tokenizer, manifest)
    return manifest


def _format_of(extras: dict) -> str:
    """The oldest format that holds what ``extras`` (:func:`runtime_state.collect`) describes."""
    if (extras.get("structure") or {}).get("block_sizes"):
        return FORMAT_BLOCK_SIZES
    return FORMAT if extras else FORMAT_V1


def write_folder_files(folder: Path, model: nn.Module, tokenizer, manifest: dict) -> None:
    """config.json, generation_config.json, the tokenizer files and llmpress.json."""
    model.config.save_pretrained(folder)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    (folder / META_FILE).write_text(json.dumps(manifest, indent=1, default=repr))


def encode_records(root: nn.Module, state: dict[str, torch.Tensor], records: dict[str, ModuleRecord], prefix: str = "") -> tuple[dict, dict, list]:
    """(layers, tensors, dense_fallback) of the compressed linears under ``root``: each
    record's storage form (its LinearSpec in ``layers``, its tensors under ``NAME.``); their
    dense weights are removed from ``state`` (``root``'s plain state dict; names in both are
    ``prefix`` + the name under ``root``)."""
    layers: dict[str, dict] = {}
    tensors: dict[str, torch.Tensor] = {}
    dense_fallback = []
    for name, rec in records.items():
        if not name.startswith(prefix):
            continue
        mod = plain(get_module(root, name[len(prefix) :]))
        if not isinstance(mod, nn.Linear):
            raise UserError(f"layer {name}: expected a Linear to store, found {type(mod).__name__}")
        enc = encode_linear(mod.weight, rec)
        if enc is None:
            if rec.weight_args is None and rec.act_args is None:
                continue
            if rec.weight_args is not None:
                dense_fallback.append(name)
            spec = LinearSpec(
                kind="dense", out_features=mod.out_features, in_features=mod.in_features, act_args=rec.act_args, methods=list(rec.methods)
            )
        else:
            spec, enc_t = enc
            del state[f"{name}.weight"]
            tensors.update({f"{name}.{k}": v for k, v in enc_t.items()})
        layers[name] = spec.to_dict()
        trim_malloc()  # encoding temporaries freed between the kept codes would stay resident otherwise
    return layers, tensors, dense_fallback


def warn_dense(dense_fallback: list[str]) -> None:
    if dense_fallback:
        log.warning(
            "%d quantized layer(s) hold weights off their recorded grid (changed after quantization?) and are stored dense: %s",
            len(dense_fallback),
            ", ".join(dense_fallback[:5]) + (" ..." if len(dense_fallback) > 5 else ""),
        )


def _find_ties(model: nn.Module, state: dict, layers: dict, tensors: dict) -> tuple[dict[str, str], dict[str, str]]:
    """(embeddings tied to a stored quantized linear, other tied names -> their first name);
    the untied rest of ``state`` goes into ``tensors``."""
    # an embedding tied to a stored (quantized) linear: rebuilt from that linear's codes
    tied_quant: dict[str, str] = {}
    qptr = {plain(get_module(model, n)).weight.data_ptr(): n for n, d in layers.items() if get_form(d["kind"]).ties_embedding}
    for k in [k for k, v in state.items() if k.endswith(".weight") and v.data_ptr() in qptr]:
        owner = get_module(model, k.rsplit(".", 1)[0])
        if isinstance(owner, nn.Embedding) and tuple(state[k].shape) == tuple(plain(get_module(model, qptr[state[k].data_ptr()])).weight.shape):
            tied_quant[k] = qptr[state.pop(k).data_ptr()]
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for k, v in state.items():
        key = (v.data_ptr(), v.dtype, tuple(v.shape), tuple(v.stride()))
        if v.numel() and key in seen:
            tied[k] = seen[key]
            continue
        seen[key] = k
        tensors[k] = v.detach().cpu().contiguous()
    return tied_quant, tied
