"""Structured surgery: remove whole decoder blocks, MLP intermediate channels and attention
heads so that the model's matrices (and its config) really get smaller.

Shared by the structured pruning methods (:mod:`llmpress.prune.drop_layers`,
:mod:`llmpress.prune.prune_width`); every function here changes the model in place and
keeps it a plain Hugging Face model of its own class, so ``save_pretrained`` writes a
config.json with the smaller sizes and ``AutoModelForCausalLM`` loads it back.

- :func:`drop_blocks`: the kept blocks are renumbered (``layer_idx`` of every submodule
  that has one, so the KV cache of ``generate()`` files each block under its new index),
  ``num_hidden_layers`` and the per-layer ``layer_types`` of the config (gemma3's
  sliding/full pattern) follow the kept blocks.
- :func:`keep_mlp_channels`: rows of gate/up and columns of down (``intermediate_size``).
- :func:`keep_heads`: query heads (rows of q, columns of o) and key/value heads (rows of
  k and v); the caller keeps the same number of query heads per kept kv head.
- :func:`refit_columns`: the least-squares update of the columns a linear keeps after some
  of its inputs are removed (the structured form of OBS: ``W_K + W_R G_RK G_KK^-1``).

Removal is uniform across blocks (every block keeps the same sizes): that is what one
config.json can describe. Sizes per block would need the packed format's own loader.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..arch import ArchSpec, get_module
from ..errors import UserError

__all__ = [
    "drop_blocks",
    "head_layout",
    "head_rows",
    "keep_heads",
    "keep_mlp_channels",
    "refit_columns",
    "set_sizes",
    "text_config",
]


def text_config(model: nn.Module):
    """The config that describes the decoder blocks (a multimodal model's ``text_config``)."""
    cfg = model.config
    return getattr(cfg, "text_config", None) or cfg


def head_layout(model: nn.Module) -> tuple[int, int, int]:
    """(head_dim, query heads, key/value heads) from the model's config."""
    cfg = text_config(model)
    n_h = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_h)
    hd = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_h)
    return hd, n_h, n_kv


def drop_blocks(model: nn.Module, spec: ArchSpec, drop: list[int]) -> list[int]:
    """Remove the decoder blocks ``drop`` (indices); returns the original indices kept.
    Renumbers ``layer_idx`` and updates ``num_hidden_layers`` / ``layer_types``."""
    layers: nn.ModuleList = get_module(model, spec.blocks)
    n = len(layers)
    bad = [i for i in drop if not 0 <= i < n]
    if bad:
        raise UserError(f"block indices {bad} out of range: the model has {n} decoder blocks")
    gone = set(drop)
    keep = [i for i in range(n) if i not in gone]
    if not keep:
        raise UserError(f"removing {len(gone)} of {n} decoder blocks leaves none")
    kept = [layers[i] for i in keep]
    for new, block in enumerate(kept):
        for mod in block.modules():
            if isinstance(getattr(mod, "layer_idx", None), int):
                mod.layer_idx = new
    layers_new = nn.ModuleList(kept)
    parent, _, name = spec.blocks.rpartition(".")
    setattr(get_module(model, parent) if parent else model, name, layers_new)
    cfg = text_config(model)
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) == n:
        cfg.layer_types = [types[i] for i in keep]
    cfg.num_hidden_layers = len(keep)
    return keep


def _slice_linear(lin: nn.Linear, *, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    """Keep ``rows`` (outputs) and/or ``cols`` (inputs) of a linear, in place."""
    w = lin.weight.data
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.data.index_select(0, rows.to(w.device)).clone(), requires_grad=lin.bias.requires_grad)
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    lin.weight = nn.Parameter(w.clone(), requires_grad=lin.weight.requires_grad)
    lin.out_features, lin.in_features = w.shape


def keep_mlp_channels(block: nn.Module, spec: ArchSpec, keep: torch.Tensor, down_weight: torch.Tensor | None = None) -> None:
    """Keep the intermediate channels ``keep`` (sorted indices) of one block's MLP.
    ``down_weight``: the kept columns of down_proj as refitted (:func:`refit_columns`)."""
    keep = keep.long()
    for path in (spec.gate, spec.up):
        if path:
            _slice_linear(get_module(block, path), rows=keep)
    down = get_module(block, spec.down)
    _slice_linear(down, cols=keep)
    if down_weight is not None:
        down.weight.data.copy_(down_weight.to(down.weight.dtype))
    mlp = get_module(block, spec.down.rpartition(".")[0])
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = int(keep.numel())


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The weight rows (or columns) of ``heads``: head h owns ``h*head_dim ... h*head_dim + head_dim - 1``."""
    return (heads.long().unsqueeze(1) * head_dim + torch.arange(head_dim)).flatten()


def keep_heads(
    block: nn.Module, spec: ArchSpec, *, head_dim: int, q_heads: torch.Tensor, kv_heads: torch.Tensor, o_weight: torch.Tensor | None = None
) -> None:
    """Keep query heads ``q_heads`` and key/value heads ``kv_heads`` (sorted indices) of one
    block. The caller keeps the grouping: the i-th kept kv head serves kept query heads
    ``i*g ... i*g + g - 1`` with ``g = len(q_heads) // len(kv_heads)``.
    ``o_weight``: the kept columns of o_proj as refitted (:func:`refit_columns`)."""
    if len(q_heads) % len(kv_heads):
        raise UserError(f"{len(q_heads)} query heads cannot share {len(kv_heads)} key/value heads evenly")
    q_rows = head_rows(q_heads, head_dim)
    kv_rows = head_rows(kv_heads, head_dim)
    _slice_linear(get_module(block, spec.q), rows=q_rows)
    _slice_linear(get_module(block, spec.k), rows=kv_rows)
    _slice_linear(get_module(block, spec.v), rows=kv_rows)
    o = get_module(block, spec.o)
    _slice_linear(o, cols=q_rows)
    if o_weight is not None:
        o.weight.data.copy_(o_weight.to(o.weight.dtype))
    attn = get_module(block, spec.q.rpartition(".")[0])
    if hasattr(attn, "num_key_value_groups"):
        attn.num_key_value_groups = len(q_heads) // len(kv_heads)
    for name in ("num_heads", "num_attention_heads"):
        if isinstance(getattr(attn, name, None), int):
            setattr(attn, name, len(q_heads))
    if isinstance(getattr(attn, "num_key_value_heads", None), int):
        attn.num_key_value_heads = len(kv_heads)


def set_sizes(model: nn.Module, *, intermediate: int | None = None, heads: int | None = None, kv_heads: int | None = None) -> None:
    """Write the new uniform sizes into the config (head_dim stays explicit)."""
    cfg = text_config(model)
    if intermediate is not None:
        cfg.intermediate_size = int(intermediate)
    if heads is not None:
        hd = head_layout(model)[0]
        cfg.head_dim = hd
        cfg.num_attention_heads = int(heads)
        cfg.num_key_value_heads = int(kv_heads)


def refit_columns(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The kept columns of ``weight`` [out, in] refitted so that ``W' X_K`` is the least-squares
    match of ``W X`` over the calibration inputs (``gram`` = X X^T [in, in]):
    ``W' = W G[:, K] (G[K, K] + damp * mean(diag G[K, K]) I)^-1``. With nothing removed it is W."""
    keep = keep.long()
    g = gram.double()
    g_kk = g[keep][:, keep]
    reg = damp * float(torch.diagonal(g_kk).mean()) if g_kk.numel() else 0.0
    g_kk = g_kk + reg * torch.eye(len(keep), dtype=g.dtype)
    rhs = weight.double() @ g[:, keep]  # [out, k]
    if reg:  # what the damping adds to G_KK, added to the right-hand side too: W' = W_K exactly when nothing is removed
        rhs = rhs + reg * weight.double()[:, keep]
    chol = torch.linalg.cholesky(g_kk)
    return torch.cholesky_solve(rhs.T, chol).T.to(weight.dtype)
