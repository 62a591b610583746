"""Export a packed llmpress checkpoint as one GGUF file (llama.cpp, ollama).

``llmpress export --format gguf CHECKPOINT --out MODEL.gguf``. Scope: the Llama
architecture (``model_type: llama``, e.g. SmolLM2), with its tokenizer (byte-level BPE)
as GGUF metadata. Tensor names and metadata keys are the ones llama.cpp's
``convert_hf_to_gguf.py`` writes for Llama (the gguf package's ``TensorNameMap`` and
``Keys``), q_proj / k_proj rows permuted as that script does for llama.cpp's rotary
layout (:func:`rope_permute`).

Compressed linears become GGUF blocks only where the grids coincide exactly
(:mod:`llmpress.export.gguf_blocks`: ``Q4_0``, ``Q4_1``, ``Q5_0``, ``Q5_1``, ``Q8_0``,
``Q6_K``, each checked bit for bit against llmpress's dequantized weight); any layer
without an exact form refuses the
whole export, naming the layer, its grid and the nearest preset that exports. Unquantized
tensors are written as float: ``dtype="auto"`` gives 2-D weights (embeddings, a float
head) float16 and 1-D ones (norms, biases) float32, as llama.cpp's converter does;
``float32`` writes every float tensor as float32 (exact); ``float16`` all as float16.
Refused before anything is written: a run-time part (online rotations, KV-cache or
LLM.int8() quantizers, OS+ shifts), another architecture, rope scaling. The file is
written under a temporary name beside ``out`` and renamed once complete.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..io_safety import atomic_file, check_file_out, write_error
from ..storage.form import LinearSpec
from .gguf_blocks import to_blocks
from .packed import _open_checked, layers_tensors
from .source import exportable_manifest

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "float16")


@dataclass(kw_only=True)
class _Hparams:
    """What the Llama metadata needs from config.json."""

    n_layers: int
    hidden: int
    ffn: int
    n_head: int
    n_head_kv: int
    head_dim: int
    context: int
    rms_eps: float
    rope_theta: float
    vocab: int
    tied: bool
    name: str
    extra: dict = field(default_factory=dict)


def _hparams(src: Path) -> _Hparams:
    """The Llama hyper-parameters of a checkpoint's config.json, or a UserError."""
    cfg = json.loads((src / "config.json").read_text())
    if cfg.get("model_type") != "llama":
        raise UserError(f"{src}: GGUF export supports the Llama architecture (model_type llama); this checkpoint is {cfg.get('model_type')!r}")
    rope = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or ({} if rope.get("rope_type", "default") == "default" else rope)
    if scaling:
        raise UserError(f"{src}: rope scaling {scaling.get('rope_type', scaling.get('type'))!r} is not supported by the GGUF export")
    theta = cfg.get("rope_theta", rope.get("rope_theta"))
    n_head = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    return _Hparams(
        n_layers=int(cfg["num_hidden_layers"]),
        hidden=hidden,
        ffn=int(cfg["intermediate_size"]),
        n_head=n_head,
        n_head_kv=int(cfg.get("num_key_value_heads") or n_head),
        head_dim=int(cfg.get("head_dim") or hidden // n_head),
        context=int(cfg["max_position_embeddings"]),
        rms_eps=float(cfg["rms_norm_eps"]),
        rope_theta=float(theta if theta is not None else 10000.0),
        vocab=int(cfg["vocab_size"]),
        tied=bool(cfg.get("tie_word_embeddings", False)),
        name=src.resolve().name,
    )


def rope_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a q_proj / k_proj weight (or its blocks) in llama.cpp's rotary order: per head,
    the two halves interleaved (``convert_hf_to_gguf.py``'s ``LlamaModel.permute``)."""
    out = rows.shape[0]
    return rows.reshape(n_head, 2, out // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def rope_unpermute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of :func:`rope_permute`."""
    out = rows.shape[0]
    return rows.reshape(n_head, out // n_head // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


@dataclass(kw_only=True)
class _Tensor:
    name: str  # GGUF name
    data: np.ndarray  # uint8 blocks [out, bytes] for a block type, float otherwise
    qtype: str  # a block type (Q4_0, Q8_0, Q6_K, ...), F16 or F32


def _source_manifest(src: Path) -> dict:
    return exportable_manifest(src, "GGUF", "llama.cpp would run the model without them")


def _gguf_name(hf: str, n_layers: int) -> str:
    import gguf

    name = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers).get_name(hf, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise UserError(f"tensor {hf} has no GGUF name in the Llama architecture")
    return name


def _permute_rows(hf: str, rows: np.ndarray, hp: _Hparams) -> np.ndarray:
    if hf.endswith(("q_proj.weight", "q_proj.bias")):
        return rope_permute(rows, hp.n_head)
    if hf.endswith(("k_proj.weight", "k_proj.bias")):
        return rope_permute(rows, hp.n_head_kv)
    return rows


def _float_tensor(t: torch.Tensor, dtype: str) -> tuple[np.ndarray, str]:
    half = dtype == "float16" or (dtype == "auto" and t.dim() >= 2)
    a = t.detach().float().contiguous().numpy()
    return (a.astype(np.float16), "F16") if half else (a, "F32")


def convert(src: Path, meta: dict, hp: _Hparams, dtype: str) -> list[_Tensor]:
    """Every tensor of the checkpoint as a GGUF tensor, checked; nothing is written."""
    tensors = _open_checked(src, meta, verify=True)
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
            out.append(_Tensor(name=_gguf_name(hf, hp.n_layers), data=_permute_rows(hf, blocks, hp), qtype=qtype))
        out += [_Tensor(name=_gguf_name(e, hp.n_layers), data=blocks, qtype=qtype) for e in embs]
    tied = meta.get("tied") or {}
    for k, v in tensors.items():
        if k in tied or k.endswith("rotary_emb.inv_freq"):
            continue
        if not v.is_floating_point():
            raise UserError(f"{src}: tensor {k} ({v.dtype}) has no GGUF form in this export")
        data, qt = _float_tensor(v, dtype)
        out.append(_Tensor(name=_gguf_name(k, hp.n_layers), data=_permute_rows(k, data, hp), qtype=qt))
    for alias, target in tied.items():  # an untied-on-disk alias the model config does not tie (llama: lm_head)
        if not hp.tied and alias.endswith(".weight"):
            data, qt = _float_tensor(tensors[target], dtype)
            out.append(_Tensor(name=_gguf_name(alias, hp.n_layers), data=data, qtype=qt))
    return out


def _file_type(tensors: list[_Tensor]):
    import gguf

    ft = gguf.LlamaFileType
    quant = Counter(t.qtype for t in tensors if t.qtype.startswith("Q"))
    if quant:
        return getattr(ft, f"MOSTLY_{quant.most_common(1)[0][0]}")
    return ft.MOSTLY_F16 if any(t.qtype == "F16" for t in tensors) else ft.ALL_F32


def _add_hparams(w, hp: _Hparams) -> None:
    import gguf

    w.add_name(hp.name)
    w.add_block_count(hp.n_layers)
    w.add_context_length(hp.context)
    w.add_embedding_length(hp.hidden)
    w.add_feed_forward_length(hp.ffn)
    w.add_head_count(hp.n_head)
    w.add_head_count_kv(hp.n_head_kv)
    w.add_layer_norm_rms_eps(hp.rms_eps)
    w.add_rope_freq_base(hp.rope_theta)
    w.add_rope_dimension_count(hp.head_dim)
    if hp.head_dim != hp.hidden // hp.n_head:
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)
    w.add_vocab_size(hp.vocab)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _byte_level_gpt2(pre: dict) -> bool:
    return pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False)


def _pre_tokenizer(tj: dict) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json, or a UserError. Two exact matches:
    the GPT-2 byte-level split (``gpt-2``), and digits split one by one before it (``smollm``:
    llama.cpp's regex list for it is ``\\p{N}`` then the GPT-2 expression, what
    SmolLM's ``Sequence[Digits(individual_digits), ByteLevel]`` does)."""
    pre = tj.get("pre_tokenizer") or {}
    if _byte_level_gpt2(pre):
        return "gpt-2"
    parts = (pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else []
    if len(parts) == 2 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits") and _byte_level_gpt2(parts[1]):
        return "smollm"
    raise UserError(
        f"tokenizer pre-tokenizer {json.dumps(pre)[:120]} has no known llama.cpp name in this export "
        "(supported: byte-level BPE with the GPT-2 split, optionally after single-digit splitting)"
    )


def tokenizer_metadata(src: Path, n_vocab: int) -> dict:
    """tokens, token types, the pre-tokenizer name (merges and special ids: gguf's SpecialVocab)."""
    import gguf
    from transformers import AutoTokenizer

    tj_path = src / "tokenizer.json"
    if not tj_path.exists():
        raise UserError(f"{src}: no tokenizer.json; the GGUF export needs the model's (byte-level BPE) tokenizer")
    tj = json.loads(tj_path.read_text())
    if (tj.get("model") or {}).get("type") != "BPE":
        raise UserError(f"{src}: tokenizer model {(tj.get('model') or {}).get('type')!r}; the GGUF export supports byte-level BPE")
    pre = _pre_tokenizer(tj)
    tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    vocab = tok.get_vocab()
    if len(vocab) > n_vocab or max(vocab.values()) >= n_vocab:
        raise UserError(f"{src}: the tokenizer has {len(vocab)} tokens, more than the model's vocab_size {n_vocab}")
    by_id = {i: t for t, i in vocab.items()}
    added = getattr(tok, "added_tokens_decoder", {}) or {}
    T = gguf.TokenType
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(T.NORMAL if i not in added else (T.CONTROL if added[i].special else T.USER_DEFINED))
    return {"pre": pre, "tokens": tokens, "types": types}


def _write(path: Path, src: Path, hp: _Hparams, tensors: list[_Tensor], tok: dict) -> None:
    import gguf

    w = gguf.GGUFWriter(path, "llama")
    _add_hparams(w, hp)
    w.add_file_type(_file_type(tensors))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    special = gguf.SpecialVocab(src, load_merges=True, n_vocab=hp.vocab)
    if not special.merges:  # the gguf package cannot write an empty array
        log.warning("%s: the tokenizer has no BPE merges; the GGUF file holds none (llama.cpp refuses such a tokenizer)", src)
        special.load_merges = False
    special.add_to_gguf(w, quiet=True)
    qt = gguf.GGMLQuantizationType
    for t in tensors:
        raw = getattr(qt, t.qtype) if t.qtype.startswith("Q") else None
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
    hp = _hparams(src)
    tensors = convert(src, meta, hp, dtype)
    tok = tokenizer_metadata(src, hp.vocab)
    try:
        with atomic_file(out, suffix=".tmp") as tmp:
            _write(tmp, src, hp, tensors, tok)
    except OSError as e:
        raise write_error(out, e) from None
    log.info("wrote %s: %s", out, dict(Counter(t.qtype for t in tensors)))
    return out


def summary(path: str | Path) -> dict[str, int]:
    """Tensors per GGUF type of a written file (for the CLI's line)."""
    import gguf

    return dict(Counter(t.tensor_type.name for t in gguf.GGUFReader(path).tensors))
