"""Recipes: an ordered list of stages, each a method with its config, targets and ignores.

YAML form::

    name: rtn-w4g64
    description: RTN W4 symmetric, group 64
    stages:
      - method: rtn
        targets: [Linear]          # exact module names, `re:` patterns, or the word Linear
        ignore: [lm_head]
        weights: {bits: 4, symmetric: true, granularity: group, group_size: 64}

``Linear`` means every linear inside the decoder blocks. ``re:`` patterns must match the
whole module name (``re:.*self_attn\\.(q|k|v)_proj``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import RecipeError
from .registry import build_config, config_to_dict, get_method, method_for_config

PRESET_DIR = Path(__file__).parent / "recipes"


@dataclass(kw_only=True, frozen=True)
class Stage:
    method: str
    config: Any
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ("lm_head",)

    def matches(self, name: str, in_blocks: bool) -> bool:
        return _match_any(self.targets, name, in_blocks) and not _match_any(self.ignore, name, in_blocks)

    def to_dict(self) -> dict:
        return {"method": self.method, "targets": list(self.targets), "ignore": list(self.ignore), **config_to_dict(self.config)}


def _match_any(patterns: tuple[str, ...], name: str, in_blocks: bool) -> bool:
    for p in patterns:
        if p == "Linear":
            if in_blocks:
                return True
        elif p.startswith("re:"):
            if re.fullmatch(p[3:], name):
                return True
        elif p == name:
            return True
    return False


@dataclass(kw_only=True, frozen=True)
class Recipe:
    stages: tuple[Stage, ...]
    name: str = "custom"
    description: str = ""

    def __post_init__(self):
        for i, s in enumerate(self.stages):  # a stage that only makes sense at some places in a recipe (distill)
            check = getattr(s.config, "check_position", None)
            if check is not None:
                check(i, self.stages)

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "stages": [s.to_dict() for s in self.stages]}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, d: Any, where: str = "recipe") -> Recipe:
        if not isinstance(d, dict):
            raise RecipeError(f"{where}: expected a mapping with a 'stages' list, got {type(d).__name__}")
        bad = sorted(set(d) - {"name", "description", "stages"})
        if bad:
            raise RecipeError(f"{where}: unknown field(s) {', '.join(bad)}; a recipe has name, description, stages")
        stages = d.get("stages")
        if not isinstance(stages, list) or not stages:
            raise RecipeError(f"{where}.stages: expected a non-empty list of stages")
        return cls(
            stages=tuple(_stage_from_dict(s, f"{where}.stages[{i}]") for i, s in enumerate(stages)),
            name=str(d.get("name", "custom")),
            description=str(d.get("description", "")),
        )

    @classmethod
    def from_yaml(cls, text: str, where: str = "recipe") -> Recipe:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise RecipeError(f"{where}: malformed YAML{at}: {getattr(e, 'problem', e)}") from None
        return cls.from_dict(data, where)


def _patterns(v: Any, where: str) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise RecipeError(f"{where}: expected a module name, a `re:` pattern, or a list of them")
    for p in v:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise RecipeError(f"{where}: bad regular expression {p!r}: {e}") from None
    return tuple(v)


def _stage_from_dict(d: Any, where: str) -> Stage:
    if not isinstance(d, dict):
        raise RecipeError(f"{where}: expected a mapping with a 'method' field")
    if "method" not in d:
        raise RecipeError(f"{where}: missing field 'method'")
    d = dict(d)
    name = d.pop("method")
    try:
        method = get_method(str(name))
    except RecipeError as e:
        raise RecipeError(f"{where}.method: {e}") from None
    targets = _patterns(d.pop("targets", ["Linear"]), f"{where}.targets")
    ignore = _patterns(d.pop("ignore", ["lm_head"]), f"{where}.ignore")
    cfg = build_config(method.config_cls, d, where)
    return Stage(method=method.name, config=cfg, targets=targets, ignore=ignore)


def stage(method: str | Any, targets=("Linear",), ignore=("lm_head",), **config) -> Stage:
    """Build a stage in Python: ``stage("rtn", weights=QuantArgs(bits=4))``, or from a
    method's config object: ``stage(GPTQ(weights=QuantArgs(bits=4)))``."""
    if not isinstance(method, str):
        if config:
            raise RecipeError(f"stage({type(method).__name__}(...)): set the fields in the config object, not as keywords ({', '.join(config)})")
        m = method_for_config(method)
        return Stage(method=m.name, config=method, targets=_patterns(list(targets), "targets"), ignore=_patterns(list(ignore), "ignore"))
    m = get_method(method)
    cfg = build_config(m.config_cls, {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in config.items()}, f"stage {method}")
    return Stage(method=m.name, config=cfg, targets=_patterns(list(targets), "targets"), ignore=_patterns(list(ignore), "ignore"))


def presets() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PRESET_DIR.glob("*.yaml"))}


def load_recipe(name_or_path: str | Recipe) -> Recipe:
    """A preset name, a YAML file path, or a Recipe object."""
    if isinstance(name_or_path, Recipe):
        return name_or_path
    ps = presets()
    if name_or_path in ps:
        return Recipe.from_yaml(ps[name_or_path].read_text(), f"preset {name_or_path}")
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return Recipe.from_yaml(p.read_text(), str(p))
    raise RecipeError(f"recipe {name_or_path!r} is neither a preset ({', '.join(ps)}) nor a YAML file")
