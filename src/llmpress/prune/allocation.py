"""How many structures each decoder block loses: the same share everywhere (``uniform``) or
one ranking across all blocks (``global``).

``global`` works in *units*: the smallest removal that keeps a block well formed (an MLP
channel, or ``multiple_of`` channels; a key/value group; one query head from every group).
Each block's structure scores are first divided by the block's mean score, then its units
are costed in ascending order (a unit's cost: the sum of the normalized scores it removes,
so a block's costs never decrease), and the ``round(ratio * total units)`` cheapest units
over all blocks go, each block losing at most ``floor(max_ratio * its units)`` and never all.

Why the mean: raw Wanda-style scores ``|W| ||x||`` carry each block's scale (the residual
stream's norm grows with depth, and the weights' magnitudes differ per block), so one raw
ranking would strip the blocks of small scale regardless of what their structures do.
Dividing by the block's mean removes exactly that scale (scaling every weight of a block by
a constant leaves the allocation as it was; tested) and keeps the block's *shape*: a block
whose importance sits in a few structures has many far below its mean and loses more than a
block whose structures matter alike. A rank-based normalization would give every block the
same distribution, so the global ranking would fall back to an (arbitrarily tie-broken)
uniform allocation.
"""

from __future__ import annotations

import math

import torch

from ..errors import UserError

__all__ = ["global_removals", "normalized", "unit_costs"]


def normalized(scores: torch.Tensor) -> torch.Tensor:
    """A block's scores divided by their mean (all zero: left at zero, removed first)."""
    s = scores.detach().double()
    mean = float(s.mean()) if s.numel() else 0.0
    return s / mean if mean > 0 else torch.zeros_like(s)


def unit_costs(scores: torch.Tensor, unit: int = 1) -> torch.Tensor:
    """Costs of removing a block's structures ``unit`` at a time, lowest first: the sums of
    consecutive ``unit``-sized runs of its ascending normalized ``scores`` (length a
    multiple of ``unit``). ``scores`` [groups, per group]: unit r removes the r-th lowest
    of every group (query heads within key/value groups), costing their sum."""
    s = normalized(scores)
    if s.dim() == 2:
        return s.sort(dim=1).values.sum(0)
    return s.sort().values.view(-1, unit).sum(1)


def cap(units: int, max_ratio: float) -> int:
    """The most units a block of ``units`` may lose: ``floor(max_ratio * units)``, never all."""
    return max(0, min(units - 1, math.floor(max_ratio * units + 1e-9)))


def global_removals(costs: list[torch.Tensor], ratio: float, max_ratio: float, what: str) -> list[int]:
    """Units each block loses (see the module doc): the ``round(ratio * sum of units)``
    cheapest over all blocks, at most :func:`cap` per block; ties go to the earlier block.
    Refused when the caps leave too few units to remove."""
    total = sum(len(c) for c in costs)
    budget = round(ratio * total)
    caps = [cap(len(c), max_ratio) for c in costs]
    if budget > sum(caps):
        raise UserError(
            f"prune_width: removing {ratio:.0%} of {total} {what} over {len(costs)} blocks needs {budget}, but with at most "
            f"{max_ratio:.0%} of each block (and never all of one) only {sum(caps)} can go; lower ratio or raise max_ratio"
        )
    cand = [(float(c[j]), i, j) for i, c in enumerate(costs) for j in range(caps[i])]
    cand.sort()
    out = [0] * len(costs)
    for _, i, _ in cand[:budget]:
        out[i] += 1
    return out
