"""SliceGPT (Ashkboos et al., 2024) with one rotation of the whole residual stream: rotate the
stream onto its principal components on the calibration windows, then slice off the
directions of least variance from every matrix that reads or writes it. The hidden size of
the config shrinks, and the model stays a plain transformers model.

With the norm gains fused into the linears they feed (:func:`llmpress.transform.rotation.fuse_norms`,
the final norm's into an untied head), an RMSNorm commutes with an orthogonal Q:
``norm(x Q) = norm(x) Q``. Q holds the eigenvectors of ``sum_t u_t u_t^T`` (descending
eigenvalues), ``u_t = x_t / ||x_t||`` for every residual vector entering a norm (each block's
two norms and the final one, so a token with a massive activation counts once, as the norm
sees it). Keeping its first d' columns Q_s [d, d']:

- the embeddings ``E Q_s``; every reader (q/k/v, gate/up, the head) ``W Q_s``; every writer
  (o_proj, down_proj) ``Q_s^T W`` (bias ``b Q_s``);
- each norm keeps a constant gain ``sqrt(d / d')`` and its epsilon times ``d / d'``: it
  averages over d' channels now, and ``||x Q_s|| ~ ||x||`` when the sliced directions carry
  little of the stream (equal when they carry none).

With nothing sliced the model is the original one rotated (equal up to rounding). The paper
uses a different Q per block and adds a d' x d' matrix on every residual connection; one Q
needs no new module (but slices less well). Not for gemma3: its post-norms block a residual
rotation (docs/rotations.md). A tied head is untied (the checkpoint gains vocab x d'
parameters).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from ..arch import ArchSpec, get_module
from ..errors import RecipeError, UnsupportedArchitecture
from ..prune.distill import Recovery
from ..registry import ModelStageOutput, register
from .rotation import fuse_norms, hidden_size, residual_rotatable

log = logging.getLogger(__name__)


@dataclass(kw_only=True, frozen=True)
class SliceGPT(Recovery):
    """slicegpt stage: slice ``fraction`` of the hidden size (kept size rounded to a multiple
    of ``multiple_of`` and of the attention head count: transformers refuses a config whose
    hidden size is not one), PCA from ``windows`` calibration windows in batches of ``batch_size``;
    ``recover_*``: distillation towards the unsliced model afterwards (:class:`~llmpress.prune.distill.Recovery`)."""

    fraction: float = 0.25
    multiple_of: int = 1
    windows: int = 32
    batch_size: int = 4
    reshapes_model: ClassVar[bool] = True

    def __post_init__(self):
        if not 0.0 <= self.fraction < 1.0:
            raise RecipeError(f"fraction={self.fraction!r}: expected a value in [0, 1) (the share of the hidden size sliced)")
        if self.multiple_of < 1 or self.windows < 1 or self.batch_size < 1:
            raise RecipeError("multiple_of, windows and batch_size must be at least 1")
        self.check_recovery()

    def check_model(self, model: nn.Module, spec: ArchSpec) -> None:
        """Refuse, when the recipe is planned, gemma3 (post-norms) or a fraction that keeps nothing."""
        if not residual_rotatable(spec):
            raise UnsupportedArchitecture(
                f"slicegpt: {spec.family} applies norms to sub-layer outputs ({', '.join(spec.post_norms)}), which block a residual rotation"
            )
        self.kept(hidden_size(model, spec), heads(model))

    def kept(self, d: int, n_heads: int = 1) -> int:
        """The hidden size left of ``d``: the nearest multiple of lcm(multiple_of, n_heads)."""
        step = math.lcm(self.multiple_of, n_heads)
        keep = min(d, int(round((d - round(self.fraction * d)) / step)) * step)
        why = (
            f"in steps of {step} (multiple_of {self.multiple_of}, {n_heads} attention heads: the saved config needs a hidden size divisible by both)"
        )
        if keep <= 0:
            raise RecipeError(f"slicegpt: fraction {self.fraction} keeps none of {d} hidden channels {why}")
        if keep == d and self.fraction > 0:
            raise RecipeError(
                f"slicegpt: fraction {self.fraction} slices nothing of {d} hidden channels {why}; lower multiple_of or raise the fraction"
            )
        return keep


def heads(model: nn.Module) -> int:
    """The attention head count of the model's config (1 when it has none)."""
    return int(getattr(model.config, "num_attention_heads", None) or 1)


@torch.no_grad()
def residual_pca(model: nn.Module, spec: ArchSpec, data: torch.Tensor, *, windows: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues descending [d], eigenvectors as columns [d, d]) of sum_t u_t u_t^T over the
    normalized residual vectors entering every norm."""
    norms = [get_module(b, f.norm) for b in get_module(model, spec.blocks) for f in spec.norm_feeds]
    norms.append(get_module(model, spec.final_norm))
    d = hidden_size(model, spec)
    acc = torch.zeros(d, d, dtype=torch.float64)

    def hook(_mod, args):
        x = args[0].detach().reshape(-1, d).double()
        u = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        acc.add_((u.T @ u).cpu())

    handles = [n.register_forward_pre_hook(hook) for n in norms]
    dev = next(model.parameters()).device
    n = min(windows, data.shape[0])
    try:
        for i in range(0, n, batch_size):
            model(input_ids=data[i : min(i + batch_size, n)].to(dev), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    vals, vecs = torch.linalg.eigh(acc)
    return vals.flip(0), vecs.flip(1)


def _new_weight(mod: nn.Module, w: torch.Tensor, name: str = "weight") -> None:
    old = getattr(mod, name)
    setattr(mod, name, nn.Parameter(w.to(old.dtype).contiguous(), requires_grad=old.requires_grad))


def _read(lin: nn.Linear, q: torch.Tensor) -> None:
    """Input x -> x Q_s: W -> W Q_s."""
    _new_weight(lin, lin.weight.data.double() @ q.to(lin.weight.device))
    lin.in_features = q.shape[1]


def _write(lin: nn.Linear, q: torch.Tensor) -> None:
    """Output y -> y Q_s: W -> Q_s^T W, b -> b Q_s."""
    q = q.to(lin.weight.device)
    _new_weight(lin, q.T @ lin.weight.data.double())
    if lin.bias is not None:
        _new_weight(lin, lin.bias.data.double() @ q, "bias")
    lin.out_features = q.shape[1]


def _set_norm(norm: nn.Module, size: int, ratio: float, kind: str) -> None:
    """Gain sqrt(ratio) and epsilon times ratio (ratio = d / d'): ``x_s / sqrt(mean(x_s^2) + eps)``
    over d' channels then equals ``x / sqrt(mean(x^2) + eps)`` over d for a stream without the sliced part."""
    gain = math.sqrt(ratio)
    _new_weight(norm, torch.full((size,), gain - 1.0 if kind == "rms_1p" else gain, dtype=torch.float64))
    for name in ("variance_epsilon", "eps"):
        if isinstance(getattr(norm, name, None), float):
            setattr(norm, name, getattr(norm, name) * ratio)


def slice_residual(model: nn.Module, spec: ArchSpec, q: torch.Tensor) -> None:
    """Rotate by and slice to ``q`` [d, d'] (norms fused first); the config's hidden size follows."""
    d, d_new = q.shape
    q = q.double()
    emb = get_module(model, spec.embed)
    _new_weight(emb, emb.weight.data.double() @ q.to(emb.weight.device))
    emb.embedding_dim = d_new
    ratio = d / d_new
    for block in get_module(model, spec.blocks):
        for feed in spec.norm_feeds:
            _set_norm(get_module(block, feed.norm), d_new, ratio, spec.norm_kind)
            for lin in feed.linears:
                _read(get_module(block, lin), q)
        _write(get_module(block, spec.o), q)
        _write(get_module(block, spec.down), q)
        if isinstance(getattr(block, "hidden_size", None), int):
            block.hidden_size = d_new
    _set_norm(get_module(model, spec.final_norm), d_new, ratio, spec.norm_kind)
    _read(get_module(model, spec.lm_head), q)
    cfg = getattr(model.config, "text_config", None) or model.config
    cfg.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    cfg.hidden_size = d_new
    if isinstance(getattr(cfg, "rms_norm_eps", None), float):
        cfg.rms_norm_eps *= ratio


@register("slicegpt", SliceGPT, scope="model", summary="SliceGPT: rotate the residual stream onto its PCA basis and slice the hidden size")
def slicegpt(model: nn.Module, spec: ArchSpec, data, stage) -> ModelStageOutput:
    cfg: SliceGPT = stage.config
    cfg.check_model(model, spec)
    if data is None:
        raise RecipeError("slicegpt needs calibration data")
    d = hidden_size(model, spec)
    keep = cfg.kept(d, heads(model))
    vals, vecs = residual_pca(model, spec, data, windows=cfg.windows, batch_size=cfg.batch_size)
    teacher = cfg.teacher(model)
    fuse_norms(model, spec, final=True)
    slice_residual(model, spec, vecs[:, :keep])
    kept_share = float(vals[:keep].sum() / vals.sum())
    log.info("slicegpt: hidden size %d -> %d (%.4f of the normalized residual variance kept)", d, keep, kept_share)
    summary = {"hidden_before": d, "hidden_after": keep, "variance_kept": kept_share}
    if (rec := cfg.recover(model, teacher, data, cfg.batch_size)) is not None:
        summary["recovery"] = rec
    return ModelStageOutput(summary=summary)
