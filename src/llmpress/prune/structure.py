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

Sizes may differ per block (``prune_width allocation: global``): one config.json cannot
describe that, so the config holds the largest block's sizes (:func:`sync_config`), the
packed checkpoint records each block's (:func:`block_sizes`) and its loader cuts a fresh
model of the config down to them (:func:`resize_blocks`) before the weights go in.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..arch import ArchSpec, get_module
from ..errors import UserError

__all__ = [
    "block_heads",
    "block_sizes",
    "drop_blocks",
    "head_layout",
    "head_rows",
    "keep_heads",
    "keep_mlp_channels",
    "refit_columns",
    "resize_blocks",
    "set_sizes",
    "sync_config",
    "text_config",
]

SIZE_KEYS = ("intermediate_size", "num_attention_heads", "num_key_value_heads")


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


def block_heads(block: nn.Module, spec: ArchSpec, head_dim: int) -> tuple[int, int]:
    """(query heads, key/value heads) of one block, from its q_proj and k_proj rows."""
    return get_module(block, spec.q).out_features // head_dim, get_module(block, spec.k).out_features // head_dim


def _sizes_of(block: nn.Module, spec: ArchSpec, head_dim: int) -> dict[str, int | None]:
    """One block's sizes (None where a module has no plain shape, e.g. a low-rank factor pair)."""
    from ..runtime.act_quant import plain

    def dim(path: str, attr: str, per: int = 1) -> int | None:
        try:
            n = getattr(plain(get_module(block, path)), attr, None)
        except (AttributeError, IndexError):
            return None
        return n // per if isinstance(n, int) else None

    return {
        "intermediate_size": dim(spec.down, "in_features"),
        "num_attention_heads": dim(spec.q, "out_features", head_dim),
        "num_key_value_heads": dim(spec.k, "out_features", head_dim),
    }


def block_sizes(model: nn.Module, spec: ArchSpec) -> list[dict[str, int]] | None:
    """Each decoder block's ``intermediate_size`` / ``num_attention_heads`` /
    ``num_key_value_heads`` when some block differs from the config; None when the config
    describes every block (what a plain Hugging Face model of it holds)."""
    cfg = text_config(model)
    hd, n_h, n_kv = head_layout(model)
    want = {"intermediate_size": getattr(cfg, "intermediate_size", None), "num_attention_heads": n_h, "num_key_value_heads": n_kv}
    out = []
    for block in get_module(model, spec.blocks):
        got = _sizes_of(block, spec, hd)
        out.append({k: got[k] if got[k] is not None else want[k] for k in SIZE_KEYS})
    return out if any(b[k] != want[k] for b in out for k in SIZE_KEYS) else None


def sync_config(model: nn.Module, spec: ArchSpec, *, heads: bool = False) -> None:
    """The config's sizes from the blocks: the largest block's (every block's when uniform);
    ``heads``: the head counts too (head_dim written explicitly)."""
    sizes = block_sizes(model, spec)
    if sizes is None:
        return
    big = {k: max(b[k] for b in sizes) for k in SIZE_KEYS}
    if heads:
        set_sizes(model, intermediate=big["intermediate_size"], heads=big["num_attention_heads"], kv_heads=big["num_key_value_heads"])
    else:
        set_sizes(model, intermediate=big["intermediate_size"])


def resize_blocks(model: nn.Module, spec: ArchSpec, sizes: list[dict], what: str = "model") -> None:
    """Cut a fresh model of the (largest-block) config down to each block's ``sizes`` (its
    first channels / heads kept: the loaded tensors replace them), before its weights load."""
    layers = get_module(model, spec.blocks)
    if not isinstance(sizes, list) or len(sizes) != len(layers):
        raise UserError(f"{what}: block sizes for {len(sizes) if isinstance(sizes, list) else '?'} blocks, the config has {len(layers)}")
    hd = head_layout(model)[0]
    for i, (block, want) in enumerate(zip(layers, sizes)):
        try:
            inter, n_h, n_kv = (int(want[k]) for k in SIZE_KEYS)
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{what}: block {i} sizes {want!r} malformed (expected {', '.join(SIZE_KEYS)})") from None
        have = _sizes_of(block, spec, hd)
        if inter > have["intermediate_size"] or n_h > have["num_attention_heads"] or n_kv > have["num_key_value_heads"]:
            raise UserError(f"{what}: block {i} sizes {want} exceed the config's {have}")
        if inter != have["intermediate_size"]:
            keep_mlp_channels(block, spec, torch.arange(inter))
        if (n_h, n_kv) != (have["num_attention_heads"], have["num_key_value_heads"]):
            if n_kv < 1 or n_h % n_kv:
                raise UserError(f"{what}: block {i} has {n_h} query heads on {n_kv} key/value heads")
            keep_heads(block, spec, head_dim=hd, q_heads=torch.arange(n_h), kv_heads=torch.arange(n_kv))
