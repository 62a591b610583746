"""Computational invariance and rotations, driven by the arch table: the machinery QuaRot,
DuQuant and SpinQuant share (a :class:`RotationPlan` applied by :func:`apply_plan`).

Why: W X = (W R^T)(R X) for an orthogonal R. Rotating the activations that feed a
linear, and its weight the opposite way, leaves the full-precision model unchanged but
spreads outlier channels over all channels, so 4-bit activations lose far less.

Row-vector convention throughout: activations x [..., d], a linear computes x W^T.

Offline pieces (exact in full precision):
- Norm fusion: an RMSNorm ``x/rms(x) * g`` (``g = w``, or ``1 + w`` for gemma) feeding
  linears W becomes a plain ``x/rms(x)`` and every such linear ``W diag(g)``; the final
  norm folds into the output head. RMS is rotation invariant, so afterwards
  ``norm(x R) = norm(x) R``.
- Residual rotation ``x -> x R`` (llama family): embeddings ``E R``; every linear that
  reads the residual (through a norm) ``W R``; every linear that writes it (o_proj,
  down_proj) ``R^T W`` (bias ``b R``); the output head ``W R``. A tied head is untied
  first (the head then carries ``diag(g_final) R``, the embeddings only ``R``): the
  checkpoint gains one vocab x hidden matrix.
- Per-head value rotation ``v -> v Q`` (head_dim Q): v_proj rows of each kv head
  ``Q^T W_v[h]``, o_proj columns of each query head ``W_o[:, h] Q``; valid under GQA
  because every head uses the same Q. Rotates the value cache.

Online pieces (:mod:`llmpress.runtime.online_hadamard`, :mod:`llmpress.runtime.kv_quant`),
with the matching inverse folded into the weight that reads the rotated tensor:
- down_proj input (after the elementwise product of the gated MLP);
- the attention output (o_proj input), all heads at once;
- q and k per head after RoPE (keys of the KV cache; nothing to fold, q.k is kept).

Gemma3 (``spec.post_norms``): each sub-layer's output passes through its own RMSNorm
(post_attention_layernorm / post_feedforward_layernorm) before the residual add. For a
rotated residual that norm would have to produce ``norm(y) diag(g) R`` from ``y R``, and
``R^T diag(g) R`` is not diagonal: ``norm(y R) diag(g) != norm(y) diag(g) R``. So the
residual stream of gemma3 is not rotated. What stays rotatable: (1) the outputs of
input_layernorm and pre_feedforward_layernorm, rotated online with their gains (a forward
hook on the norm; the reading q/k/v and gate/up weights take ``W M^T``; the gains are not
fused: gemma scales its massive channel down with a gain near 0, and a fused gain would let
that channel reach the rotation at full size) -- the same inputs
QuaRot rotates, for an O(d log d) Hadamard per token and norm; (2) values per head,
the attention output and the down_proj input, exactly as for llama; (3) q/k per head
after RoPE and QK-norm (the QK-norm acts before the online rotation, so it is untouched).
The post-norms themselves, the final norm and the (unquantized, tied) head stay as they are.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..arch import ArchSpec, get_module
from ..errors import UnsupportedArchitecture, UserError
from ..runtime.kv_quant import attention_runtime
from ..runtime.online_hadamard import OnlineRotation, attach_mlp_input, attach_output_rotation, fold_input_rotation
from .hadamard import has_hadamard, orthogonal_matrix

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- structure


def parent_path(path: str) -> str:
    return path.rsplit(".", 1)[0]


def leaf(path: str) -> str:
    return path.rsplit(".", 1)[1]


def attention_of(block: nn.Module, spec: ArchSpec) -> nn.Module:
    return get_module(block, parent_path(spec.q))


def mlp_of(block: nn.Module, spec: ArchSpec) -> nn.Module:
    return get_module(block, parent_path(spec.down))


def head_layout(attn: nn.Module) -> tuple[int, int, int]:
    """(head_dim, query heads, kv heads) of an attention module."""
    cfg = attn.config
    hd = getattr(attn, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    n_h = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_h
    return int(hd), int(n_h), int(n_kv)


def check_uniform_blocks(model: nn.Module, spec: ArchSpec, method: str) -> None:
    """Refuse a model whose decoder blocks differ in size (``prune_width allocation: global``):
    the rotation plans share one size per site across blocks."""
    shapes = {
        tuple(getattr(get_module(b, p), a, None) for p, a in ((spec.q, "out_features"), (spec.k, "out_features"), (spec.down, "in_features")))
        for b in get_module(model, spec.blocks)
    }
    if len(shapes) > 1:
        raise UserError(
            f"{method} needs decoder blocks of one size; these differ (prune_width allocation: global): "
            "put the rotation before the pruning stage or prune with allocation: uniform"
        )


def residual_rotatable(spec: ArchSpec) -> bool:
    """Whether the residual stream can be rotated offline (no norm on sub-layer outputs)."""
    return not spec.post_norms


def hidden_size(model: nn.Module, spec: ArchSpec) -> int:
    return get_module(model, spec.embed).weight.shape[1]


# ----------------------------------------------------------------------------- pure folds


def _cd(t: torch.Tensor) -> torch.dtype:
    """Compute dtype of a fold: float64 for float64 weights, else float32 (exact to ~1e-7)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def norm_gain(norm: nn.Module, kind: str) -> torch.Tensor:
    w = norm.weight.data.double()
    return 1.0 + w if kind == "rms_1p" else w


def reset_norm(norm: nn.Module, kind: str) -> None:
    norm.weight.data.fill_(0.0 if kind == "rms_1p" else 1.0)


def _set(p: torch.Tensor, v: torch.Tensor) -> None:
    p.data.copy_(v.to(p.dtype))


def fold_gain(linear: nn.Module, gain: torch.Tensor) -> None:
    """W diag(g): the linear now reads x/rms(x) instead of x/rms(x) * g."""
    w = linear.weight.data
    w.mul_(gain.to(device=w.device, dtype=w.dtype).unsqueeze(0))


def rotate_reader(linear: nn.Module, r: torch.Tensor) -> None:
    """Input x -> x R: W -> W R."""
    w = linear.weight.data
    cd = _cd(w)
    _set(linear.weight, w.to(cd) @ r.to(device=w.device, dtype=cd))


def rotate_writer(linear: nn.Module, r: torch.Tensor) -> None:
    """Output y -> y R: W -> R^T W, b -> b R."""
    w = linear.weight.data
    cd = _cd(w)
    r = r.to(device=w.device, dtype=cd)
    _set(linear.weight, r.T @ w.to(cd))
    if getattr(linear, "bias", None) is not None:
        _set(linear.bias, linear.bias.data.to(cd) @ r)


def rotate_value_heads(v_proj: nn.Module, o_proj: nn.Module, q: torch.Tensor, head_dim: int) -> None:
    """Per-head value rotation v -> v Q, folded into v_proj (rows) and o_proj (columns)."""
    cd = _cd(v_proj.weight)
    q = q.to(device=v_proj.weight.device, dtype=cd)
    wv = v_proj.weight.data.to(cd)
    n_kv = wv.shape[0] // head_dim
    _set(v_proj.weight, torch.einsum("ji,hjd->hid", q, wv.view(n_kv, head_dim, -1)).reshape(wv.shape))
    if getattr(v_proj, "bias", None) is not None:
        _set(v_proj.bias, (v_proj.bias.data.to(cd).view(n_kv, head_dim) @ q).reshape(-1))
    wo = o_proj.weight.data.to(cd)
    n_h = wo.shape[1] // head_dim
    _set(o_proj.weight, (wo.view(wo.shape[0], n_h, head_dim) @ q).reshape(wo.shape))


def untie_head(model: nn.Module, spec: ArchSpec) -> bool:
    """Give the output head its own weight when it shares the embeddings; True if it did."""
    emb = get_module(model, spec.embed)
    head = get_module(model, spec.lm_head)
    if head.weight is not emb.weight and head.weight.data_ptr() != emb.weight.data_ptr():
        return False
    head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys") and isinstance(model._tied_weights_keys, dict):
        model._tied_weights_keys = {}
    log.info("untied %s from %s for the residual rotation (+%d parameters)", spec.lm_head, spec.embed, head.weight.numel())
    return True


def fuse_norms(model: nn.Module, spec: ArchSpec, final: bool = True) -> None:
    """Fold every pre-linear norm gain into the linears it feeds (and the final norm into the head)."""
    for block in get_module(model, spec.blocks):
        for feed in spec.norm_feeds:
            norm = get_module(block, feed.norm)
            g = norm_gain(norm, spec.norm_kind)
            for lin in feed.linears:
                fold_gain(get_module(block, lin), g)
            reset_norm(norm, spec.norm_kind)
    if final:
        untie_head(model, spec)
        norm = get_module(model, spec.final_norm)
        fold_gain(get_module(model, spec.lm_head), norm_gain(norm, spec.norm_kind))
        reset_norm(norm, spec.norm_kind)


def rotate_residual(model: nn.Module, spec: ArchSpec, r: torch.Tensor) -> None:
    """x -> x R on the residual stream (norms must be fused first, see :func:`fuse_norms`)."""
    if not residual_rotatable(spec):
        raise UnsupportedArchitecture(
            f"{spec.family}: norms on sub-layer outputs ({', '.join(spec.post_norms)}) block a residual rotation; "
            "use online rotations of the norm outputs instead"
        )
    emb = get_module(model, spec.embed)
    rotate_reader(emb, r)  # rows of the embedding table are residual vectors
    for block in get_module(model, spec.blocks):
        for feed in spec.norm_feeds:
            for lin in feed.linears:
                rotate_reader(get_module(block, lin), r)
        rotate_writer(get_module(block, spec.o), r)
        rotate_writer(get_module(block, spec.down), r)
    rotate_reader(get_module(model, spec.lm_head), r)


# ----------------------------------------------------------------------------- plans


@dataclass(kw_only=True)
class RotationPlan:
    """Every rotation a method wants, applied in one place by :func:`apply_plan`.

    Per-block lists are indexed by block; ``None`` entries skip that block/site.
    Online rotations are modules ``x -> x @ M.T``; offline ones are matrices.
    """

    residual: torch.Tensor | None = None  # d x d, x -> x R (llama family)
    norm_in: list[tuple[OnlineRotation | None, OnlineRotation | None]] | None = None  # gemma3: (attn_in, mlp_in) online
    values: list[torch.Tensor | None] | None = None  # head_dim x head_dim, v -> v Q
    o_in: list[OnlineRotation | None] | None = None
    down_in: list[OnlineRotation | None] | None = None
    qk: list[OnlineRotation | None] | None = None
    notes: dict = field(default_factory=dict)


def apply_plan(model: nn.Module, spec: ArchSpec, plan: RotationPlan) -> dict:
    """Fuse norms and apply ``plan`` in place; returns (and records on the model) a summary."""
    layers = get_module(model, spec.blocks)
    _check_not_rotated(layers, spec, plan)
    residual = plan.residual is not None
    if residual:  # RMSNorm(x R) = RMSNorm(x) R only for a plain norm: fold the gains first
        fuse_norms(model, spec, final=True)
        rotate_residual(model, spec, plan.residual)
    # Online rotations of norm outputs (gemma3, DuQuant per block) rotate the output with
    # its gain and need no fusion. Fusing there would hurt: a channel that the norm scales
    # down (gemma's 1 + w near 0 on its massive channel) would reach the rotation at full
    # size and spread over every channel, exposing all weight errors to it.
    counts = {"values": 0, "o_in": 0, "down_in": 0, "qk": 0, "norm_in": 0}
    kinds: dict[str, set] = {k: set() for k in counts}
    for i, block in enumerate(layers):
        attn = attention_of(block, spec)
        hd, _, _ = head_layout(attn)
        if plan.values and plan.values[i] is not None:
            rotate_value_heads(get_module(block, spec.v), get_module(block, spec.o), plan.values[i].double(), hd)
            counts["values"] += 1
        if plan.o_in and plan.o_in[i] is not None:
            fold_input_rotation(get_module(block, spec.o), plan.o_in[i].matrix())
            attention_runtime(attn).o_rot = plan.o_in[i]
            counts["o_in"] += 1
            kinds["o_in"].add(plan.o_in[i].kind)
        if plan.qk and plan.qk[i] is not None:
            attention_runtime(attn).qk_rot = plan.qk[i]
            counts["qk"] += 1
            kinds["qk"].add(plan.qk[i].kind)
        if plan.down_in and plan.down_in[i] is not None:
            fold_input_rotation(get_module(block, spec.down), plan.down_in[i].matrix())
            mlp = mlp_of(block, spec)
            attach_mlp_input(mlp, leaf(spec.gate), leaf(spec.up), leaf(spec.down), plan.down_in[i])
            counts["down_in"] += 1
            kinds["down_in"].add(plan.down_in[i].kind)
        if plan.norm_in and plan.norm_in[i] is not None:
            for feed, rot in zip(spec.norm_feeds, plan.norm_in[i]):
                if rot is None:
                    continue
                m = rot.matrix()
                for lin in feed.linears:
                    fold_input_rotation(get_module(block, lin), m)
                attach_output_rotation(get_module(block, feed.norm), rot)
                counts["norm_in"] += 1
                kinds["norm_in"].add(rot.kind)
    summary = {
        "residual_rotation": bool(residual),
        "untied_head": residual,
        "online": {k: {"blocks": v, "kinds": sorted(kinds[k])} for k, v in counts.items() if v and k != "values"},
        "value_heads_rotated": counts["values"],
        **plan.notes,
    }
    if not residual and spec.post_norms:
        summary["residual_blocked_by"] = list(spec.post_norms)
    record_transform(model, summary)
    return summary


def _check_not_rotated(layers, spec: ArchSpec, plan: RotationPlan) -> None:
    """Online rotations cannot be stacked: a second one would replace the first at run time
    while both are folded into the weights."""
    for i, block in enumerate(layers):
        attn = attention_of(block, spec)
        rt = getattr(attn, "llmpress_attn", None)
        clash = (
            (plan.down_in and plan.down_in[i] is not None and hasattr(mlp_of(block, spec), "llmpress_down_in"))
            or (plan.o_in and plan.o_in[i] is not None and rt is not None and rt.o_rot is not None)
            or (plan.qk and plan.qk[i] is not None and rt is not None and rt.qk_rot is not None)
            or (plan.norm_in and plan.norm_in[i] is not None and any(hasattr(get_module(block, f.norm), "llmpress_out_rot") for f in spec.norm_feeds))
        )
        if clash:
            raise UserError(f"block {i} already carries online rotations: apply one rotation method (quarot, duquant or spinquant) per model")


def record_transform(model: nn.Module, summary: dict) -> None:
    """Keep what a model-scope transform did on the model (and its config, so it is saved)."""
    items = list(getattr(model, "llmpress_transforms", []))
    items.append(summary)
    model.llmpress_transforms = items  # type: ignore[attr-defined]
    try:
        model.config.llmpress_transforms = items
    except Exception:  # pragma: no cover - a config refusing attributes
        pass


def online(n: int, kind: str, seed: int, what: str) -> OnlineRotation:
    """An online rotation of size n: the fast Hadamard when one exists, else a dense orthogonal."""
    if kind == "hadamard" and has_hadamard(n):
        return OnlineRotation(n, "hadamard")
    m, built = orthogonal_matrix(n, "random" if kind != "hadamard" else "hadamard", seed, what)
    return OnlineRotation(n, "dense", matrix=m)


def standard_plan(model: nn.Module, spec: ArchSpec, cfg, residual: torch.Tensor | None, norm_kind: str, seed: int) -> RotationPlan:
    """Hadamard sites shared by QuaRot, DuQuant and SpinQuant (per-head, o_proj/down_proj inputs, q/k)."""
    layers = get_module(model, spec.blocks)
    n = len(layers)
    attn0 = attention_of(layers[0], spec)
    hd, n_h, _ = head_layout(attn0)
    plan = RotationPlan(residual=residual)
    notes = {}
    if getattr(cfg, "rotate_values", True):
        q, kind = orthogonal_matrix(hd, "hadamard", seed + 1, "head_dim")
        plan.values = [q] * n
        notes["values"] = kind
    if getattr(cfg, "online_o", True):
        plan.o_in = [online(hd * n_h, "hadamard", seed + 2, "attention output")] * n
    if getattr(cfg, "online_down", True):
        inter = get_module(layers[0], spec.down).in_features
        plan.down_in = [online(inter, "hadamard", seed + 3, "down_proj input")] * n
    if getattr(cfg, "rotate_qk", True):
        plan.qk = [online(hd, "hadamard", seed + 4, "q/k head")] * n
    if residual is None:  # gemma3, or residual: online -- rotate the norm outputs at run time
        d = hidden_size(model, spec)
        rot = online(d, norm_kind, seed, "norm output")  # the fast Hadamard (a Haar rotation for rotation: random)
        plan.norm_in = [(rot, rot)] * n
    plan.notes = {"orthogonal_kinds": notes}
    return plan
