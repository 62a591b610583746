"""Test-only shrink: environment variables that make the real commands run small.

Tests run the commands users run (``llmpress compress smollm2-135m ...`` exactly as the
README writes them), so nothing about the command line may change. Instead these
variables, read where a packaged alias is resolved and where token windows are cut,
make the same code path cheap:

``LLMPRESS_TEST_MODELS="smollm2-135m=/path/tiny-llama,gemma3-270m=/path/tiny-gemma"``
    a packaged alias loads this local HF folder instead (through the ordinary
    local-folder path: safetensors + tokenizer);
``LLMPRESS_TEST_WINDOWS=N``
    at most N calibration samples and N evaluation windows (also for ``analyze``);
``LLMPRESS_TEST_SEQLEN=L``
    windows of at most L tokens.

Figures made under a shrink are not the model's: every report records the variables in
force (``test_shrink`` in the JSON, a line under the table) and the first use logs a
one-line warning. Malformed values are a :class:`UserError` naming the variable.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .errors import UserError

log = logging.getLogger(__name__)

ENV_MODELS = "LLMPRESS_TEST_MODELS"
ENV_WINDOWS = "LLMPRESS_TEST_WINDOWS"
ENV_SEQLEN = "LLMPRESS_TEST_SEQLEN"
VARIABLES = (ENV_MODELS, ENV_WINDOWS, ENV_SEQLEN)

_warned: set[tuple[tuple[str, str], ...]] = set()


def in_force() -> dict[str, str] | None:
    """The shrink variables set in this process (name -> value), or None when none is."""
    found = {k: os.environ[k] for k in VARIABLES if os.environ.get(k, "").strip()}
    return found or None


def _warn() -> None:
    """One warning line per process (per distinct setting) naming every variable in force."""
    found = tuple(sorted((in_force() or {}).items()))
    if found and found not in _warned:
        _warned.add(found)
        log.warning("test shrink in force (%s): figures are not the real model's", " ".join(f"{k}={v}" for k, v in found))


def _positive(name: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        raise UserError(f"{name} must be a positive integer, got {raw!r}") from None
    if n < 1:
        raise UserError(f"{name} must be a positive integer, got {raw!r}")
    _warn()
    return n


def model_overrides() -> dict[str, str]:
    """``LLMPRESS_TEST_MODELS`` parsed: alias -> local folder."""
    raw = os.environ.get(ENV_MODELS, "").strip()
    out: dict[str, str] = {}
    if not raw:
        return out
    for item in raw.split(","):
        alias, sep, folder = item.partition("=")
        if not sep or not alias.strip() or not folder.strip():
            raise UserError(f"{ENV_MODELS} must read alias=folder[,alias=folder...], got {item!r}")
        out[alias.strip()] = folder.strip()
    return out


def model_override(alias: str, packaged: tuple[str, ...]) -> str | None:
    """The folder that replaces packaged ``alias`` under ``LLMPRESS_TEST_MODELS``, if any."""
    overrides = model_overrides()
    unknown = sorted(set(overrides) - set(packaged))
    if unknown:
        raise UserError(f"{ENV_MODELS} names {', '.join(unknown)}, not packaged aliases ({', '.join(packaged)})")
    folder = overrides.get(alias)
    if folder is None:
        return None
    if not (Path(folder).expanduser() / "config.json").is_file():
        raise UserError(f"{ENV_MODELS}: {alias}={folder} is not a model folder with config.json")
    _warn()
    return folder


def cap_windows(n: int | None) -> int | None:
    """``n`` windows (None = all) capped by ``LLMPRESS_TEST_WINDOWS``."""
    cap = _positive(ENV_WINDOWS)
    if cap is None:
        return n
    return cap if n is None else min(n, cap)


def cap_seqlen(seqlen: int) -> int:
    """``seqlen`` capped by ``LLMPRESS_TEST_SEQLEN``."""
    cap = _positive(ENV_SEQLEN)
    return seqlen if cap is None else min(seqlen, cap)
