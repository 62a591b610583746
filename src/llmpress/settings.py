"""The settings of a run that several entry points share: calibration and evaluation windows
(what ``llmpress compress`` and ``llmpress eval`` draw) and the environment record of a report.
:mod:`llmpress.api` re-exports them."""

from __future__ import annotations

import platform
from dataclasses import dataclass

import torch

from . import data as data_mod
from . import shrink
from .arch import get_arch
from .calib import dist
from .errors import UserError


@dataclass(kw_only=True, frozen=True)
class CalibConfig:
    source: str = "wiki"  # "wiki", "news", "code", a text/JSONL file path, or a mix: "wiki,news", "wiki:0.75,news:0.25"
    n_samples: int = 128
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self):
        at_least(self.n_samples, 1, "calibration samples (--calib-samples)")
        at_least(self.seqlen, 2, "calibration window length (--calib-seqlen)")
        at_least(self.batch_size, 1, "batch size (--batch-size)")
        _ = self.mix  # a malformed source list fails here

    @property
    def mix(self) -> tuple[tuple[str, float], ...]:
        """(source, share) of :attr:`source`, shares summing to 1 (see :func:`llmpress.data.parse_sources`)."""
        return tuple(data_mod.parse_sources(self.source, shares=True, what="calibration data (--calib-data)"))


@dataclass(kw_only=True, frozen=True)
class EvalConfig:
    source: str = "wiki"  # one source or several, comma-separated: "wiki,news,code,path/to/file.txt"
    seqlen: int = 512
    max_windows: int | None = 64
    batch_size: int = 1  # windows per forward: larger is slightly faster on CPU and raises peak RSS
    kl_windows: int = 8  # of each source's windows, the first ones scored for KL divergence and top-1 (eval/kl.py); 0: off
    generate_tokens: int = 24  # greedy tokens after each fixed prompt, before and after compression (eval/generate.py); 0: off

    def __post_init__(self):
        at_least(self.seqlen, 2, "evaluation window length (--seqlen)")
        if self.max_windows is not None:
            at_least(self.max_windows, 1, "evaluation windows (--eval-windows)")
        at_least(self.batch_size, 1, "evaluation batch size")
        at_least(self.kl_windows, 0, "KL divergence windows (--kl-windows)")
        at_least(self.generate_tokens, 0, "greedy tokens per prompt (--generate-tokens)")
        _ = self.sources  # a malformed source list fails here

    @property
    def sources(self) -> tuple[str, ...]:
        """The evaluation sources of :attr:`source`, in the order given (the first one's figures are ``ppl``)."""
        return tuple(s for s, _ in data_mod.parse_sources(self.source, shares=False, what="evaluation data (--eval-data)"))


def at_least(value, low: int, what: str) -> None:
    """Settings that would fail deep inside a run (a division by zero, an empty tensor) fail here."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UserError(f"{what} must be an integer of at least {low}, got {value!r}")


def bos_for(tokenizer, model) -> int | None:
    try:
        needs = get_arch(model).needs_bos
    except UserError:
        needs = False
    return tokenizer.bos_token_id if needs else None


def calibration_windows(tokenizer, model, cfg: CalibConfig = CalibConfig()) -> torch.Tensor:
    """``cfg.n_samples`` windows of ``cfg.seqlen`` tokens (both capped by the test shrink, if set),
    from one source or a mix (:func:`llmpress.data.mixed_calib_windows`)."""
    n, seqlen = shrink.cap_windows(cfg.n_samples), shrink.cap_seqlen(cfg.seqlen)

    def stream_of(source: str) -> torch.Tensor:
        return data_mod.token_stream(source, "calib", tokenizer)

    return data_mod.mixed_calib_windows(stream_of, list(cfg.mix), n, seqlen, cfg.seed, bos_for(tokenizer, model))


def calibration_counts(cfg: CalibConfig = CalibConfig()) -> dict[str, int]:
    """{source: windows drawn from it} of :func:`calibration_windows` with ``cfg``."""
    names, shares = zip(*cfg.mix)
    return dict(zip(names, data_mod.mix_counts(list(shares), shrink.cap_windows(cfg.n_samples))))


def evaluation_windows(tokenizer, model, cfg: EvalConfig = EvalConfig(), source: str | None = None) -> torch.Tensor:
    """Test windows of ``source`` (default: the first of ``cfg.sources``); their number and
    length capped by the test shrink, if set."""
    stream = data_mod.token_stream(source or cfg.sources[0], "test", tokenizer)
    n, seqlen = shrink.cap_windows(cfg.max_windows), shrink.cap_seqlen(cfg.seqlen)
    return data_mod.eval_windows(stream, seqlen, n, bos_for(tokenizer, model))


def environment(device) -> dict:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "ranks": dist.current().world,  # data-parallel processes (--nproc / torchrun)
        "cpu": platform.processor() or platform.machine(),
    }
