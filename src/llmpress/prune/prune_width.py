"""Width pruning: remove whole MLP intermediate channels or attention heads, the same number
in every decoder block, so the model's config describes the smaller sizes and the saved
checkpoint loads in plain transformers.

Importance (Wanda-style, summed over the weights of one structure; the "Wanda-sp" of An et
al. 2024): with ||X_j|| the L2 norm of input feature j over the calibration tokens,
- MLP channel c: ``sum_j |W_gate[c, j]| ||x_j|| + sum_j |W_up[c, j]| ||x_j|| + ||h_c|| sum_i |W_down[i, c]|``
  (x: the MLP's input, h: the down_proj input);
- query head h: the same sum over its rows of q_proj and its columns of o_proj (o's input
  norms); key/value head g: over its rows of k_proj and v_proj;
- ``structure: heads`` removes whole key/value groups under grouped-query attention (a kv
  head and the query heads that read it; SmolLM2: 3 groups of 3 query heads), scored as the
  sum of the group's heads; ``query_heads`` removes the same number of query heads from
  every group and keeps every kv head.
The ``round(ratio * n)`` lowest-scored structures of each block go (``multiple_of`` rounds the
MLP channels kept, e.g. to a later quantizer's group size). With ``update`` the matrix that
reads the removed structures (down_proj, o_proj) is refitted on its kept inputs by least
squares over the calibration inputs (:func:`llmpress.prune.structure.refit_columns`, the
structured form of OBS); without it the result equals the original model with those
channels / heads zeroed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from ..arch import ArchSpec, get_module
from ..errors import RecipeError, UserError
from ..registry import ModelStageOutput, register
from .distill import Distill, recover, teacher_copy
from .importance import input_stats
from .structure import head_layout, head_rows, keep_heads, keep_mlp_channels, refit_columns, set_sizes

log = logging.getLogger(__name__)

STRUCTURES = ("mlp", "heads", "query_heads")


@dataclass(kw_only=True, frozen=True)
class PruneWidth:
    """prune_width stage: remove ``ratio`` of each block's ``structure`` (mlp, heads = whole
    key/value groups, query_heads = query heads within each group), ``multiple_of``: MLP
    channels kept rounded to a multiple of it; ``update``: refit down_proj / o_proj (damping
    ``damp``); statistics from ``windows`` calibration windows in batches of ``batch_size``."""

    structure: str = "mlp"
    ratio: float = 0.2
    multiple_of: int = 1
    update: bool = True
    damp: float = 0.01
    windows: int = 32
    batch_size: int = 4
    recover_steps: int = 0  # distillation steps towards the model as it was before this stage (0: none)
    recover_lr: float = 1e-4
    reshapes_model: ClassVar[bool] = True  # the stages after it are planned on the smaller model

    def __post_init__(self):
        if self.structure not in STRUCTURES:
            raise RecipeError(f"structure={self.structure!r}: expected one of {', '.join(STRUCTURES)}")
        if not 0.0 <= self.ratio < 1.0:
            raise RecipeError(f"ratio={self.ratio!r}: expected a value in [0, 1) (the share of each block's {self.structure} removed)")
        if self.multiple_of < 1:
            raise RecipeError(f"multiple_of={self.multiple_of!r}: expected a positive integer")
        if self.damp < 0:
            raise RecipeError(f"damp={self.damp!r}: expected a value >= 0")
        if self.windows < 1 or self.batch_size < 1:
            raise RecipeError("windows and batch_size must be at least 1")
        Distill(steps=self.recover_steps, lr=self.recover_lr)  # the recovery settings, checked now

    def check_model(self, model: nn.Module, spec: ArchSpec) -> None:
        """Refuse, when the recipe is planned, a structure the model lacks or a ratio that removes all of it."""
        check_width(model, spec, self)


def check_width(model: nn.Module, spec: ArchSpec, cfg: PruneWidth) -> tuple[int, int]:
    """The structure exists and the ratio leaves some of it: (kept per block, kept per group).
    For ``mlp`` the first is the channels kept; for heads (kv groups kept, query heads per group)."""
    _check_structure(model, spec, cfg)
    if cfg.structure == "mlp":
        inter = get_module(get_module(model, spec.blocks)[0], spec.down).in_features
        return kept_count(inter, cfg.ratio, cfg.multiple_of, "MLP channels"), 0
    _, n_h, n_kv = head_layout(model)
    g = n_h // n_kv
    if cfg.structure == "heads":
        return kept_count(n_kv, cfg.ratio, 1, "key/value groups (attention heads)"), g
    return n_kv, kept_count(g, cfg.ratio, 1, "query heads per key/value head")


def kept_count(total: int, ratio: float, multiple_of: int, what: str) -> int:
    """How many of ``total`` structures a block keeps: ``total - round(ratio * total)``, rounded
    to the nearest multiple of ``multiple_of``; refused when that is none."""
    keep = total - round(ratio * total)
    if multiple_of > 1:
        keep = min(total, int(round(keep / multiple_of)) * multiple_of)
    if keep <= 0:
        raise UserError(
            f"prune_width: removing {ratio:.0%} of {total} {what}{f' (kept count a multiple of {multiple_of})' if multiple_of > 1 else ''} "
            "removes every one of each block; remove fewer"
        )
    return keep


def top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, ascending (ties: the earlier index kept)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[:k]), dtype=torch.long)


def _wanda_rows(weight: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
    """sum_j |W_rj| ||x_j|| per row r."""
    return weight.detach().abs().float() @ l2.float().to(weight.device)


def mlp_channel_scores(gate: torch.Tensor | None, up: torch.Tensor, down: torch.Tensor, x_l2: torch.Tensor, h_l2: torch.Tensor) -> torch.Tensor:
    """Importance of each intermediate channel (see the module doc) [intermediate]."""
    s = _wanda_rows(up, x_l2) + down.detach().abs().float().sum(0) * h_l2.float().to(down.device)
    return s + _wanda_rows(gate, x_l2) if gate is not None else s


def head_scores(q, k, v, o, x_l2: torch.Tensor, a_l2: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per query head [n_h], per key/value head [n_kv]) importance (see the module doc)."""
    q_rows = _wanda_rows(q, x_l2).view(-1, head_dim).sum(1)
    o_cols = (o.detach().abs().float().sum(0) * a_l2.float().to(o.device)).view(-1, head_dim).sum(1)
    kv = (_wanda_rows(k, x_l2) + _wanda_rows(v, x_l2)).view(-1, head_dim).sum(1)
    return q_rows + o_cols, kv


def _check_structure(model: nn.Module, spec: ArchSpec, cfg: PruneWidth) -> None:
    """A clear error for a structure the model does not have in a removable form."""
    paths = (spec.up, spec.down) if cfg.structure == "mlp" else (spec.q, spec.k, spec.v, spec.o)
    for i, block in enumerate(get_module(model, spec.blocks)):
        for p in paths:
            try:
                mod = get_module(block, p)
            except (AttributeError, IndexError):
                mod = None
            if not isinstance(mod, nn.Linear):
                raise UserError(
                    f"prune_width: structure {cfg.structure!r} needs {p} as a plain linear in every block; block {i} of {type(model).__name__} has none"
                )
    if cfg.structure == "query_heads":
        _, n_h, n_kv = head_layout(model)
        if n_h == n_kv:
            raise UserError(
                f"prune_width: structure 'query_heads' needs several query heads per key/value head; this model has {n_h} of each: use 'heads'"
            )


def _stats(model: nn.Module, data, cfg: PruneWidth, inputs: list[str], readers: list[str]) -> dict[str, torch.Tensor]:
    """Input norms of ``inputs``; of ``readers`` too, or their Gram matrices when they are refitted."""
    if cfg.update:
        return input_stats(model, data, sumsq=inputs, gram=readers, windows=cfg.windows, batch_size=cfg.batch_size)
    return input_stats(model, data, sumsq=inputs + readers, windows=cfg.windows, batch_size=cfg.batch_size)


def _norms(stat: torch.Tensor) -> torch.Tensor:
    """||x_j|| from a sum of squares [in] or a Gram matrix [in, in]."""
    sq = torch.diagonal(stat) if stat.dim() == 2 else stat
    return sq.float().clamp_min(0).sqrt()


def _prune_mlp(model: nn.Module, spec: ArchSpec, data, cfg: PruneWidth, prefix: str, layers) -> dict:
    inter = get_module(layers[0], spec.down).in_features
    keep_n, _ = check_width(model, spec, cfg)
    reader = spec.gate or spec.up
    x_names = [f"{prefix}.{i}.{reader}" for i in range(len(layers))]
    d_names = [f"{prefix}.{i}.{spec.down}" for i in range(len(layers))]
    stats = _stats(model, data, cfg, x_names, d_names)
    removed = {}
    for i, block in enumerate(layers):
        gate = get_module(block, spec.gate).weight if spec.gate else None
        down = get_module(block, spec.down).weight
        scores = mlp_channel_scores(gate, get_module(block, spec.up).weight, down, _norms(stats[x_names[i]]), _norms(stats[d_names[i]]))
        keep = top(scores, keep_n)
        new_down = refit_columns(down.data, stats[d_names[i]], keep, cfg.damp) if cfg.update else None
        keep_mlp_channels(block, spec, keep, down_weight=new_down)
        removed[i] = sorted(set(range(inter)) - set(keep.tolist()))
    set_sizes(model, intermediate=keep_n)
    return {"before": inter, "after": keep_n, "removed": removed}


def _kept_heads(cfg: PruneWidth, q: torch.Tensor, kv: torch.Tensor, keep_kv: int, keep_per_group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(query heads, kv heads) one block keeps, from its head scores (the grouping preserved)."""
    n_kv, g = len(kv), len(q) // len(kv)
    if cfg.structure == "heads":
        kv_keep = top(kv + q.view(n_kv, g).sum(1), keep_kv)
        return (kv_keep.unsqueeze(1) * g + torch.arange(g)).flatten(), kv_keep
    q_keep = torch.cat([j * g + top(q[j * g : (j + 1) * g], keep_per_group) for j in range(n_kv)])
    return q_keep, torch.arange(n_kv)


def _prune_heads(model: nn.Module, spec: ArchSpec, data, cfg: PruneWidth, prefix: str, layers) -> dict:
    hd, n_h, n_kv = head_layout(model)
    keep_kv, keep_per_group = check_width(model, spec, cfg)
    x_names = [f"{prefix}.{i}.{spec.q}" for i in range(len(layers))]
    o_names = [f"{prefix}.{i}.{spec.o}" for i in range(len(layers))]
    stats = _stats(model, data, cfg, x_names, o_names)
    removed = {}
    for i, block in enumerate(layers):
        w = {p: get_module(block, p).weight for p in (spec.q, spec.k, spec.v, spec.o)}
        q, kv = head_scores(w[spec.q], w[spec.k], w[spec.v], w[spec.o], _norms(stats[x_names[i]]), _norms(stats[o_names[i]]), hd)
        q_keep, kv_keep = _kept_heads(cfg, q, kv, keep_kv, keep_per_group)
        new_o = refit_columns(w[spec.o].data, stats[o_names[i]], head_rows(q_keep, hd), cfg.damp) if cfg.update else None
        keep_heads(block, spec, head_dim=hd, q_heads=q_keep, kv_heads=kv_keep, o_weight=new_o)
        removed[i] = sorted(set(range(n_h)) - set(q_keep.tolist()))
    set_sizes(model, heads=keep_kv * keep_per_group, kv_heads=keep_kv)
    return {"before": {"heads": n_h, "kv_heads": n_kv}, "after": {"heads": keep_kv * keep_per_group, "kv_heads": keep_kv}, "removed": removed}


@register("prune_width", PruneWidth, scope="model", summary="width pruning: MLP channels or attention heads by summed |W|*||x||")
def prune_width(model: nn.Module, spec, data, stage) -> ModelStageOutput:
    cfg: PruneWidth = stage.config
    if data is None:
        raise RecipeError("prune_width needs calibration data")
    layers = get_module(model, spec.blocks)
    run = _prune_mlp if cfg.structure == "mlp" else _prune_heads
    teacher = teacher_copy(model, cfg.recover_steps)
    summary = run(model, spec, data, cfg, spec.blocks, layers)
    log.info("prune_width: %s %s -> %s per block", cfg.structure, summary["before"], summary["after"])
    rec = recover(model, teacher, data, steps=cfg.recover_steps, lr=cfg.recover_lr, batch_size=cfg.batch_size)
    if rec is not None:
        summary["recovery"] = rec
    return ModelStageOutput(summary={"structure": cfg.structure, "ratio": cfg.ratio, "update": cfg.update, **summary})
