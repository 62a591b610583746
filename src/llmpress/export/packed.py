"""The packed checkpoint: what `llmpress compress --out DIR` writes, and how it is loaded.

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

Loading (:func:`load_packed`) checks before building anything: the format name, the
file size (truncation), the tensor list, dtypes and shapes against the config and
against each layer's scheme, and (``verify=True``) every tensor's sha256; any mismatch
is a :class:`~llmpress.errors.UserError` naming the tensor. The model skeleton is built
from config.json without initializing weights, compressed linears become runtime
modules (:func:`llmpress.runtime.qlinear.build_linear`), the other tensors are loaded as
stored, then the run-time part is re-attached. docs/checkpoint.md describes the format.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..arch import get_module, set_module
from ..errors import UserError
from ..eval.memory import trim_malloc
from ..registry import ModuleRecord
from ..runtime.act_quant import ActQuantLinear, plain, plain_state_dict
from ..storage.form import LinearSpec, decode_weight, get_form
from . import runtime_state
from .codec import encode_linear
from .mapped import drop_pages, mapped_ranges
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
    qptr = {plain(get_module(model, n)).weight.data_ptr(): n for n, d in layers.items() if d["kind"] == "quant"}
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


def _open_checked(folder: Path, meta: dict, verify: bool) -> dict[str, torch.Tensor]:
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
    tensors = _open_checked(folder, meta, verify)
    rt_tensors = runtime_state.runtime_tensors(tensors, meta, what)  # kept as stored (float64 rotations)
    specs = {n: LinearSpec.from_dict(d, f"layers.{n}") for n, d in (meta.get("layers") or {}).items()}
    layer_t = layers_tensors(specs, tensors)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    dtype = dtype or _DTYPES.get(meta.get("dtype"), torch.float32)
    model = _skeleton(config, dtype)
    runtime_state.prepare(model, meta, tensors, what)
    records = _load_linears(
        model,
        specs=specs,
        layer_t=layer_t,
        tensors=tensors,
        dtype=dtype,
        backend=backend,
        device=device,
        int8=meta.get("llm_int8") or {},
        mapped=mapped_ranges([folder / name for name, _ in _weight_files(meta)]),
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
