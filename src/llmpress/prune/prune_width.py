"""Width pruning: remove whole MLP intermediate channels or attention heads, the same number
in every decoder block (the config then describes the smaller sizes and the saved checkpoint
loads in plain transformers) or, with ``allocation: global``, per-block counts from one
ranking over all blocks.

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
``allocation: uniform`` (the default): the ``round(ratio * n)`` lowest-scored structures of
each block go (``multiple_of`` rounds the MLP channels kept, e.g. to a later quantizer's
group size), so the config describes the smaller model and the HF folder loads in plain
transformers. ``allocation: global``: the same total, ``round(ratio * n * blocks)``, chosen
by one ranking over all blocks of the scores normalized per block
(:mod:`llmpress.prune.allocation`: why the block mean), no block losing more than
``max_ratio`` (default 0.9) of its structures nor all; the blocks then differ in size,
which the packed checkpoint records and only it can hold (docs/structured.md).
With ``update`` the matrix that reads the removed structures (down_proj, o_proj) is
refitted, block by block, on its kept inputs by least squares over the calibration inputs (:func:`llmpress.prune.structure.refit_columns`, the
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
from .allocation import global_removals, unit_costs
from .distill import Recovery
from .importance import input_stats
from .structure import block_heads, head_layout, head_rows, keep_heads, keep_mlp_channels, refit_columns, sync_config

log = logging.getLogger(__name__)

STRUCTURES = ("mlp", "heads", "query_heads")
ALLOCATIONS = ("uniform", "global")
DEFAULT_MAX_RATIO = 0.9  # allocation: global, when max_ratio is not given


@dataclass(kw_only=True, frozen=True)
class PruneWidth(Recovery):
    """prune_width stage: remove ``ratio`` of each block's ``structure`` (mlp, heads = whole
    key/value groups, query_heads = query heads within each group), ``multiple_of``: MLP
    channels kept rounded to a multiple of it; ``update``: refit down_proj / o_proj (damping
    ``damp``); statistics from ``windows`` calibration windows in batches of ``batch_size``.
    ``allocation``: ``uniform`` (each block loses ``ratio``) or ``global`` (``ratio`` of all
    blocks' structures, ranked together; each block loses at most ``max_ratio``, default 0.9)."""

    structure: str = "mlp"
    ratio: float = 0.2
    allocation: str = "uniform"
    max_ratio: float | None = None  # allocation: global only (default DEFAULT_MAX_RATIO)
    multiple_of: int = 1
    update: bool = True
    damp: float = 0.01
    windows: int = 32
    batch_size: int = 4
    reshapes_model: ClassVar[bool] = True  # the stages after it are planned on the smaller model

    def __post_init__(self):
        if self.structure not in STRUCTURES:
            raise RecipeError(f"structure={self.structure!r}: expected one of {', '.join(STRUCTURES)}")
        if not 0.0 <= self.ratio < 1.0:
            raise RecipeError(f"ratio={self.ratio!r}: expected a value in [0, 1) (the share of each block's {self.structure} removed)")
        if self.multiple_of < 1:
            raise RecipeError(f"multiple_of={self.multiple_of!r}: expected a positive integer")
        if self.allocation not in ALLOCATIONS:
            raise RecipeError(f"allocation={self.allocation!r}: expected one of {', '.join(ALLOCATIONS)}")
        if self.max_ratio is not None and self.allocation != "global":
            raise RecipeError("max_ratio applies to allocation: global only (uniform removes ratio from every block)")
        if self.max_ratio is not None and not (isinstance(self.max_ratio, (int, float)) and 0.0 < self.max_ratio < 1.0):
            raise RecipeError(f"max_ratio={self.max_ratio!r}: expected a value in (0, 1) (the most of one block's {self.structure} removed)")
        if self.allocation == "global" and self.ratio > self.cap_ratio:
            raise RecipeError(f"ratio={self.ratio!r} above max_ratio={self.cap_ratio!r}: no allocation removes more than every block's cap")
        if self.damp < 0:
            raise RecipeError(f"damp={self.damp!r}: expected a value >= 0")
        if self.windows < 1 or self.batch_size < 1:
            raise RecipeError("windows and batch_size must be at least 1")
        self.check_recovery()

    @property
    def cap_ratio(self) -> float:
        """The most of one block's structures ``allocation: global`` removes."""
        return DEFAULT_MAX_RATIO if self.max_ratio is None else float(self.max_ratio)

    def check_model(self, model: nn.Module, spec: ArchSpec) -> None:
        """Refuse, when the recipe is planned, a structure the model lacks or a ratio that removes all of it."""
        check_width(model, spec, self)


WHAT = {"mlp": "MLP channels", "heads": "key/value groups (attention heads)", "query_heads": "query heads per key/value head"}


def _units(model: nn.Module, spec: ArchSpec, cfg: PruneWidth) -> list[int]:
    """Each block's count of what ``ratio`` applies to: MLP channels, kv groups, or query
    heads per group."""
    layers = get_module(model, spec.blocks)
    if cfg.structure == "mlp":
        return [get_module(b, spec.down).in_features for b in layers]
    hd = head_layout(model)[0]
    heads = [block_heads(b, spec, hd) for b in layers]
    return [n_kv if cfg.structure == "heads" else n_h // n_kv for n_h, n_kv in heads]


def check_width(model: nn.Module, spec: ArchSpec, cfg: PruneWidth) -> None:
    """The structure exists in every block and the ratio leaves some of it in each."""
    _check_structure(model, spec, cfg)
    units = _units(model, spec, cfg)
    if cfg.allocation == "uniform":
        for n in units:
            kept_count(n, cfg.ratio, cfg.multiple_of if cfg.structure == "mlp" else 1, WHAT[cfg.structure])
        return
    m = cfg.multiple_of if cfg.structure == "mlp" else 1
    odd = [i for i, n in enumerate(units) if n % m]
    if odd:
        raise UserError(
            f"prune_width: allocation global removes MLP channels {m} at a time (multiple_of); block {odd[0]} has {units[odd[0]]}, "
            f"not a multiple of {m}: use a multiple_of that divides it"
        )
    global_removals([torch.zeros(n // m) for n in units], cfg.ratio, cfg.cap_ratio, WHAT[cfg.structure])


def allocate(cfg: PruneWidth, scores: list[torch.Tensor]) -> list[int]:
    """Structures (query heads: per group) each block keeps, from its scores: [n] per block
    (MLP channels, kv groups) or [kv groups, per group] (query_heads)."""
    m = cfg.multiple_of if cfg.structure == "mlp" else 1
    sizes = [s.shape[-1] if s.dim() == 2 else len(s) for s in scores]
    if cfg.allocation == "uniform":
        return [kept_count(n, cfg.ratio, m, WHAT[cfg.structure]) for n in sizes]
    gone = global_removals([unit_costs(s, m) for s in scores], cfg.ratio, cfg.cap_ratio, WHAT[cfg.structure])
    return [n - k * m for n, k in zip(sizes, gone)]


def _one_or_all(xs: list):
    """A value every block shares, else the list of each block's."""
    return xs[0] if all(x == xs[0] for x in xs) else list(xs)


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
        hd = head_layout(model)[0]
        for n_h, n_kv in (block_heads(b, spec, hd) for b in get_module(model, spec.blocks)):
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
    check_width(model, spec, cfg)
    reader = spec.gate or spec.up
    x_names = [f"{prefix}.{i}.{reader}" for i in range(len(layers))]
    d_names = [f"{prefix}.{i}.{spec.down}" for i in range(len(layers))]
    stats = _stats(model, data, cfg, x_names, d_names)
    scores = []
    for i, block in enumerate(layers):
        gate = get_module(block, spec.gate).weight if spec.gate else None
        up, down = get_module(block, spec.up).weight, get_module(block, spec.down).weight
        scores.append(mlp_channel_scores(gate, up, down, _norms(stats[x_names[i]]), _norms(stats[d_names[i]])))
    kept = allocate(cfg, scores)
    removed = {}
    for i, block in enumerate(layers):
        down = get_module(block, spec.down).weight
        keep = top(scores[i], kept[i])
        new_down = refit_columns(down.data, stats[d_names[i]], keep, cfg.damp) if cfg.update else None
        keep_mlp_channels(block, spec, keep, down_weight=new_down)
        removed[i] = sorted(set(range(len(scores[i]))) - set(keep.tolist()))
    sync_config(model, spec)
    return {"before": _one_or_all([len(s) for s in scores]), "after": _one_or_all(kept), "removed": removed}


def _kept_heads(cfg: PruneWidth, q: torch.Tensor, kv: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(query heads, kv heads) one block keeps, from its head scores (the grouping preserved):
    ``keep`` kv groups (heads) or query heads per group (query_heads)."""
    n_kv, g = len(kv), len(q) // len(kv)
    if cfg.structure == "heads":
        kv_keep = top(_group_scores(q, kv), keep)
        return (kv_keep.unsqueeze(1) * g + torch.arange(g)).flatten(), kv_keep
    q_keep = torch.cat([j * g + top(q[j * g : (j + 1) * g], keep) for j in range(n_kv)])
    return q_keep, torch.arange(n_kv)


def _group_scores(q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """A key/value group's score: its kv head's plus its query heads'."""
    return kv + q.view(len(kv), -1).sum(1)


def _prune_heads(model: nn.Module, spec: ArchSpec, data, cfg: PruneWidth, prefix: str, layers) -> dict:
    check_width(model, spec, cfg)
    hd = head_layout(model)[0]
    x_names = [f"{prefix}.{i}.{spec.q}" for i in range(len(layers))]
    o_names = [f"{prefix}.{i}.{spec.o}" for i in range(len(layers))]
    stats = _stats(model, data, cfg, x_names, o_names)
    qkv = []
    for i, block in enumerate(layers):
        w = {p: get_module(block, p).weight for p in (spec.q, spec.k, spec.v, spec.o)}
        qkv.append(head_scores(w[spec.q], w[spec.k], w[spec.v], w[spec.o], _norms(stats[x_names[i]]), _norms(stats[o_names[i]]), hd))
    per_block = [_group_scores(q, kv) if cfg.structure == "heads" else q.view(len(kv), -1) for q, kv in qkv]
    kept = allocate(cfg, per_block)
    removed, before, after = {}, [], []
    for i, block in enumerate(layers):
        (q, kv), o = qkv[i], get_module(block, spec.o)
        q_keep, kv_keep = _kept_heads(cfg, q, kv, kept[i])
        new_o = refit_columns(o.weight.data, stats[o_names[i]], head_rows(q_keep, hd), cfg.damp) if cfg.update else None
        keep_heads(block, spec, head_dim=hd, q_heads=q_keep, kv_heads=kv_keep, o_weight=new_o)
        removed[i] = sorted(set(range(len(q))) - set(q_keep.tolist()))
        before.append({"heads": len(q), "kv_heads": len(kv)})
        after.append({"heads": len(q_keep), "kv_heads": len(kv_keep)})
    sync_config(model, spec, heads=True)
    return {"before": _one_or_all(before), "after": _one_or_all(after), "removed": removed}


@register("prune_width", PruneWidth, scope="model", summary="width pruning: MLP channels or attention heads by summed |W|*||x||")
def prune_width(model: nn.Module, spec, data, stage) -> ModelStageOutput:
    cfg: PruneWidth = stage.config
    if data is None:
        raise RecipeError("prune_width needs calibration data")
    layers = get_module(model, spec.blocks)
    run = _prune_mlp if cfg.structure == "mlp" else _prune_heads
    teacher = cfg.teacher(model)
    summary = run(model, spec, data, cfg, spec.blocks, layers)
    log.info("prune_width (%s): %s %s -> %s per block", cfg.allocation, cfg.structure, summary["before"], summary["after"])
    rec = cfg.recover(model, teacher, data, cfg.batch_size)
    if rec is not None:
        summary["recovery"] = rec
    return ModelStageOutput(summary={"structure": cfg.structure, "ratio": cfg.ratio, "allocation": cfg.allocation, "update": cfg.update, **summary})
