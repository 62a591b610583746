"""One compress, planned and checked once: which stage acts on which linear, which statistics
each linear needs, and everything about the recipe that can be checked against the model
before a weight changes (empty targets, group sizes that do not divide an input, statistics
asked for outside the decoder blocks). The engine executes the plan; nothing re-derives it.

What a compress produced (:class:`CompressResult`: per-linear records, the linears whose
inputs are quantized at run time, what model-scope stages reported) travels as an explicit
object to :func:`llmpress.api.save` and the exporters, not as attributes on the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch.nn as nn

from ..arch import ArchSpec, get_arch
from ..errors import UserError
from ..quant.args import QuantArgs, check_group_divides
from ..recipe import Recipe, Stage
from ..registry import METHODS, ModuleRecord

__all__ = ["CompressResult", "Plan", "build_plan", "joint_runs"]


@dataclass(kw_only=True, frozen=True)
class Plan:
    """A recipe matched against one model (see :func:`build_plan`)."""

    spec: ArchSpec
    recipe: Recipe
    targets: dict[str, tuple[tuple[int, Stage], ...]]  # linear full name -> (index, stage) acting on it, recipe order
    needs: dict[str, frozenset[str]]  # linear full name -> statistics its stages gather
    model_stages: tuple[tuple[int, Stage], ...]  # before the engine (rotations, OWL)
    block_stages: tuple[tuple[int, Stage], ...]  # once per decoder block (AWQ, SmoothQuant)

    @property
    def needs_data(self) -> bool:
        """Whether the engine runs sequentially on calibration data (some stage gathers statistics)."""
        return bool(self.model_stages or self.block_stages or any(self.needs.values()))

    @property
    def engine_needs_data(self) -> bool:
        return bool(self.block_stages or any(self.needs.values()))

    def local_targets(self, prefix: str) -> dict[str, str]:
        """The targeted linears under ``prefix``: local name -> full name."""
        return {n[len(prefix) + 1 :]: n for n in self.targets if n.startswith(prefix + ".")}

    def outside_blocks(self) -> list[str]:
        """Targeted linears outside the decoder blocks (the head, usually), in model order."""
        return [n for n in self.targets if not n.startswith(self.spec.blocks + ".")]

    def description(self) -> str:
        """The engine's bar names the methods it runs: ``compress (awq, gptq)``."""
        names = dict.fromkeys(s.method for _, s in (*self.block_stages, *(p for sts in self.targets.values() for p in sts)))
        return f"compress ({', '.join(names)})" if names else "compress"


def _explicit(st: Stage) -> frozenset[str] | None:
    """The stage's targets when they are plain names (no ``Linear``, no ``re:``), else None."""
    if any(t == "Linear" or t.startswith("re:") for t in st.targets):
        return None
    return frozenset(st.targets) - frozenset(st.ignore)


def _joins(run: list[tuple[int, Stage]], st: Stage) -> bool:
    first = run[0][1]
    if st.method != first.method or not METHODS[st.method].joint_grids:
        return False
    if not isinstance(getattr(st.config, "weights", None), QuantArgs) or replace(st.config, weights=first.config.weights) != first.config:
        return False
    mine = _explicit(st)
    if mine is None or any(_explicit(s) is None for _, s in run):
        return False
    return all(not (mine & _explicit(s)) for _, s in run)


def joint_runs(block_stages) -> tuple[tuple[tuple[int, Stage], ...], ...]:
    """``block_stages`` grouped into the engine's calls: one call per stage, except that
    consecutive stages of a method registered with ``joint_grids`` whose configs differ only in
    ``weights`` and whose targets are disjoint lists of names (what ``plan-bits`` writes) make
    one call, each target on its own grid (``BlockContext.grids``)."""
    runs: list[list[tuple[int, Stage]]] = []
    for i, st in block_stages:
        if runs and _joins(runs[-1], st):
            runs[-1].append((i, st))
        else:
            runs.append([(i, st)])
    return tuple(tuple(r) for r in runs)


def _check_layer_stages(
    name: str, sts: tuple[tuple[int, Stage], ...], lin: nn.Linear, model_stages: list[tuple[int, Stage]], in_blocks: bool
) -> None:
    """Per-linear checks a stage's config defines (``check_layer(out, in, name)``: a low-rank
    rank that would not save parameters), a model-scope stage it needs before it on this
    linear (``requires_stage``: wsvd's weight_importance), and no stage after one that
    replaces the weight by factors (``replaces_weight``), whose factors no later stage can act on yet."""
    for k, (i, st) in enumerate(sts):
        need = getattr(st.config, "requires_stage", None)
        if need and not any(ms.method == need and j < i and ms.matches(name, in_blocks) for j, ms in model_stages):
            raise UserError(f"layer {name}: recipe stage {i} ({st.method}) needs a {need} stage before it targeting this linear")
        check = getattr(st.config, "check_layer", None)
        if check is not None:
            check(lin.out_features, lin.in_features, f"layer {name}")
        if getattr(st.config, "replaces_weight", False) and k + 1 < len(sts):
            j, later = sts[k + 1]
            raise UserError(
                f"layer {name}: recipe stage {j} ({later.method}) after stage {i} ({st.method}), which factors the weight: "
                "stages acting on low-rank factors (quantizing them) are not in llmpress yet; put them before it or drop one"
            )


def _check_factor_stages(stages: list[tuple[int, Stage]], names: list[str], prefix: str) -> None:
    """A stage that trains low-rank factors (``requires_factors``: lowrank_tune) needs, on each
    linear it targets, an earlier stage that factors the weight."""
    for i, st in stages:
        if not getattr(st.config, "requires_factors", False):
            continue
        for name in (n for n in names if n.startswith(prefix) and st.matches(n, True)):  # a block-scope stage: the blocks' linears
            if not any(getattr(s.config, "replaces_weight", False) and s.matches(name, True) for _, s in stages[:i]):
                raise UserError(f"layer {name}: recipe stage {i} ({st.method}) needs a low-rank stage before it that factors this linear")


def build_plan(model: nn.Module, recipe: Recipe, *, reshaped: bool = False) -> Plan:
    """Match ``recipe`` against ``model`` and check it; raises :class:`UserError` naming the
    first problem. Model-scope stages (rotations, OWL) keep every linear's name and shape,
    so the plan made before they run holds after them; one whose config says
    ``reshapes_model`` (structured pruning) is followed by a new plan of the smaller model
    (``reshaped``: the model-scope stages already ran, their own checks are not repeated)."""
    spec = get_arch(model)
    prefix = spec.blocks + "."
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    stages = list(enumerate(recipe.stages))
    targets: dict[str, tuple[tuple[int, Stage], ...]] = {}
    for name, _ in linears:
        sts = tuple((i, s) for i, s in stages if METHODS[s.method].scope == "module" and s.matches(name, name.startswith(prefix)))
        if sts:
            targets[name] = sts
    for i, st in stages:
        check_model = getattr(st.config, "check_model", None)  # a model-scope stage's own checks against the model (structured pruning)
        if check_model is not None and not reshaped and not any(getattr(s.config, "reshapes_model", False) for _, s in stages[:i]):
            check_model(model, spec)
        if METHODS[st.method].scope != "model" and not any(st.matches(n, n.startswith(prefix)) for n, _ in linears):
            raise UserError(f"recipe stage {i} ({st.method}) matches no linear layer: targets {list(st.targets)}, ignore {list(st.ignore)}")
    shapes = dict(linears)
    for name, sts in targets.items():
        model_stages = [(i, s) for i, s in stages if METHODS[s.method].scope == "model"]
        _check_layer_stages(name, sts, shapes[name], model_stages, name.startswith(prefix))
        for _, st in sts:
            for f in fields(st.config):
                qa = getattr(st.config, f.name)
                if isinstance(qa, QuantArgs):
                    check_group_divides(qa, shapes[name].in_features, f"layer {name}: {f.name} ")
    for i, st in stages:  # a block-scope stage that factors weights runs before every module stage of its block
        if METHODS[st.method].scope == "block" and getattr(st.config, "replaces_weight", False):
            hit = [n for n in targets if n.startswith(prefix) and st.matches(n, True)]
            if hit:
                j, later = targets[hit[0]][0]
                raise UserError(
                    f"layer {hit[0]}: recipe stage {j} ({later.method}) would run after stage {i} ({st.method}), which factors the weight "
                    "(block-scope stages run first): stages acting on low-rank factors (quantizing them) are not in llmpress yet"
                )
    _check_factor_stages(stages, [n for n, _ in linears], prefix)
    needs = {n: frozenset(a for _, s in sts for a in METHODS[s.method].needs) for n, sts in targets.items()}
    stray = [n for n in targets if not n.startswith(prefix) and needs[n] and n != spec.lm_head]
    if stray:
        raise UserError(f"statistics for linears outside the decoder blocks are only gathered for {spec.lm_head}: {stray}")
    return Plan(
        spec=spec,
        recipe=recipe,
        targets=targets,
        needs=needs,
        model_stages=tuple((i, s) for i, s in stages if METHODS[s.method].scope == "model"),
        block_stages=tuple((i, s) for i, s in stages if METHODS[s.method].scope == "block"),
    )


@dataclass(kw_only=True)
class CompressResult:
    """What one compress did: enough to size, save and export the model it changed.

    ``records``: per targeted linear, what its stages did (grid, qparams, sparsity, form).
    ``act_quant``: the linears whose inputs are quantized at run time (the engine wrapped
    them in :class:`llmpress.runtime.act_quant.ActQuantLinear` so the model in memory runs
    as it will be served). ``stages``: what model-scope stages reported (``stage{i}:{method}``).
    """

    records: dict[str, ModuleRecord] = field(default_factory=dict)
    act_quant: tuple[str, ...] = ()
    stages: dict[str, Any] = field(default_factory=dict)
