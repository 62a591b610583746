"""Mixed precision: one quantization setting per linear under an average bits-per-weight
budget, minimizing the summed layer error (the pure maths; ``llmpress plan-bits`` measures
the errors on calibration text and writes the recipe, :mod:`llmpress.bitplan`).

Cost of linear i at setting k: ``c_ik = tr(dW H dW^T)``, dW the error of quantizing W_i at
setting k (nearest rounding or GPTQ), H = 2/n X^T X its calibration Hessian: the layer's
output error, summed over layers as the sensitivity-weighted objectives of HAWQ / EXL2 do
(each layer's error counted where it arises, not propagated).

Size of linear i at setting k: ``b_ik`` bits, the integer bits plus a 16-bit scale (and a
zero point) per group, exactly as eval/size.py counts a quantized linear
(:func:`llmpress.quant.core.bits_per_weight` times the weights).

The allocation is a multiple-choice knapsack: minimize sum_i c_{i,k_i} subject to
sum_i b_{i,k_i} <= budget * sum_i n_i. Dynamic programming over the budget in units of
u = gcd of all b_ik is exact; when that grid has more than ``max_steps`` points the unit is
coarsened and every size rounded *up* to it, so the answer still never exceeds the budget
(it may then miss the optimum by at most one coarse unit per linear of slack; ``exact``
says which case it was).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import torch

from ..errors import UserError
from .args import QuantArgs
from .core import bits_per_weight

_CANDIDATE = re.compile(r"w([0-9]+)(?:g([0-9]+))?")


def parse_candidate(text: str, base: QuantArgs) -> QuantArgs:
    """``w4g64`` -> ``base`` with 4 bits in groups of 64; ``w8`` -> 8 bits per channel.
    Every other field (symmetric, observer, full_range, ...) stays the base's."""
    m = _CANDIDATE.fullmatch(text.strip().lower())
    if not m:
        raise UserError(f"candidate {text!r}: expected wBITS or wBITSgGROUP, e.g. w4g64 or w8")
    bits = int(m.group(1))
    if base.kind != "int":
        raise UserError(f"candidate {text!r}: mixed precision needs an integer grid, the base stage has kind {base.kind!r}")
    if not 2 <= bits <= 8:
        raise UserError(f"candidate {text!r}: integer grids have 2 to 8 bits")
    if m.group(2) is None:
        return replace(base, bits=bits, granularity="channel", group_size=None)
    group = int(m.group(2))
    if group < 1:
        raise UserError(f"candidate {text!r}: the group size must be positive")
    return replace(base, bits=bits, granularity="group", group_size=group)


def parse_candidates(text: str | list[str], base: QuantArgs) -> dict[str, QuantArgs]:
    """label -> QuantArgs for a comma-separated list (labels as written, lower case)."""
    items = [t.strip().lower() for t in (text.split(",") if isinstance(text, str) else text)]
    items = [t for t in items if t]
    if not items:
        raise UserError("candidates: the list is empty; give settings such as w2g64,w3g64,w4g64")
    if len(set(items)) != len(items):
        raise UserError(f"candidates: {', '.join(items)} names a setting twice")
    return {t: parse_candidate(t, base) for t in items}


def setting_bits(args: QuantArgs, out_features: int, in_features: int) -> int:
    """Bits a linear [out, in] takes at ``args`` (weights, scales, zero points)."""
    return int(round(bits_per_weight(args, in_features, out_features) * out_features * in_features))


@dataclass(kw_only=True)
class Allocation:
    choice: list[int]  # per linear, the index of its setting
    total_bits: int
    total_cost: float
    budget_bits: int
    exact: bool  # the dynamic programme ran on the exact size grid


def _check_problem(costs: list[list[float]], sizes: list[list[int]], budget_bits: int) -> None:
    if not costs:
        raise UserError("mixed precision: no linear to allocate")
    if len(costs) != len(sizes):
        raise UserError("mixed precision: one list of costs and of sizes per linear")
    for i, (c, b) in enumerate(zip(costs, sizes)):
        if not c or len(c) != len(b):
            raise UserError(f"mixed precision: linear {i} has {len(c)} costs for {len(b)} sizes (at least one option each)")
        if any(not math.isfinite(x) or x < 0 for x in c) or any(int(x) != x or x <= 0 for x in b):
            raise UserError(f"mixed precision: linear {i} has a cost that is not a finite number >= 0 or a size that is not a positive integer")
    smallest = sum(min(b) for b in sizes)
    if smallest > budget_bits:
        raise UserError(f"budget of {budget_bits} bits is below the smallest option ({smallest} bits: every linear at its smallest setting)")


def allocate(costs: list[list[float]], sizes: list[list[int]], budget_bits: int, *, max_steps: int = 200_000) -> Allocation:
    """The settings (one index per linear) minimizing the summed cost with the summed size
    at most ``budget_bits`` (multiple-choice knapsack by dynamic programming; ties go to the
    earlier option). UserError when even the smallest options exceed the budget."""
    _check_problem(costs, sizes, budget_bits)
    unit = math.gcd(*[int(x) for b in sizes for x in b])
    exact = budget_bits // unit <= max_steps
    if not exact:
        unit = -(-budget_bits // max_steps)
    steps = budget_bits // unit
    units = [[-(-int(x) // unit) for x in b] for b in sizes]  # rounded up: never over the budget
    if sum(min(u) for u in units) > steps:  # the coarse grid lost the only feasible plans: all smallest
        choice = [min(range(len(b)), key=lambda k, b=b: (b[k], k)) for b in sizes]
        return _result(choice, costs, sizes, budget_bits, exact=False)
    best = torch.zeros(steps + 1, dtype=torch.float64)  # min cost of the linears so far within b units
    picks = torch.empty(len(costs), steps + 1, dtype=torch.int16)
    for i, (c, u) in enumerate(zip(costs, units)):
        options = torch.full((len(c), steps + 1), float("inf"), dtype=torch.float64)
        for k, (ck, uk) in enumerate(zip(c, u)):
            if uk <= steps:
                options[k, uk:] = best[: steps + 1 - uk] + ck
        k_best = options.argmin(0)  # the first minimum: ties go to the earlier option
        best = options.gather(0, k_best.unsqueeze(0)).squeeze(0)
        picks[i] = k_best.to(torch.int16)
    choice = [0] * len(costs)
    b = steps
    for i in range(len(costs) - 1, -1, -1):
        k = int(picks[i, b])
        choice[i] = k
        b -= units[i][k]
    return _result(choice, costs, sizes, budget_bits, exact=exact)


def _result(choice, costs, sizes, budget_bits, *, exact: bool) -> Allocation:
    total = sum(int(sizes[i][k]) for i, k in enumerate(choice))
    if total > budget_bits:  # the construction forbids it; a guard, not a path
        raise AssertionError(f"allocation of {total} bits exceeds the budget of {budget_bits}")
    cost = sum(float(costs[i][k]) for i, k in enumerate(choice))
    return Allocation(choice=choice, total_bits=total, total_cost=cost, budget_bits=budget_bits, exact=exact)


def budget_bits(budget: float, n_weights: int) -> int:
    """The bits an average of ``budget`` bits per weight allows ``n_weights`` weights."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
        raise UserError(f"budget={budget!r}: expected a positive number of bits per weight")
    return int(math.floor(budget * n_weights + 1e-9))
