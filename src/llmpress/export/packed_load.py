"""Loading a packed checkpoint (:mod:`llmpress.export.packed` writes it; docs/checkpoint.md).

:func:`load_packed` checks before building anything: the format name, the file size
(truncation), the tensor list, dtypes and shapes against the config and against each
layer's scheme, and (``verify=True``) every tensor's sha256; any mismatch is a
:class:`~llmpress.errors.UserError` naming the tensor. The model skeleton is built from
config.json without initializing weights, compressed linears become runtime modules
(:func:`llmpress.runtime.qlinear.build_linear`), the other tensors are loaded as stored,
then the run-time part is re-attached. :func:`read_manifest`, :func:`layers_tensors` and
:func:`open_checked` serve the exporters (compressed-tensors, GGUF) that read a checkpoint
without building a model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..arch import get_module, set_module
from ..errors import UserError
from ..registry import ModuleRecord
from ..runtime.act_quant import ActQuantLinear
from ..storage.form import LinearSpec, decode_weight, get_form
from . import runtime_state
from .mapped import drop_pages, mapped_ranges, own_memory
from .packed import META_FILE, WEIGHTS_FILE, check_packed, sha256
from .packed_size import _DTYPES
from .skeleton import skeleton as _skeleton

log = logging.getLogger(__name__)


def read_manifest(folder: str | Path) -> dict | None:
    """llmpress.json of a folder (None when there is none), format-checked."""
    p = Path(folder) / META_FILE
    if not p.exists():
        return None
    try:
        meta = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: not valid JSON ({e}); the checkpoint is damaged") from None
    if not isinstance(meta, dict) or "format" not in meta:
        raise UserError(f"{p}: no 'format' field; not an llmpress checkpoint config")
    return meta


def open_checked(folder: Path, meta: dict, verify: bool) -> dict[str, torch.Tensor]:
    """All tensors of a packed checkpoint, after checking them against the manifest."""
    tensors: dict[str, torch.Tensor] = {}
    for name, nbytes in _weight_files(meta):
        tensors.update(_read_weights(folder, name, nbytes))
    expected = meta.get("tensors") or {}
    missing = sorted(set(expected) - set(tensors))
    unknown = sorted(set(tensors) - set(expected))
    if missing or unknown:
        raise UserError(f"checkpoint {folder}: tensors missing {missing[:3]} / not in the config {unknown[:3]}")
    for k, info in expected.items():
        t = tensors[k]
        if str(t.dtype) != info["dtype"] or list(t.shape) != list(info["shape"]):
            raise UserError(f"checkpoint {folder}: tensor {k} is {t.dtype} {list(t.shape)}, the config says {info['dtype']} {info['shape']}")
        if verify and sha256(t) != info["sha256"]:
            raise UserError(f"checkpoint {folder}: tensor {k} fails its sha256 check (corrupted or tampered)")
    return tensors


def _weight_files(meta: dict) -> list[tuple[str, int | None]]:
    """(file name, its size) of each weights file a manifest names: one (v1, v2) or several (v3)."""
    files = meta.get("weights_files")
    if isinstance(files, list):
        return [(str(f.get("name")), f.get("file_bytes")) for f in files if isinstance(f, dict)]
    return [(meta.get("weights_file", WEIGHTS_FILE), meta.get("file_bytes"))]


def _read_weights(folder: Path, name: str, nbytes: int | None) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    where = folder / name
    if not where.exists():
        raise UserError(f"checkpoint {folder}: weights file {where.name} is missing")
    size = where.stat().st_size
    if size != nbytes:
        raise UserError(f"checkpoint {folder}: {where.name} has {size} bytes, the config says {nbytes} (truncated or replaced)")
    try:
        return load_file(str(where))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise UserError(f"checkpoint {folder}: cannot read {where.name}: {e}") from None


def layers_tensors(specs: dict[str, LinearSpec], tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Each stored (non-dense) layer's tensors, checked against its scheme, with the tensors it
    shares with another layer (``meta.shared``: QSVD's B) handed over from that layer."""
    out = {n: _layer_tensors(n, s, tensors) for n, s in specs.items() if s.kind != "dense"}
    for name, spec in specs.items():
        for key, owner in (spec.meta.get("shared") or {}).items():
            held = {k: v for k, v in out.get(owner, {}).items() if k == key or k.startswith(key + ".")}  # a factor, or its grid's tensors
            if not held:
                raise UserError(f"checkpoint layer {name}: its {key} is stored with {owner}, which the checkpoint does not hold")
            out[name].update(held)
    return out


def _layer_tensors(name: str, spec: LinearSpec, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    pre = f"{name}."
    out = {k[len(pre) :]: v for k, v in tensors.items() if k.startswith(pre) and k[len(pre) :] not in ("weight", "bias")}
    shapes = spec.expected_shapes()  # None: any length
    if set(out) != set(shapes):
        raise UserError(f"checkpoint layer {name}: stores {sorted(out)}, its scheme needs {sorted(shapes)}")
    for k, shp in shapes.items():
        if shp is not None and tuple(out[k].shape) != tuple(shp):
            raise UserError(f"checkpoint layer {name}: {k} has shape {list(out[k].shape)}, its scheme needs {list(shp)}")
    return out


def load_packed(folder: str | Path, device: str = "cpu", dtype: torch.dtype | None = None, backend: str = "auto", verify: bool = True):
    """Rebuild (model, tokenizer) from a packed checkpoint, with runtime modules.

    ``dtype``: floating dtype of the uncompressed tensors (default: as stored).
    ``backend``: "auto" (CPU kernels where they apply) or "dequant" (exact fallback).
    """
    from transformers import AutoConfig, AutoTokenizer

    folder = Path(folder)
    meta = read_manifest(folder)
    check_packed(folder, meta)
    what = f"checkpoint {folder}"
    tensors = open_checked(folder, meta, verify)
    rt_tensors = runtime_state.runtime_tensors(tensors, meta, what)  # kept as stored (float64 rotations)
    specs = {n: LinearSpec.from_dict(d, f"layers.{n}") for n, d in (meta.get("layers") or {}).items()}
    layer_t = layers_tensors(specs, tensors)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    dtype = dtype or _DTYPES.get(meta.get("dtype"), torch.float32)
    model = _skeleton(config, dtype)
    runtime_state.prepare(model, meta, tensors, what)
    mapped = mapped_ranges([folder / name for name, _ in _weight_files(meta)])
    records = _load_linears(
        model,
        specs=specs,
        layer_t=layer_t,
        tensors=tensors,
        dtype=dtype,
        backend=backend,
        device=device,
        int8=meta.get("llm_int8") or {},
        mapped=mapped,
    )
    dense = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(dense, strict=False, assign=True)
    replaced = tuple(f"{n}." for n, s in specs.items() if s.kind != "dense")  # runtime modules' own buffers
    tied_quant = meta.get("tied_quant_embeddings") or {}
    left = sorted(k for k in set(missing) - set(meta.get("tied") or {}) - set(tied_quant) if not k.startswith(replaced))
    if left or unexpected:
        raise UserError(f"checkpoint {folder}: tensors missing for {left[:3]}, or not in the model: {list(unexpected)[:3]}")
    _tie(model, meta, specs, records, layer_t, dtype, what)
    for name, spec in specs.items():
        if spec.kind == "dense" and spec.act_args is not None:
            set_module(model, name, ActQuantLinear(get_module(model, name), spec.act_args))
    int8_qp = {n: records[n].qparams for n in (meta.get("llm_int8") or {}) if n in records and records[n].qparams is not None}
    runtime_state.attach(model, meta, rt_tensors, what, int8_qp)
    from ..runtime.latent_kv import attach_latent_kv

    model.llmpress_latent_kv = attach_latent_kv(model)  # type: ignore[attr-defined]  # QSVD: the shared latent is the KV cache
    model.eval().to(device)
    del tensors, dense, layer_t
    own_memory(model, mapped)  # what still views the file (embeddings, norms, dense layers) runs faster in memory of its own
    _release_freed_memory()
    model.llmpress_records = records  # type: ignore[attr-defined]
    model.llmpress_manifest = meta  # type: ignore[attr-defined]
    model.llmpress_source = str(folder)  # type: ignore[attr-defined]
    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError):
        tok = None
    return model, tok


def _load_linears(
    model: nn.Module,
    *,
    specs: dict[str, LinearSpec],
    layer_t: dict,
    tensors: dict,
    dtype,
    backend: str,
    device: str,
    int8: dict,
    mapped: list[tuple[int, int]] | None = None,
) -> dict[str, ModuleRecord]:
    """Stored linears into the skeleton: runtime modules (compressed), the decoded weight
    (LLM.int8() linears, converted once loaded); their tensors leave ``tensors``, and the pages
    of a decoded layer's stored tensors in the ``mapped`` weights file go back to the kernel."""
    from ..runtime.qlinear import build_linear

    records = {}
    for name, spec in specs.items():
        try:
            lin = get_module(model, name)
        except (AttributeError, UserError):
            raise UserError(f"checkpoint layer {name}: the model of config.json has no such module") from None
        if not isinstance(lin, nn.Linear) or (lin.out_features, lin.in_features) != (spec.out_features, spec.in_features):
            raise UserError(f"checkpoint layer {name}: shape {[spec.out_features, spec.in_features]} does not fit the model's {type(lin).__name__}")
        records[name] = _record(name, spec, layer_t.get(name))
        if spec.kind == "dense":
            continue
        if name in int8:  # the weight the LLM.int8() linear multiplies its outlier columns with
            lin.weight = nn.Parameter(decode_weight(spec, layer_t[name], dtype), requires_grad=False)
        else:
            bias = tensors.pop(f"{name}.bias", None)
            if (bias is None) != (lin.bias is None):
                raise UserError(f"checkpoint layer {name}: bias {'missing' if bias is None else 'unexpected'}")
            set_module(model, name, build_linear(spec, layer_t[name], None if bias is None else bias.to(dtype), backend, device))
        decoded = name in int8 or get_form(spec.kind).decodes_at_load
        for k, t in layer_t[name].items():
            tensors.pop(f"{name}.{k}", None)  # a shared tensor is stored under its owner's name
            if decoded:
                drop_pages(t, mapped or [])
        layer_t[name] = dict.fromkeys(layer_t[name])  # only the names stay: a decoded form's stored tensors are freed now, not at the end
    return records


def _tie(model: nn.Module, meta: dict, specs: dict, records: dict, layer_t: dict, dtype, what: str) -> None:
    """Tied tensors: embeddings read from a quantized head, the other ties re-made."""
    tied_quant = meta.get("tied_quant_embeddings") or {}
    for emb_key, lin_name in tied_quant.items():
        owner = emb_key.rsplit(".", 1)[0]
        if lin_name not in specs or specs[lin_name].kind == "dense" or not isinstance(get_module(model, owner), nn.Embedding):
            raise UserError(f"{what}: embedding {owner} is tied to {lin_name}, which is not a stored quantized linear")
        qp, lt = records[lin_name].qparams, layer_t[lin_name]
        per_row = qp is not None and qp.zero_point is None and qp.scale.numel() == specs[lin_name].out_features
        rows = qp.scale if per_row and "exc_index" not in lt and "g_idx" not in lt else None
        emb = get_module(model, owner)
        set_module(model, owner, QuantEmbedding(get_module(model, lin_name), emb.padding_idx, dtype, rows, getattr(emb, "embed_scale", None)))
    if not tied_quant:
        model.tie_weights()
    for alias, target in (meta.get("tied") or {}).items():  # whatever tie_weights did not re-tie
        owner, attr = alias.rsplit(".", 1)
        t = model.get_parameter(target)
        if getattr(get_module(model, owner), attr, None) is not t:
            setattr(get_module(model, owner), attr, t)


def _release_freed_memory() -> None:
    """Hand the float skeleton's freed weights back to the OS (glibc keeps freed heap pages
    otherwise: a packed W4 model would hold its fp32 skeleton's size in RSS)."""
    import gc

    from ..eval.memory import trim_malloc

    gc.collect()
    trim_malloc()


class QuantEmbedding(nn.Module):
    """An embedding whose table is a quantized linear's weight (a tied output head).

    With ``row_scales`` (symmetric codes, one scale per row, no kept exceptions) a lookup
    gathers only the rows' codes and scales them; otherwise the whole table is dequantized
    per call. Equal to the fake-quantized model's tied embedding either way. ``embed_scale``:
    the factor a scaled embedding (gemma3's sqrt(hidden)) multiplies its rows with."""

    def __init__(
        self,
        linear: nn.Module,
        padding_idx: int | None = None,
        dtype: torch.dtype = torch.float32,
        row_scales: torch.Tensor | None = None,
        embed_scale: torch.Tensor | None = None,
    ):
        super().__init__()
        self.dtype = dtype
        self.linear = [linear]  # not a submodule: the head owns its buffers (counted once)
        self.num_embeddings, self.embedding_dim = linear.out_features, linear.in_features
        self.padding_idx = padding_idx
        codes = getattr(linear, "codes", None)
        gather = row_scales is not None and codes is not None and tuple(codes.shape) == (self.num_embeddings, self.embedding_dim)
        # float32 scales: the head's kernel may hold them rounded to its activation dtype
        self.register_buffer("row_scales", row_scales.float().reshape(-1) if gather else None, persistent=False)
        self.register_buffer("embed_scale", None if embed_scale is None else embed_scale.detach().clone(), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.linear[0].dequantized_weight()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        lin = self.linear[0]
        if self.row_scales is not None:
            out = (lin.codes[ids].float() * self.row_scales[ids].unsqueeze(-1)).to(self.dtype)
        else:
            out = F.embedding(ids, lin.dequantized_weight()).to(self.dtype)
        return out if self.embed_scale is None else out * self.embed_scale.to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tied to a quantized linear"


def _record(name: str, spec: LinearSpec, t: dict | None) -> ModuleRecord:
    form = get_form(spec.kind)
    qp = form.qparams(spec, t)
    return ModuleRecord(
        name=name,
        out_features=spec.out_features,
        in_features=spec.in_features,
        methods=list(spec.methods),
        weight_args=spec.weight_args,
        qparams=qp,
        act_args=spec.act_args,
        sparsity=spec.sparsity,
        form=spec.kind,
        payload=form.payload(spec, t),
    )
