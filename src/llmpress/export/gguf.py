"""Export a packed llmpress checkpoint as one GGUF file (llama.cpp, ollama).

``llmpress export --format gguf CHECKPOINT --out MODEL.gguf``. Scope: the Llama
architecture (``model_type: llama``, e.g. SmolLM2) and Gemma 3 (``gemma3_text``, e.g.
gemma-3-270m), with the tokenizer (byte-level BPE, or SentencePiece-style BPE as Gemma's) as
GGUF metadata. Tensor names, metadata keys and tensor values are the ones llama.cpp's
``convert_hf_to_gguf.py`` writes for each (:mod:`llmpress.export.gguf_arch`: Llama's q/k rows
permuted into llama.cpp's rotary layout, Gemma's norms stored as ``w + 1``; the tokenizer:
:mod:`llmpress.export.gguf_vocab`).

Compressed linears become GGUF blocks only where the grids coincide exactly
(:mod:`llmpress.export.gguf_blocks`: ``Q4_0``, ``Q4_1``, ``Q5_0``, ``Q5_1``, ``Q8_0``,
``Q2_K``, ``Q3_K``, ``Q4_K``, ``Q5_K``, ``Q6_K``, ``IQ4_NL``, ``IQ4_XS``, each checked bit for
bit against llmpress's dequantized weight); any layer
without an exact form refuses the
whole export, naming the layer, its grid and the nearest preset that exports. Unquantized
tensors are written as float: ``dtype="auto"`` gives 2-D weights (embeddings, a float
head) float16 and 1-D ones (norms, biases) float32, as llama.cpp's converter does;
``float32`` writes every float tensor as float32 (exact); ``float16`` all as float16.
Refused before anything is written: a run-time part (online rotations, KV-cache or
LLM.int8() quantizers, OS+ shifts), another architecture, rope scaling, a tokenizer
llama.cpp would run differently. The file is
written under a temporary name beside ``out`` and renamed once complete.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..io_safety import atomic_file, check_file_out, write_error
from ..storage.form import LinearSpec
from .gguf_arch import Hparams, add_hparams, gguf_name, hparams, permute_rows, rope_permute, rope_unpermute, shifted
from .gguf_blocks import to_blocks
from .gguf_vocab import add_tokenizer, tokenizer_metadata
from .gguf_vocab import pre_tokenizer as _pre_tokenizer
from .packed_load import layers_tensors, open_checked
from .source import exportable_manifest

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "float16")
FLOAT_TYPES = ("F16", "F32")  # every other tensor type is a block type
__all__ = ["export_gguf", "summary", "tokenizer_metadata", "rope_permute", "rope_unpermute", "_pre_tokenizer"]


@dataclass(kw_only=True)
class _Tensor:
    name: str  # GGUF name
    data: np.ndarray  # uint8 blocks [out, bytes] for a block type, float otherwise
    qtype: str  # a block type (Q4_0, Q8_0, Q6_K, ...), F16 or F32


def _source_manifest(src: Path) -> dict:
    return exportable_manifest(src, "GGUF", "llama.cpp would run the model without them")


def _float_tensor(t: torch.Tensor, dtype: str) -> tuple[np.ndarray, str]:
    half = dtype == "float16" or (dtype == "auto" and t.dim() >= 2)
    a = t.detach().float().contiguous().numpy()
    return (a.astype(np.float16), "F16") if half else (a, "F32")


def convert(src: Path, meta: dict, hp: Hparams, dtype: str) -> list[_Tensor]:
    """Every tensor of the checkpoint as a GGUF tensor, checked; nothing is written."""
    tensors = open_checked(src, meta, verify=True)
    specs = {n: LinearSpec.from_dict(d, f"layers.{n}") for n, d in (meta.get("layers") or {}).items()}
    all_lt = layers_tensors(specs, tensors)
    tied_quant = meta.get("tied_quant_embeddings") or {}
    out: list[_Tensor] = []
    for name, spec in specs.items():
        hf = f"{name}.weight"
        lt = all_lt.get(name, {})
        qtype, blocks = to_blocks(name, spec, lt)  # a UserError unless exact
        for k in lt:
            tensors.pop(f"{name}.{k}", None)
        embs = [e for e, lin in tied_quant.items() if lin == name]
        if not (embs and hp.tied):  # a tied quantized head is the embedding table (llama.cpp reads it for both)
            out.append(_Tensor(name=gguf_name(hf, hp), data=permute_rows(hf, blocks, hp), qtype=qtype))
        out += [_Tensor(name=gguf_name(e, hp), data=blocks, qtype=qtype) for e in embs]
    tied = meta.get("tied") or {}
    for k, v in tensors.items():
        if k in tied or k.endswith("rotary_emb.inv_freq"):
            continue
        if not v.is_floating_point():
            raise UserError(f"{src}: tensor {k} ({v.dtype}) has no GGUF form in this export")
        data, qt = _float_tensor(shifted(k, v, hp), dtype)
        out.append(_Tensor(name=gguf_name(k, hp), data=permute_rows(k, data, hp), qtype=qt))
    for alias, target in tied.items():  # an untied-on-disk alias the model config does not tie (llama: lm_head)
        if not hp.tied and alias.endswith(".weight"):
            data, qt = _float_tensor(tensors[target], dtype)
            out.append(_Tensor(name=gguf_name(alias, hp), data=data, qtype=qt))
    return out


def _recorded_mix(meta: dict) -> str | None:
    """The llama.cpp file type a ``gguf_mix`` stage of the checkpoint's recipe chose (e.g.
    ``q3_k_m``), from the report kept in its manifest; None without one."""
    stages = (meta.get("report") or {}).get("stages") or {}
    return next((v.get("mix") for k, v in stages.items() if k.endswith(":gguf_mix") and isinstance(v, dict)), None)


def _file_type(tensors: list[_Tensor], mix: str | None = None):
    """The file's ``general.file_type``: the ``gguf_mix`` stage's type where the recipe had one
    (its name even where narrow rows fell back to other types, as llama-quantize writes it),
    else read from the tensors' types."""
    import gguf

    ft = gguf.LlamaFileType
    if mix is not None and hasattr(ft, f"MOSTLY_{mix.upper()}"):
        return getattr(ft, f"MOSTLY_{mix.upper()}")
    quant = Counter(t.qtype for t in tensors if t.qtype not in FLOAT_TYPES)
    blocks = {t.qtype for t in tensors if t.name.startswith("blk.")}  # the head and embedding are Q6_K in every K mixture
    if "Q2_K" in blocks:  # llama.cpp's names for its K mixtures: Q2_K holds Q3_K beside Q2_K
        return ft.MOSTLY_Q2_K if "Q3_K" in blocks else ft.MOSTLY_Q2_K_S
    if "Q3_K" in blocks:  # Q3_K_M holds Q4_K, Q3_K_L Q5_K, Q3_K_S neither
        return ft.MOSTLY_Q3_K_M if "Q4_K" in blocks else ft.MOSTLY_Q3_K_L if "Q5_K" in blocks else ft.MOSTLY_Q3_K_S
    for k in ("Q4_K", "Q5_K"):  # Q6_K in the blocks: _M (Q4_K_S holds some Q5_K)
        if k in blocks:
            return getattr(ft, f"MOSTLY_{k}_M" if "Q6_K" in blocks else f"MOSTLY_{k}_S")
    if quant:
        top = quant.most_common(1)[0][0]
        return getattr(ft, f"MOSTLY_{top}_S" if top in ("Q3_K", "Q4_K", "Q5_K") else f"MOSTLY_{top}")
    return ft.MOSTLY_F16 if any(t.qtype == "F16" for t in tensors) else ft.ALL_F32


def _write(path: Path, src: Path, hp: Hparams, tensors: list[_Tensor], tok: dict, mix: str | None = None) -> None:
    import gguf

    w = gguf.GGUFWriter(path, hp.arch)
    add_hparams(w, hp)
    w.add_file_type(_file_type(tensors, mix))
    add_tokenizer(w, src, tok, hp.vocab, add_bos=hp.arch == "gemma3")
    qt = gguf.GGMLQuantizationType
    for t in tensors:
        raw = getattr(qt, t.qtype) if t.qtype not in FLOAT_TYPES else None
        w.add_tensor(t.name, t.data, raw_dtype=raw)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()


def export_gguf(src: str | Path, out: str | Path, *, dtype: str = "auto", overwrite: bool = False) -> Path:
    """Write the packed checkpoint ``src`` as the GGUF file ``out``; returns ``out``.

    Everything is converted and checked in memory first (a refused layer writes nothing);
    the file is then written under a temporary name beside ``out`` and renamed.
    """
    src, out = Path(src), Path(out).expanduser()
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r}: the GGUF export takes {', '.join(DTYPES)}")
    if out.is_dir():
        raise UserError(f"output {str(out)!r} is a folder; the GGUF export writes one file, e.g. --out model.gguf")
    if out.exists() and not overwrite:
        raise UserError(f"output {str(out)!r} exists; pass --overwrite to replace it, or choose another --out")
    check_file_out(out, "--out")
    meta = _source_manifest(src)
    hp = hparams(src)
    tensors = convert(src, meta, hp, dtype)
    tok = tokenizer_metadata(src, hp.vocab)
    try:
        with atomic_file(out, suffix=".tmp") as tmp:
            _write(tmp, src, hp, tensors, tok, _recorded_mix(meta))
    except OSError as e:
        raise write_error(out, e) from None
    log.info("wrote %s: %s", out, dict(Counter(t.qtype for t in tensors)))
    return out


def summary(path: str | Path) -> dict[str, int]:
    """Tensors per GGUF type of a written file (for the CLI's line)."""
    import gguf

    return dict(Counter(t.tensor_type.name for t in gguf.GGUFReader(path).tensors))
