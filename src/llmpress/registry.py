"""The method registry: one config dataclass and one handler per method.

A handler is thin: it reads the statistics the engine gathered for one module, calls the
method's pure tensor function, and writes the result back (weight, record). Methods of
``scope="model"`` transform the whole model before the sequential engine runs
(smoothing, rotation).

No list of methods is kept by hand: a method is one module that registers itself with
``@register(...)``. Looking a method up by name imports the one module whose source
registers that name (:func:`method_index` reads the sources of :data:`PACKAGES`; nothing
else is imported, so parsing a recipe loads only the algorithms it names). Looking it up
by its config type (:func:`method_for_config`) imports the config's own module.
:func:`load_all` imports every registering module (to list them all).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .errors import RecipeError
from .quant.args import QuantArgs
from .quant.core import QParams
from .storage.form import record_bits


@dataclass(kw_only=True)
class ModuleRecord:
    """What compression did to one linear: enough to account its size and pack it."""

    name: str
    out_features: int
    in_features: int
    methods: list[str] = field(default_factory=list)
    weight_args: QuantArgs | None = None
    qparams: QParams | None = None
    act_args: QuantArgs | None = None
    sparsity: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)
    form: str | None = None  # storage form to write (llmpress.storage.forms); None: int grid if weight_args, sparse mask if pruned
    # tensors a method hands to its storage form as they are (low-rank factors, codebook indices
    # and entries): the form stores these rather than recomputing them from the weight
    payload: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def n_params(self) -> int:
        return self.out_features * self.in_features

    def bits_per_weight(self, dense_bits: int = 16) -> float:
        """Bits per weight its storage form counts (notes["extra_bits"]: storage beside the
        form's tensors, e.g. CSR fp16 outliers, amortized)."""
        return record_bits(self, dense_bits)


@dataclass(kw_only=True)
class ModuleContext:
    name: str
    module: nn.Linear
    stats: dict[str, Any]
    record: ModuleRecord
    # settings a model-scope stage left for this linear's later stages (OWL: "sparsity_offset")
    settings: dict[str, Any] = field(default_factory=dict)
    # statistics no later stage on this linear reads: :meth:`take` hands them over
    last_use: frozenset[str] = frozenset()

    def take(self, key: str) -> tuple[Any, bool]:
        """(statistic, owned): a statistic no later stage reads leaves ``stats`` and is the
        handler's to overwrite and free (a Hessian copy less at the solver's peak)."""
        if key in self.last_use:
            return self.stats.pop(key), True
        return self.stats[key], False

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight.data

    def set_weight(self, w: torch.Tensor) -> None:
        self.module.weight.data.copy_(w.to(self.module.weight.dtype))


@dataclass(kw_only=True)
class ModelStageOutput:
    """What a model-scope handler may return (instead of None): per-linear settings for the
    stages after it (``per_linear[name][key]``, handed to them as ``ModuleContext.settings``)
    and a summary that the report keeps under ``stages``."""

    per_linear: dict[str, dict[str, Any]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True, frozen=True)
class Method:
    name: str
    config_cls: type
    apply: Callable
    needs: tuple[str, ...] = ()
    # "module": apply(ModuleContext, cfg) per targeted linear, inside the engine;
    # "block": apply(BlockContext, cfg) once per decoder block, before its module stages
    #          (smoothing/AWQ-style scale search that needs the block's calibration inputs);
    # "model": apply(model, spec, calib_windows, stage) once, before the engine (rotations);
    #          returns None or a ModelStageOutput.
    scope: str = "module"
    summary: str = ""
    # block scope: consecutive stages of this method that differ only in their grid
    # (``weights``) and name their targets explicitly (a plan-bits recipe) run as one call,
    # each target's grid in ``BlockContext.grids`` (block-wise reconstruction learns them together)
    joint_grids: bool = False


class _Methods(dict):
    """name -> Method. A name not registered yet imports the module that registers it
    (found by :func:`method_index`), so ``METHODS[name]`` works before anything imported it."""

    def __missing__(self, name: str) -> Method:
        _load(name)
        if dict.__contains__(self, name):
            return dict.__getitem__(self, name)
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        """``name in METHODS`` is true for a method not imported yet too (``"gptq" in METHODS``
        in a fresh process), as ``METHODS[name]`` finds it."""
        if dict.__contains__(self, name):
            return True
        if not isinstance(name, str):
            return False
        try:
            self[name]
        except KeyError:
            return False
        return True


METHODS: dict[str, Method] = _Methods()

# Packages whose modules are searched for registrations; a plug-in package (or a test) may append one.
PACKAGES: list[str] = [__name__.rpartition(".")[0]]
_REGISTRATION = re.compile(r"^@register\(\s*[\"']([^\"']+)[\"']", re.M)


def register(name: str, config_cls: type, needs: tuple[str, ...] = (), scope: str = "module", summary: str = "", joint_grids: bool = False):
    """Decorator: ``@register("rtn", RTN, needs=(...), scope=...)`` on the method's handler.

    Written at the start of a line in a module of one of :data:`PACKAGES`, the method is
    found by name without importing anything first (see :func:`method_index`)."""

    def deco(fn: Callable) -> Callable:
        if dict.__contains__(METHODS, name):
            raise RuntimeError(f"method {name!r} registered twice")
        METHODS[name] = Method(
            name=name,
            config_cls=config_cls,
            apply=fn,
            needs=tuple(needs),
            scope=scope,
            summary=summary or (fn.__doc__ or "").strip().split("\n")[0],
            joint_grids=joint_grids,
        )
        return fn

    return deco


@functools.cache
def _scan(package: str) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """((method name, module), ...) and the modules that import from the registry and call
    ``register(`` at all, read from the package's source files (nothing is imported)."""
    spec = importlib.util.find_spec(package)
    found, candidates = [], []
    for root in (spec.submodule_search_locations or []) if spec else []:
        for f in sorted(Path(root).rglob("*.py")):
            parts = f.relative_to(root).with_suffix("").parts
            mod = ".".join((package,) + (parts[:-1] if parts[-1] == "__init__" else parts))
            if mod == __name__:
                continue
            text = f.read_text(encoding="utf-8")
            if "register(" not in text or "registry import" not in text:
                continue
            candidates.append(mod)
            found.extend((name, mod) for name in _REGISTRATION.findall(text))
    return tuple(found), tuple(candidates)


def method_index() -> dict[str, str]:
    """Method name -> the module that registers it (``@register("name", ...)`` at the start
    of a line), for every module of :data:`PACKAGES`."""
    out: dict[str, str] = {}
    for pkg in PACKAGES:
        for name, mod in _scan(pkg)[0]:
            out.setdefault(name, mod)
    return out


def _load(name: str) -> None:
    mod = method_index().get(name)
    if mod is not None:
        importlib.import_module(mod)
    if not dict.__contains__(METHODS, name):  # registered some other way (a computed name): import every candidate
        load_all()


def load_all() -> dict[str, Method]:
    """Import every module that registers a method; returns :data:`METHODS`."""
    for pkg in PACKAGES:
        for mod in _scan(pkg)[1]:
            importlib.import_module(mod)
    return METHODS


def get_method(name: str) -> Method:
    """The method registered as ``name`` (its module is imported on first use)."""
    try:
        return METHODS[name]
    except KeyError:
        raise RecipeError(f"unknown method {name!r}; known methods: {', '.join(sorted(load_all()))}") from None


def method_for_config(cfg) -> Method:
    """The method whose config class is ``cfg`` (a config instance or the class itself)."""
    cls = cfg if isinstance(cfg, type) else type(cfg)
    for attempt in range(2):
        hits = [m for m in METHODS.values() if m.config_cls is cls]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise RecipeError(f"config {cls.__name__} belongs to several methods: {', '.join(sorted(m.name for m in hits))}")
        if attempt == 0:
            importlib.import_module(cls.__module__)  # one file per method: the config's module registers it
    raise RecipeError(f"{cls.__module__}.{cls.__name__} is not the config of a registered method")


def build_config(cls: type, d: dict, where: str):
    """Build a method's config dataclass from a mapping, naming the bad field on error."""
    if not isinstance(d, dict):
        raise RecipeError(f"{where}: expected a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(d) - names)
    if bad:
        raise RecipeError(f"{where}: unknown field(s) {', '.join(bad)}; {cls.__name__} takes {', '.join(sorted(names)) or 'no fields'}")
    kwargs = {}
    for k, v in d.items():
        hint = hints.get(k)
        args = typing.get_args(hint) or (hint,)
        if v is None and type(None) in args:
            pass  # an optional field left unset
        elif typing.get_origin(hint) is tuple:  # a list in YAML: each item a number (tuple[float, ...])
            if not isinstance(v, (list, tuple)) or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in v):
                raise RecipeError(f"{where}.{k}: expected a list of numbers, got {v!r}")
            v = tuple(v)
        elif QuantArgs in args and v is not None:
            v = QuantArgs.from_dict(v, f"{where}.{k}")
        elif (
            bool not in args and str not in args and any(a in (int, float) for a in args) and (isinstance(v, bool) or not isinstance(v, (int, float)))
        ):
            raise RecipeError(f"{where}.{k}: expected a number, got {v!r}")
        elif bool in args and str in args and not isinstance(v, (bool, str)):  # true / false or a word (amp: auto)
            raise RecipeError(f"{where}.{k}: expected true, false or a word, got {v!r}")
        elif bool not in args and str in args and float in args and (isinstance(v, bool) or not isinstance(v, (int, float, str))):
            raise RecipeError(f"{where}.{k}: expected a number or a word, got {v!r}")  # a value or auto
        elif bool in args and str not in args and not isinstance(v, bool):
            raise RecipeError(f"{where}.{k}: expected true or false, got {v!r}")
        kwargs[k] = v
    try:
        return cls(**kwargs)
    except RecipeError as e:
        raise RecipeError(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:
        raise RecipeError(f"{where}: {e}") from None


def config_to_dict(cfg) -> dict:
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = v.to_dict() if isinstance(v, QuantArgs) else v
    return out
