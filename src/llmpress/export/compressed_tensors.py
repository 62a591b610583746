"""Export a packed llmpress checkpoint to the compressed-tensors format.

compressed-tensors is what llm-compressor writes and what transformers (with the
``compressed-tensors`` package) and vLLM load. This module writes it directly (no
dependency on that package); the layout follows compressed-tensors 0.20:

- config.json gains ``quantization_config`` (``quant_method: compressed-tensors``):
  ``config_groups`` (one per distinct scheme: ``targets``, ``weights``,
  ``input_activations``), ``ignore`` (linears left in floating point), ``format``
  (``pack-quantized``, ``int-quantized`` or ``mixed-precision`` with a format per group),
  ``quantization_status: compressed``.
- Weight-only integer schemes (W4A16, W8A16, any 1-8 bits; group, channel or tensor
  scales; symmetric or not) are ``pack-quantized``: ``weight_packed`` int32
  [out, ceil(in * bits / 32)], element i of a row at bits [i*bits, (i+1)*bits) of the
  row's little-endian bit stream, values offset by 2^(bits-1) to be unsigned;
  ``weight_scale`` [out, G]; ``weight_shape`` [2]; asymmetric: ``weight_zero_point``
  packed the same way along the output dimension ([ceil(out * bits / 32), G]).
  compressed-tensors counts codes and zero points in [-2^(bits-1), 2^(bits-1)); llmpress
  counts asymmetric ones in [0, 2^bits): both give the same unsigned bits, so
  llmpress's ``qweight`` words are reused as they are (minus the padding of the last
  32-code block).
- Weight and activation schemes (W8A8: dynamic per-token int8 activations) are
  ``int-quantized``: ``weight`` int8 codes, ``weight_scale``.
- Sparsity: compressed-tensors 0.20 stores no sparse format (``sparsity_config`` is
  written empty, the sparse-24 compressors were removed after 0.14). A 2:4-sparse
  quantized layer exports as its packed codes (pruned weights are zero codes); a
  sparse-only layer exports dense. The structure of each layer stays recorded in the
  export's llmpress.json.

Each storage form says how it exports (``ct_scheme`` / ``ct_tensors`` of
:mod:`llmpress.storage.forms`). Not representable, refused with a UserError naming the
layer: ternary / binary codes,
a column group index (act-order groups; removed from compressed-tensors), kept
full-precision outliers, activation quantization without weight quantization. Refused
for the whole checkpoint, naming what: the run-time part of a packed v2 checkpoint
(online rotations, KV-cache quantizers, LLM.int8() decomposition, OS+ norm shifts and
added biases; see :mod:`llmpress.export.runtime_state`), which a compressed-tensors
loader would not run.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import UserError
from ..io_safety import OutputLock, atomic_folder, check_out, write_error
from ..storage.form import LinearSpec, decode_weight, get_form
from .packed import _DTYPES, META_FILE
from .packed_load import layers_tensors, open_checked
from .skeleton import skeleton as _skeleton
from .source import exportable_manifest

CT_VERSION = "0.20.0"
_COPY = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


def scheme_of(name: str, spec: LinearSpec) -> tuple[dict, str] | None:
    """(compressed-tensors scheme, format) of a layer; None for a layer written dense; a
    UserError naming the layer when its storage form has no compressed-tensors form."""
    return get_form(spec.kind).ct_scheme(name, spec)


def _ct_tensors(name: str, spec: LinearSpec, t: dict[str, torch.Tensor], fmt: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return get_form(spec.kind).ct_tensors(name, spec, t, fmt, dtype)


def _quantization_config(src: Path, groups: dict[str, dict]) -> dict:
    """config.json's ``quantization_config`` for the layer groups (scheme, format, names)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(src, local_files_only=True)
    linears = [n for n, m in _skeleton(config, meta=True).named_modules() if isinstance(m, nn.Linear)]
    quantized = {n for g in groups.values() for n in g["names"]}
    one = len(groups) == 1
    config_groups = {
        f"group_{i}": {"targets": ["Linear"] if one else sorted(g["names"]), **g["scheme"], "format": g["format"]}
        for i, g in enumerate(groups.values())
    }
    formats = {g["format"] for g in groups.values()}
    return {
        "quant_method": "compressed-tensors",
        "version": CT_VERSION,
        "config_groups": config_groups,
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "ignore": [n for n in linears if n not in quantized],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }


def _source_manifest(src: Path) -> dict:
    """The manifest of a packed checkpoint compressed-tensors can hold, else a UserError."""
    return exportable_manifest(src, "compressed-tensors", "transformers and vLLM would run the model without them")


def export_compressed_tensors(src: str | Path, out: str | Path, *, dtype: str = "auto", overwrite: bool = False) -> Path:
    """Write the compressed-tensors form of the packed checkpoint ``src`` into ``out``.

    ``dtype``: floating dtype of scales and unquantized tensors ("auto": as stored;
    vLLM's int4/int8 kernels want float16 or bfloat16). ``out`` is checked first (not a
    file, not ``src`` nor inside it, writable), locked, and written atomically.
    """
    src = Path(src)
    meta = _source_manifest(src)
    out = check_out(out, overwrite, inputs=(src,))
    with OutputLock(out=out):
        return _write_export(src, out, meta=meta, dtype=dtype, overwrite=overwrite)


def _write_export(src: Path, out: Path, *, meta: dict, dtype: str, overwrite: bool) -> Path:
    dt = _DTYPES.get(meta.get("dtype") if dtype == "auto" else str(getattr(torch, dtype, None)))
    if dt is None or not dt.is_floating_point:
        raise UserError(f"dtype {dtype!r}: expected auto, float32, bfloat16 or float16")
    conv = _convert(src, meta, dt)
    if not conv.groups:
        raise UserError(f"{src}: no quantized layer to export (compressed-tensors needs at least one)")
    qcfg = _quantization_config(src, conv.groups)
    try:
        with atomic_folder(out, overwrite=overwrite) as tmp:
            _write_folder(tmp, src, conv, qcfg, dt)
    except OSError as e:
        raise write_error(out, e) from None
    return out


@dataclass(kw_only=True)
class _Converted:
    tensors: dict[str, torch.Tensor]  # the compressed-tensors state dict
    groups: dict[str, dict]  # json of scheme -> {"scheme", "format", "names"}
    structure: dict[str, dict]  # sparse layers: their structure and sparsity
    tied_quant: dict[str, str]  # quantized head -> the embedding stored as its codes


def _convert(src: Path, meta: dict, dt: torch.dtype) -> _Converted:
    """Every tensor of the packed checkpoint in its compressed-tensors form."""
    tensors = open_checked(src, meta, verify=True)
    specs = {n: LinearSpec.from_dict(d, f"layers.{n}") for n, d in (meta.get("layers") or {}).items()}
    # embeddings stored as a quantized head's codes: written dense (the head stays quantized, untied)
    conv = _Converted(tensors={}, groups={}, structure={}, tied_quant={lin: emb for emb, lin in (meta.get("tied_quant_embeddings") or {}).items()})
    result = conv.tensors
    all_lt = layers_tensors(specs, tensors)
    for name, spec in specs.items():
        if spec.structure:
            conv.structure[name] = {"structure": spec.structure, "sparsity": spec.sparsity}
        got = scheme_of(name, spec)
        if spec.kind == "dense":
            continue
        lt = all_lt.pop(name)
        for k in lt:
            tensors.pop(f"{name}.{k}", None)  # a shared tensor is stored under its owner's name
        if name in conv.tied_quant:
            result[conv.tied_quant[name]] = decode_weight(spec, lt, dt).contiguous()
        if got is None:  # sparse-only: dense weight
            result[f"{name}.weight"] = decode_weight(spec, lt, dt).contiguous()
            continue
        scheme, fmt = got
        key = json.dumps([scheme, fmt], sort_keys=True)
        conv.groups.setdefault(key, {"scheme": scheme, "format": fmt, "names": []})["names"].append(name)
        result.update(_ct_tensors(name, spec, lt, fmt, dt))
    tied = meta.get("tied") or {}
    for k, v in tensors.items():
        if k not in tied:
            result[k] = (v.to(dt) if v.is_floating_point() else v).contiguous()
    return conv


def _write_folder(tmp: Path, src: Path, conv: _Converted, qcfg: dict, dt: torch.dtype) -> None:
    """config.json (with the quantization config), model.safetensors, the tokenizer files."""
    from safetensors.torch import save_file

    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = qcfg
    if conv.tied_quant:
        cfg["tie_word_embeddings"] = False
    cfg["dtype"] = str(dt).replace("torch.", "")
    cfg.pop("torch_dtype", None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    save_file(conv.tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    for f in _COPY:
        if (src / f).exists():
            shutil.copy2(src / f, tmp / f)
    (tmp / META_FILE).write_text(json.dumps({"format": "compressed-tensors", "source": str(src), "sparsity": conv.structure}, indent=1))
