"""The method registry: one config dataclass and one handler per method.

A handler is thin: it reads the statistics the engine gathered for one module, calls the
method's pure tensor function, and writes the result back (weight, record). Methods of
``scope="model"`` transform the whole model before the sequential engine runs
(smoothing, rotation).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from .errors import RecipeError
from .quant.args import QuantArgs
from .quant.core import QParams, bits_per_weight


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

    @property
    def n_params(self) -> int:
        return self.out_features * self.in_features

    def bits_per_weight(self, dense_bits: int = 16) -> float:
        # notes["extra_bits"]: storage beside the dense grid (e.g. sparse fp16 outliers), amortized
        extra = float(self.notes.get("extra_bits", 0)) / self.n_params
        if self.weight_args is None:
            return float(dense_bits) + extra
        return bits_per_weight(self.weight_args, self.in_features, self.out_features) + extra


@dataclass(kw_only=True)
class ModuleContext:
    name: str
    module: nn.Linear
    stats: dict[str, Any]
    record: ModuleRecord

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight.data

    def set_weight(self, w: torch.Tensor) -> None:
        self.module.weight.data.copy_(w.to(self.module.weight.dtype))


@dataclass(kw_only=True, frozen=True)
class Method:
    name: str
    config_cls: type
    apply: Callable
    needs: tuple[str, ...] = ()
    # "module": apply(ModuleContext, cfg) per targeted linear, inside the engine;
    # "block": apply(BlockContext, cfg) once per decoder block, before its module stages
    #          (smoothing/AWQ-style scale search that needs the block's calibration inputs);
    # "model": apply(model, spec, calib_windows, stage) once, before the engine (rotations).
    scope: str = "module"
    summary: str = ""


METHODS: dict[str, Method] = {}


def register(name: str, config_cls: type, needs: tuple[str, ...] = (), scope: str = "module", summary: str = ""):
    def deco(fn: Callable) -> Callable:
        if name in METHODS:
            raise RuntimeError(f"method {name!r} registered twice")
        METHODS[name] = Method(name=name, config_cls=config_cls, apply=fn, needs=tuple(needs), scope=scope, summary=summary or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return deco


def get_method(name: str) -> Method:
    from . import methods  # noqa: F401  (fills the registry)

    if name not in METHODS:
        raise RecipeError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


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
        if QuantArgs in args and v is not None:
            v = QuantArgs.from_dict(v, f"{where}.{k}")
        elif bool not in args and any(a in (int, float) for a in args) and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise RecipeError(f"{where}.{k}: expected a number, got {v!r}")
        elif bool in args and not isinstance(v, bool):
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
