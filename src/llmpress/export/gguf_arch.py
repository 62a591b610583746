"""The architecture-specific part of the GGUF export: hyper-parameters from config.json,
their GGUF metadata keys, tensor names, and how a tensor's values change on the way.

Two architectures, each as llama.cpp's ``convert_hf_to_gguf.py`` writes it (its ``LlamaModel``
and ``Gemma3Model`` classes; keys and names from the gguf package's ``Keys`` and
``TensorNameMap``):

- ``llama`` (``model_type: llama``): q_proj / k_proj rows permuted into llama.cpp's rotary
  order (:func:`rope_permute`); norms as stored.
- ``gemma3`` (``model_type: gemma3_text``, e.g. gemma-3-270m): no permutation (llama.cpp's
  Gemma 3 uses the NEOX rotary layout, HF's own); every ``*norm.weight`` (the four norms of a
  block, q/k norms, the final norm) stored as ``w + 1``, the multiplier Gemma's RMSNorm
  applies (``x * (1 + w)``), as the converter does; key/value length = head_dim; the global
  rope base and the sliding layers' base (``rope.freq_base_swa``), the sliding window and
  which layers slide (``attention.sliding_window_pattern``, one bool per layer, from
  ``layer_types``); the final-logit softcap when set. Refused: rope scaling, attention-logit
  softcapping, an activation other than tanh-GELU, biases, bidirectional attention, and a
  ``query_pre_attn_scalar`` other than the one llama.cpp assumes (head_dim; hidden/heads for
  the 62-layer 27B).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError

ARCHS = {"llama": "llama", "gemma3_text": "gemma3"}  # config.json model_type -> GGUF architecture


@dataclass(kw_only=True)
class Hparams:
    """What the GGUF metadata needs from config.json."""

    arch: str  # GGUF architecture name: llama or gemma3
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
    rope_theta_swa: float | None = None  # gemma3: the sliding layers' rope base
    sliding_window: int | None = None
    swa_layers: list[bool] = field(default_factory=list)  # per layer: sliding?
    final_softcap: float | None = None

    @property
    def norm_shift(self) -> float:
        """What llama.cpp's file adds to every ``*norm.weight`` (Gemma: x * (1 + w))."""
        return 1.0 if self.arch == "gemma3" else 0.0


def _common(src: Path, cfg: dict, arch: str, rope_theta: float) -> dict:
    n_head = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    return dict(
        arch=arch,
        n_layers=int(cfg["num_hidden_layers"]),
        hidden=hidden,
        ffn=int(cfg["intermediate_size"]),
        n_head=n_head,
        n_head_kv=int(cfg.get("num_key_value_heads") or n_head),
        head_dim=int(cfg.get("head_dim") or hidden // n_head),
        context=int(cfg["max_position_embeddings"]),
        rms_eps=float(cfg["rms_norm_eps"]),
        rope_theta=float(rope_theta),
        vocab=int(cfg["vocab_size"]),
        tied=bool(cfg.get("tie_word_embeddings", False)),
        name=src.resolve().name,
    )


def _rope_theta(src: Path, rope: dict, default: float, what: str = "") -> float:
    """The base of one rope parameter set, refusing any scaling."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise UserError(f"{src}: rope scaling {kind!r}{what} is not supported by the GGUF export")
    return float(rope.get("rope_theta", default))


def _llama(src: Path, cfg: dict) -> Hparams:
    rope = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or ({} if rope.get("rope_type", "default") == "default" else rope)
    if scaling:
        raise UserError(f"{src}: rope scaling {scaling.get('rope_type', scaling.get('type'))!r} is not supported by the GGUF export")
    theta = cfg.get("rope_theta", rope.get("rope_theta"))
    return Hparams(**_common(src, cfg, "llama", 10000.0 if theta is None else theta))


def _gemma3_refusals(src: Path, cfg: dict) -> None:
    def no(what: str) -> UserError:
        return UserError(f"{src}: Gemma 3 with {what} has no llama.cpp form in the GGUF export")

    if cfg.get("rope_scaling"):
        raise no(f"rope scaling {json.dumps(cfg['rope_scaling'])[:80]}")
    if cfg.get("attn_logit_softcapping") is not None:
        raise no(f"attn_logit_softcapping {cfg['attn_logit_softcapping']} (llama.cpp's Gemma 3 applies none)")
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise no(f"activation {act!r} (llama.cpp's Gemma 3 uses tanh-GELU)")
    if cfg.get("attention_bias"):
        raise no("attention biases")
    if cfg.get("use_bidirectional_attention"):
        raise no("bidirectional attention")
    hidden, n_head, n_layers = int(cfg["hidden_size"]), int(cfg["num_attention_heads"]), int(cfg["num_hidden_layers"])
    head_dim = int(cfg.get("head_dim") or hidden // n_head)
    # llama.cpp scales queries by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 62-layer 27B
    expected = hidden // n_head if n_layers == 62 else head_dim
    scalar = cfg.get("query_pre_attn_scalar", expected)
    if float(scalar) != float(expected):
        raise no(f"query_pre_attn_scalar {scalar} (llama.cpp assumes {expected} for this shape)")


def _gemma3(src: Path, cfg: dict) -> Hparams:
    _gemma3_refusals(src, cfg)
    rope = cfg.get("rope_parameters") or {}
    if "full_attention" in rope or "sliding_attention" in rope:
        full = _rope_theta(src, rope.get("full_attention") or {}, 1_000_000.0, " (global layers)")
        local = _rope_theta(src, rope.get("sliding_attention") or {}, 10_000.0, " (sliding layers)")
    else:  # older configs: rope_theta and rope_local_base_freq
        full = _rope_theta(src, rope, float(cfg.get("rope_theta", 1_000_000.0)))
        local = float(cfg.get("rope_local_base_freq", 10_000.0))
    n_layers = int(cfg["num_hidden_layers"])
    types = cfg.get("layer_types")
    if types is None:  # transformers' default: every sliding_window_pattern-th layer is global
        pattern = int(cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern", 6)))
        types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers)]
    if len(types) != n_layers or set(types) - {"full_attention", "sliding_attention"}:
        raise UserError(f"{src}: config.json layer_types {types} do not give one known attention kind per layer")
    swa = [t == "sliding_attention" for t in types]
    window = cfg.get("sliding_window")
    if any(swa) and not window:
        raise UserError(f"{src}: config.json has sliding layers but no sliding_window")
    softcap = cfg.get("final_logit_softcapping")
    return Hparams(
        **_common(src, cfg, "gemma3", full),
        rope_theta_swa=local,
        sliding_window=int(window) if any(swa) else None,
        swa_layers=swa,
        final_softcap=float(softcap) if softcap else None,
    )


def hparams(src: Path) -> Hparams:
    """The hyper-parameters of a checkpoint's config.json, or a UserError."""
    cfg = json.loads((src / "config.json").read_text())
    kind = cfg.get("model_type")
    if kind not in ARCHS:
        raise UserError(
            f"{src}: GGUF export supports the Llama and Gemma 3 architectures (model_type {', '.join(ARCHS)}); this checkpoint is {kind!r}"
        )
    return _llama(src, cfg) if kind == "llama" else _gemma3(src, cfg)


def add_hparams(w, hp: Hparams) -> None:
    """The architecture's metadata keys on a ``GGUFWriter``."""
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
    if hp.arch == "llama":
        w.add_rope_dimension_count(hp.head_dim)
    if hp.arch == "gemma3" or hp.head_dim != hp.hidden // hp.n_head:
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)
    if hp.rope_theta_swa is not None:
        w.add_rope_freq_base_swa(hp.rope_theta_swa)
    if hp.sliding_window is not None:
        w.add_sliding_window(hp.sliding_window)
        w.add_sliding_window_pattern(hp.swa_layers)
    if hp.final_softcap is not None:
        w.add_final_logit_softcapping(hp.final_softcap)
    w.add_vocab_size(hp.vocab)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def gguf_name(hf: str, hp: Hparams) -> str:
    """The GGUF name of a Hugging Face tensor in the architecture, or a UserError."""
    import gguf

    arch = gguf.MODEL_ARCH.LLAMA if hp.arch == "llama" else gguf.MODEL_ARCH.GEMMA3
    name = gguf.get_tensor_name_map(arch, hp.n_layers).get_name(hf, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise UserError(f"tensor {hf} has no GGUF name in the {hp.arch} architecture")
    return name


def rope_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a q_proj / k_proj weight (or its blocks) in llama.cpp's rotary order: per head,
    the two halves interleaved (``convert_hf_to_gguf.py``'s ``LlamaModel.permute``)."""
    out = rows.shape[0]
    return rows.reshape(n_head, 2, out // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def rope_unpermute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of :func:`rope_permute`."""
    out = rows.shape[0]
    return rows.reshape(n_head, out // n_head // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def permute_rows(hf: str, rows: np.ndarray, hp: Hparams) -> np.ndarray:
    """Rows in the architecture's rotary order (Llama's q/k only; Gemma 3 keeps HF's)."""
    if hp.arch != "llama":
        return rows
    if hf.endswith(("q_proj.weight", "q_proj.bias")):
        return rope_permute(rows, hp.n_head)
    if hf.endswith(("k_proj.weight", "k_proj.bias")):
        return rope_permute(rows, hp.n_head_kv)
    return rows


def shifted(hf: str, t, hp: Hparams):
    """A float tensor as llama.cpp's file holds it: Gemma's norms as ``w + 1`` (in float32)."""
    if hp.norm_shift and hf.endswith("norm.weight"):
        return t.float() + hp.norm_shift
    return t
