"""The data-free counterpart of a calibrated recipe, scored without a second copy of the model.

A calibrated method (GPTQ, AWQ, SparseGPT, Wanda) earns its place by beating what the same
storage gets without calibration data: round-to-nearest on the same grid, magnitude pruning
at the same sparsity. That gain can be large on the calibration text and vanish on other
text; :func:`held_out_warnings` says when. The counterpart is evaluated on the
*uncompressed* model with forward hooks that swap each targeted linear's weight for its
data-free version during its own forward only, so the extra memory is one layer's weight.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

from torch import nn

from ..recipe import Recipe, Stage
from ..registry import METHODS, ModuleContext, ModuleRecord

PRUNERS = ("sparsegpt", "wanda", "magnitude")
QUANTIZERS = ("gptq", "awq", "rtn", "sparsegpt")


def reference_recipe(recipe: Recipe) -> Recipe | None:
    """RTN on the recipe's weight grid and/or magnitude pruning at its sparsity, or None when the
    recipe gathers no data, quantizes activations, or has stages without a data-free twin
    (rotations, smoothing, outliers kept in float)."""
    if not any(METHODS[s.method].needs or METHODS[s.method].scope != "module" for s in recipe.stages):
        return None
    prune = quant = None
    for s in recipe.stages:
        cfg = s.config
        if s.method not in PRUNERS + QUANTIZERS:
            return None
        if getattr(cfg, "activations", None) is not None:
            return None
        if s.method in PRUNERS:
            prune = s
        w = getattr(cfg, "weights", None)
        if s.method in QUANTIZERS and w is not None and (s.method != "awq" or cfg.quantize or quant is None):
            quant = (s, w)
    stages = []
    if prune is not None:
        c = prune.config
        stages.append(Stage(method="magnitude", config=METHODS["magnitude"].config_cls(sparsity=c.sparsity, n=c.n, m=c.m),
                            targets=prune.targets, ignore=prune.ignore))  # fmt: skip
    if quant is not None:
        s, w = quant
        stages.append(Stage(method="rtn", config=METHODS["rtn"].config_cls(weights=w), targets=s.targets, ignore=s.ignore))
    return Recipe(stages=tuple(stages)) if stages else None


def describe(ref: Recipe) -> str:
    parts = []
    for s in ref.stages:
        c = s.config
        if s.method == "magnitude":
            parts.append(f"magnitude {c.n}:{c.m}" if c.n else f"magnitude {c.sparsity:.0%}")
        else:
            w = c.weights
            parts.append(f"RTN W{w.bits}" + (f" g{w.group_size}" if w.granularity == "group" else f" per {w.granularity}"))
    return " + ".join(parts)


@contextmanager
def swapped_weights(model: nn.Module, ref: Recipe, blocks: str):
    """While active, each linear the reference targets runs with its data-free weight
    (computed at each forward from the untouched original, then put back). ``blocks``: the
    decoder blocks' module path (what the word ``Linear`` in targets covers)."""
    handles, watched = [], []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        stages = [s for s in ref.stages if s.matches(name, name.startswith(blocks + "."))]
        if not stages:
            continue

        def pre(m, _inp, name=name, stages=stages):
            m._llmpress_orig = m.weight.data
            m.weight.data = m.weight.data.clone()
            rec = ModuleRecord(name=name, out_features=m.out_features, in_features=m.in_features)
            for s in stages:
                METHODS[s.method].apply(ModuleContext(name=name, module=m, stats={}, record=rec), s.config)

        def post(m, _inp, _out):
            m.weight.data = m._llmpress_orig
            del m._llmpress_orig

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
        watched.append(mod)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for mod in watched:  # a forward that raised between the two hooks leaves its swap: undo it
            if hasattr(mod, "_llmpress_orig"):
                mod.weight.data = mod._llmpress_orig
                del mod._llmpress_orig


def held_out_warnings(*, calib_sources: tuple[str, ...], compressed: dict, reference: dict, method: str) -> list[str]:
    """One line per evaluated source outside the calibration text where the method's gain over
    its data-free counterpart (in log perplexity) is under half its gain on the calibration
    sources' test text (their mean). Needs a calibration source among the evaluated ones."""
    gain = {s: math.log(reference[s]) - math.log(compressed[s]) for s in compressed if s in reference}
    inside = [gain[s] for s in calib_sources if s in gain]
    if not inside:
        return []
    g0 = sum(inside) / len(inside)
    where = ",".join(s for s in calib_sources if s in gain)
    if g0 <= 0:
        return [f"{method} is no better than its data-free counterpart on {where}, its own calibration text"]
    out = []
    for s, g in gain.items():
        if s not in calib_sources and g < 0.5 * g0:
            out.append(f"{method}'s gain over its data-free counterpart on {s} is {g / g0:.0%} of its gain on {where} "
                       f"(ppl {compressed[s]:.3f} vs {reference[s]:.3f}): the calibration text may not represent {s}; "
                       f"consider --calib-data {','.join(calib_sources)},{s}")  # fmt: skip
    return out


def wanted(recipe: Recipe, sources, calib_sources) -> bool:
    """Whether the held-out check means something: several evaluated sources, a calibration
    source among them, and a data-free counterpart for the recipe."""
    return len(sources) >= 2 and bool(set(calib_sources) & set(sources)) and reference_recipe(recipe) is not None


def measure_reference(model: nn.Module, recipe: Recipe, windows, *, calib_sources: tuple[str, ...], batch_size: int,
                      progress: bool, blocks: str, measure=None) -> dict | None:  # fmt: skip
    """``report.reference`` before compression: the data-free counterpart's perplexity on every
    evaluated source, when the check means something (several sources, a calibration source
    among them, a counterpart exists); else None. ``windows``: an
    :class:`llmpress.eval.sources.SourceWindows`; ``measure``: the perplexity function
    (default :func:`llmpress.eval.perplexity.perplexity`)."""
    if not wanted(recipe, windows.sources, calib_sources):
        return None
    ref = reference_recipe(recipe)
    with swapped_weights(model, ref, blocks):
        kw = {"measure": measure} if measure is not None else {}
        by_source = windows.perplexities(model, batch_size=batch_size, progress=progress, desc="data-free reference ppl", **kw)
    return {"recipe": describe(ref), "ppl_by_source": by_source}


def check_transfer(report, calib_sources: tuple[str, ...]) -> list[str]:
    """Held-out warnings for ``report`` (stored in ``report.reference["warnings"]``)."""
    ref = report.reference
    if not ref:
        return []
    method = "+".join(s["method"] for s in report.recipe.get("stages", [])) or "the recipe"
    ref["warnings"] = held_out_warnings(calib_sources=calib_sources, compressed=report.compressed.get("ppl_by_source") or {},
                                        reference=ref["ppl_by_source"], method=method)  # fmt: skip
    return ref["warnings"]
