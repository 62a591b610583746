"""``llmpress plan-bits``: a mixed-precision recipe under an average bits-per-weight budget.

1. The Hessian ``H = 2/n X^T X`` of every linear of the decoder blocks that the base
   recipe's quantizing stages target, from the dense model run block by block over the
   calibration windows; one block's matrices at a time (float64 sums), its costs (2.)
   measured before the next block's are gathered.
2. The cost of each candidate setting on each linear, ``tr(dW H dW^T)``, with dW the error
   of nearest rounding (``--solver rtn``), of block-wise reconstruction (``--solver blockwise``:
   every planned linear of the block learned together at that setting on the dense block's
   inputs and outputs, the base stage's steps when it is a blockwise stage; nearest rounding
   at 8 bits and more) or of GPTQ (``--solver gptq``, the base stage's
   damping, order and shrinkage when it is a GPTQ stage) at that setting (``--solver auto``, the
   default: GPTQ's for a GPTQ or blockwise base, nearest rounding's otherwise); with ``--weighting fisher``
   (the default) each output channel's share weighted by ``f_j = E[(dL/dy_j)^2]``, the
   squared gradient of the model's next-token loss with respect to that output (one
   backward pass of the dense model per batch): ``sum_j f_j (dW H dW^T)_jj``, a second-order
   estimate of the loss increase, so that layers whose errors the rest of the network
   amplifies weigh more than their raw output error says. ``--weighting fisher-token`` also
   weighs each token by its share of the squared gradient, ``a_t = sum_j (dL/dy_tj)^2`` over
   its mean: the cost Hessian becomes ``2/n sum_t a_t x_t x_t^T`` (the independence
   approximation ``(dL/dy_tj)^2 ~ a_t f_j``, exact in both marginals), so tokens the loss
   hardly sees stop dominating. That is gemma's sandwich norm: the post-MLP norm divides a
   token's down_proj output by its own scale, so the tokens with the largest inputs carry
   0-16% of the gradient their input energy implies (gemma-3-270m, docs/learned.md),
   and the channel-only Fisher spent W8 on down_proj and paid with W2 elsewhere. With ``--measure block`` the
   error is measured where the linear's decoder block hands over instead (EXL2's
   measurement pass): the block re-run on its first ``--measure-windows`` calibration
   windows with that one linear quantized, ``sum_c f_c E[(y_c - y_dense_c)^2]`` with f the
   squared loss gradient of the block's output: what the attention softmax, the MLP's gate
   and the block's other linears make of the error, which its own output error does not say.
3. The allocation (:func:`llmpress.quant.mixed.allocate`): the smallest summed cost whose
   size, counted as eval/size.py counts it, stays within the budget.
4. The recipe: every stage of the base recipe that quantizes weights of the block linears
   becomes one stage per chosen setting, with the setting's bits/group size and an explicit
   ``targets`` list (``ignore: []``); the other stages stay as they are (AWQ's search-only
   stage too: its scales are searched on the base grid for every linear). It is an ordinary
   YAML recipe: read it, edit it, pass it to ``llmpress compress --recipe``. Block methods
   registered with ``joint_grids`` (blockwise, omniquant) run such consecutive stages as one
   learning pass per block, each linear on its own grid (``calib.plan.joint_runs``).

The budget counts the planned linears only (the output head and embeddings keep what the
base recipe does with them).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from .arch import get_arch, get_module
from .calib.dense import DenseBlock, block_output_cost, dense_blocks, split_block
from .calib.sensitivity import collect_sensitivity
from .errors import UserError
from .quant.args import QuantArgs
from .quant.core import quantize_weight
from .quant.gptq_solve import gptq_quantize
from .quant.hessian import layer_error
from .quant.mixed import allocate, budget_bits, parse_candidates, setting_bits
from .recipe import Recipe, Stage

SOLVERS = ("auto", "rtn", "gptq", "blockwise")
# auto: GPTQ's costs for a base that compresses with GPTQ or block-wise reconstruction (its first
# quantizing stage), nearest rounding's otherwise
_AUTO_SOLVER = {"gptq": "gptq", "blockwise": "gptq"}
# each layer's output error weighted by the loss's sensitivity to each output channel, to each channel
# and each token, or summed as it is; auto: fisher-token where the architecture normalizes a
# sub-layer's output per token before the residual (post_norms: gemma), fisher elsewhere
WEIGHTINGS = ("auto", "fisher", "fisher-token", "none")
MEASURES = ("layer", "block")  # each setting's error on the linear's own output, or on its decoder block's


@dataclass(kw_only=True)
class BitPlan:
    recipe: Recipe
    choice: dict[str, str]  # linear -> candidate label
    bits_per_weight: float  # achieved average over the planned linears
    budget: float
    cost: float  # summed tr(dW H dW^T) of the choice
    uniform: dict[str, tuple[float, float] | None]  # label -> (bits per weight, summed cost) with every linear at it; None: not every linear can
    exact: bool
    weighting: str = "fisher"  # the weighting the costs used (``auto`` resolved)
    solver: str = "rtn"  # the solver the costs used (``auto`` resolved)

    def table(self) -> str:
        n = {lab: sum(1 for v in self.choice.values() if v == lab) for lab in self.uniform}
        lines = [f"{'setting':<10} {'bits/weight':>11} {'layer error if uniform':>23} {'linears chosen':>15}"]
        for lab, u in self.uniform.items():
            figs = f"{u[0]:>11.4f} {u[1]:>23.6g}" if u else f"{'-':>11} {'(not for every linear)':>23}"
            lines.append(f"{lab:<10} {figs} {n[lab]:>15}")
        lines.append(f"{'mixed':<10} {self.bits_per_weight:>11.4f} {self.cost:>23.6g} {len(self.choice):>15}  (budget {self.budget:g} bits/weight)")
        return "\n".join(lines)


def _quantizing_stages(base: Recipe) -> list[int]:
    """The stages that store weights on a grid (a ``weights`` field); a stage that only
    searches on one and stores nothing (AWQ's ``quantize: false``, scales for a later stage)
    stays whole: split per setting it would leave every group whose linears got different
    settings without scales."""
    idx = [
        i
        for i, s in enumerate(base.stages)
        if isinstance(getattr(s.config, "weights", None), QuantArgs) and getattr(s.config, "quantize", True) is not False
    ]
    if not idx:
        raise UserError(f"recipe {base.name!r}: no stage quantizes weights (a stage with a 'weights' field); plan-bits splits such a stage")
    return idx


def planned_linears(model: nn.Module, base: Recipe) -> list[str]:
    """The block linears some quantizing stage of ``base`` targets, in model order."""
    spec = get_arch(model)
    stages = [base.stages[i] for i in _quantizing_stages(base)]
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.startswith(spec.blocks + ".") and any(s.matches(n, True) for s in stages)
    ]
    if not names:
        raise UserError(f"recipe {base.name!r}: its quantizing stages target no linear of the decoder blocks")
    return names


_GPTQ_FIELDS = ("damp", "act_order", "static_groups", "block_size", "shrink", "diag_floor", "mse_importance")


def quantized(weight: torch.Tensor, hessian: torch.Tensor, args: QuantArgs, solver: str = "rtn", stage_config=None) -> torch.Tensor:
    """``weight`` quantized at ``args`` by nearest rounding or by GPTQ (the base stage's
    damping, order, shrinkage... when it is a GPTQ stage; act order and damp 0.01 otherwise)."""
    if solver == "rtn":
        return quantize_weight(weight.float(), args)[0]
    kw = {k: getattr(stage_config, k) for k in _GPTQ_FIELDS if hasattr(stage_config, k)}
    return gptq_quantize(weight, hessian, args, **{"act_order": True, "damp": 0.01, **kw}).weight


def setting_cost(
    weight: torch.Tensor, hessian: torch.Tensor, args: QuantArgs, solver: str = "rtn", stage_config=None, fisher: torch.Tensor | None = None
) -> float:
    """tr(dW H dW^T) of quantizing ``weight`` at ``args`` with ``solver``; with ``fisher``
    (per output channel) each row's error weighted by it, ``sum_j f_j (dW H dW^T)_jj``."""
    return _layer_cost(weight, quantized(weight, hessian, args, solver, stage_config), hessian, fisher)


def _layer_cost(weight: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor, fisher: torch.Tensor | None) -> float:
    if fisher is None:
        return layer_error(weight.float(), w_hat, hessian)
    D = (weight.float() - w_hat).double()
    return float((((D @ hessian.double()) * D).sum(1) * fisher).sum())


def _cost_table(model, names, blocks, cands, solver, stage_config, fisher=None, measure="layer", batches=2, tokens=None):
    """(costs, sizes) per linear and candidate, in ``names`` order, from the dense pass
    (``blocks``, :func:`dense_blocks`: each block's matrices freed before the next block's are
    gathered); a candidate whose group size does not divide a linear's input is left out for
    that linear (infinite cost is not an option: no entry). ``measure``: each linear's own
    output error (``layer``) or its block's (``block``, on the first ``batches`` batches;
    ``fisher`` then per block, keyed by the block's name; ``tokens`` likewise, each token's
    weight). The solver quantizes against the plain Hessian (what the compression will use);
    the layer cost reads the block's token-weighted one where it has it."""
    costs, sizes, options = [], [], []
    spec = get_arch(model)
    for d in blocks:
        learned = _learned_settings(d, spec.blocks, cands, stage_config) if solver == "blockwise" else {}
        for n, H in d.hessians.items():
            lin = get_module(model, n)
            w = lin.weight.detach()
            key = split_block(n, spec.blocks)[0] if measure == "block" else n
            f = None if fisher is None else fisher[key]
            a = None if tokens is None else tokens[key]
            Hc = d.cost_hessians.get(n, H)
            c, b, o = [], [], []
            for k, args in enumerate(cands.values()):
                if args.granularity == "group" and w.shape[1] % args.group_size:
                    continue
                w_hat = learned.get((k, n))
                if w_hat is None:
                    w_hat = quantized(w, H, args, "rtn" if solver == "blockwise" else solver, stage_config)
                c.append(block_output_cost(d, lin, w_hat, batches, f, a) if measure == "block" else _layer_cost(w, w_hat, Hc, f))
                b.append(setting_bits(args, w.shape[0], w.shape[1]))
                o.append(k)
            if not o:
                raise UserError(f"layer {n}: no candidate setting fits its input dimension {w.shape[1]} (group sizes must divide it)")
            costs.append(c)
            sizes.append(b)
            options.append(o)
    return costs, sizes, options


def _learned_settings(d: DenseBlock, blocks: str, cands: dict[str, QuantArgs], stage_config) -> dict:
    """Per candidate below 8 bits, the weights ``blockwise`` learns for the block's planned
    linears at it (those the setting fits), on the dense block's inputs and outputs:
    ``{(k, name): weight}``."""
    from .quant.blockwise import BlockwiseOptions, learned_weights

    opts = stage_config.options() if hasattr(stage_config, "options") else BlockwiseOptions()
    out: dict[tuple[int, str], torch.Tensor] = {}
    for k, args in enumerate(cands.values()):
        if args.bits >= 8:
            continue
        fit = {split_block(n, blocks)[1]: n for n, H in d.hessians.items() if args.granularity != "group" or H.shape[0] % args.group_size == 0}
        got = learned_weights(d.layer, list(fit), args, d.inputs, d.call_args, d.outputs, opts)
        out.update({(k, fit[loc]): w for loc, w in got.items()})
    return out


def plan_bits(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    base: Recipe,
    candidates: str | list[str],
    budget: float,
    solver: str = "auto",
    batch_size: int = 8,
    weighting: str = "auto",
    measure: str = "layer",
    measure_windows: int = 16,
) -> BitPlan:
    """The mixed-precision plan of ``model`` (see the module docstring)."""
    if solver not in SOLVERS:
        raise UserError(f"solver {solver!r} unknown; expected one of {', '.join(SOLVERS)}")
    if weighting not in WEIGHTINGS:
        raise UserError(f"weighting {weighting!r} unknown; expected one of {', '.join(WEIGHTINGS)}")
    if measure not in MEASURES:
        raise UserError(f"measure {measure!r} unknown; expected one of {', '.join(MEASURES)}")
    if measure_windows < 1:
        raise UserError(f"measure_windows must be at least 1, got {measure_windows}")
    weighting = resolved_weighting(model, weighting)
    solver = resolved_solver(base, solver)
    qidx = _quantizing_stages(base)
    first = base.stages[qidx[0]].config
    cands = parse_candidates(candidates, first.weights)
    names = planned_linears(model, base)
    n_weights = sum(get_module(model, n).weight.numel() for n in names)
    budget_total = budget_bits(budget, n_weights)
    spec = get_arch(model)
    blocks = list(dict.fromkeys(split_block(n, spec.blocks)[0] for n in names)) if measure == "block" else []
    fisher, tokens = (
        collect_sensitivity(model, blocks or names, windows, per_token=weighting == "fisher-token") if weighting != "none" else (None, {})
    )
    layer_tokens = tokens if measure == "layer" and tokens else None
    dense = dense_blocks(model, names, windows, batch_size, last_outputs=measure == "block" or solver == "blockwise", token_weights=layer_tokens)
    batches = -(-min(measure_windows, windows.shape[0]) // batch_size)
    costs, sizes, options = _cost_table(
        model, names, dense, cands, solver, first, fisher, measure, batches, tokens if measure == "block" and tokens else None
    )
    alloc = allocate(costs, sizes, budget_total)
    labels = list(cands)
    choice = {n: labels[options[i][k]] for i, (n, k) in enumerate(zip(names, alloc.choice))}
    uniform: dict[str, tuple[float, float] | None] = dict.fromkeys(labels)
    for j, lab in enumerate(labels):
        if all(j in o for o in options):
            pos = [o.index(j) for o in options]
            bits = sum(sizes[i][p] for i, p in enumerate(pos))
            uniform[lab] = (bits / n_weights, sum(costs[i][p] for i, p in enumerate(pos)))
    others = {n: n.startswith(spec.blocks + ".") for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in choice}
    recipe = mixed_recipe(base, choice, labels, budget=budget, solver=solver, bpw=alloc.total_bits / n_weights, others=others)
    return BitPlan(
        recipe=recipe,
        choice=choice,
        bits_per_weight=alloc.total_bits / n_weights,
        budget=budget,
        cost=alloc.total_cost,
        uniform=uniform,
        exact=alloc.exact,
        weighting=weighting,
        solver=solver,
    )


def resolved_weighting(model: nn.Module, weighting: str) -> str:
    """``auto`` -> ``fisher-token`` where the architecture has post-norms (a sub-layer's output
    divided by its own per-token scale before the residual: the tokens with the largest
    inputs reach the loss through 1/scale, which a per-channel Fisher cannot see; gemma-3-270m
    at 3.25 bits: 1.637x against 2.591x), ``fisher`` elsewhere (SmolLM2-135M, no post-norms:
    1.287x against fisher-token's 1.329x); any other value as it is."""
    if weighting != "auto":
        return weighting
    return "fisher-token" if get_arch(model).post_norms else "fisher"


def resolved_solver(base: Recipe, solver: str) -> str:
    """``auto`` -> ``gptq`` when the base recipe's first quantizing stage is GPTQ (SmolLM2-135M at
    3.25 bits, the plan compressed with GPTQ: 2.086x with GPTQ's costs against 2.314x with
    nearest rounding's) or ``blockwise`` (the plan compressed with blockwise: SmolLM2 1.287x /
    1.390x / 1.632x with GPTQ's costs against 1.362x / 1.525x / 1.708x with blockwise's own, in
    a third of the planning time; gemma-3-270m the other way, 1.637x / 2.016x / 2.560x against
    1.511x / 1.838x / 2.303x: no cost source wins on both, the cheaper one is the default);
    ``rtn`` otherwise; any other value as it is."""
    if solver != "auto":
        return solver
    return _AUTO_SOLVER.get(base.stages[_quantizing_stages(base)[0]].method, "rtn")


def mixed_recipe(
    base: Recipe, choice: dict[str, str], labels: list[str], *, budget: float, solver: str, bpw: float, others: dict[str, bool] | None = None
) -> Recipe:
    """``base`` with each quantizing stage split into one stage per chosen setting (explicit
    targets, ``ignore: []``); the other stages as they are. ``others``: the model's linears
    outside the plan (name -> inside the decoder blocks): a stage that also targets some of
    them (a named output head) keeps them, with its own setting, in a stage of its own."""
    stages: list[Stage] = []
    quantizing = _quantizing_stages(base)
    for i, st in enumerate(base.stages):
        if i not in quantizing:
            stages.append(st)
            continue
        mine = [n for n in choice if st.matches(n, True)]
        cands = parse_candidates(labels, st.config.weights)
        for lab in labels:
            targets = tuple(n for n in mine if choice[n] == lab)
            if targets:
                stages.append(Stage(method=st.method, config=replace(st.config, weights=cands[lab]), targets=targets, ignore=()))
        if any(st.matches(n, inside) for n, inside in (others or {}).items()):
            stages.append(Stage(method=st.method, config=st.config, targets=st.targets, ignore=st.ignore + tuple(mine)))
    desc = (
        f"{base.name} with per-linear settings from `llmpress plan-bits` (solver {solver}, candidates {','.join(labels)}): "
        f"{bpw:.4f} bits per weight on the block linears within a budget of {budget:g}"
    )
    return Recipe(stages=tuple(stages), name=f"{base.name}-mixed{budget:g}", description=desc)


def check_request(base_name: str, candidates: str, budget: float) -> Recipe:
    """What `plan-bits` can check before the model loads: the base recipe, the candidate
    settings and a budget no candidate set can go under (UserError naming the problem)."""
    from .recipe import load_recipe

    base = load_recipe(base_name)
    cands = parse_candidates(candidates, base.stages[_quantizing_stages(base)[0]].config.weights)
    budget_bits(budget, 1)
    smallest = min(a.bits for a in cands.values())
    if budget < smallest:
        raise UserError(f"budget {budget:g} bits per weight is below the smallest candidate ({smallest} bits plus its scales)")
    return base
