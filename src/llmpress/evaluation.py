"""``llmpress eval``: perplexity, size and bits of a model or a saved checkpoint, in memory or
streamed, with KL divergence against a baseline model and downstream tasks.
:func:`llmpress.api.evaluate` is this module's :func:`evaluate`."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from . import data as data_mod
from . import models
from .checkpoint import META_FILE, load_compressed, saved_records
from .errors import UserError
from .eval.kl import BaselineLogprobs, baseline_record, set_kl
from .eval.memory import PhaseTracker
from .eval.perplexity import perplexity
from .eval.size import model_size
from .eval.sources import SourceWindows, evaluation_record, set_ppl
from .eval.tasks import TaskConfig, check_run, score_tasks
from .eval.tasks import record as tasks_record
from .progress import scope as progress_scope
from .report import Report
from .settings import EvalConfig, environment, evaluation_windows
from .streamed import StreamedModel, streamed_perplexities


def evaluate(model_spec: str, evaluation: EvalConfig = EvalConfig(), *, device: str = "cpu", progress: bool = True, stream: bool = False,
             baseline: str | None = None, tasks: TaskConfig | None = None) -> Report:  # fmt: skip
    """Perplexity, size and bits of a model or a folder saved by llmpress. ``stream``: a model
    folder (not a compressed checkpoint) evaluated one block in memory at a time. ``baseline``: a
    reference model evaluated first on the same windows, then freed (``report.baseline``), and
    KL divergence and top-1 agreement against it (:mod:`llmpress.eval.kl`). ``tasks``:
    downstream tasks too (:mod:`llmpress.eval.tasks`)."""
    data_mod.check_sources(evaluation.sources)  # a missing or empty text file fails before the model loads
    check_run(tasks, stream=stream)
    if baseline is not None and stream:
        raise UserError("--baseline evaluates both models in memory, one after the other; not with --stream")
    phases, seconds, base = PhaseTracker(), {}, {}
    record = baseline_record(evaluation if baseline is not None else None)
    if baseline is not None:  # first, and freed before the evaluated model loads: never two models in memory
        phases.start("baseline_eval")
        t = time.perf_counter()
        base = _baseline_figures(baseline, evaluation, record, device=device, progress=progress)
        seconds["baseline_eval"] = time.perf_counter() - t
    phases.start("load")
    t = time.perf_counter()
    if stream:
        sm = _streamed_for_eval(model_spec, device)
        model, tok = sm.model, models.load_tokenizer(sm.folder)
    else:
        with progress_scope(progress):  # building the CPU kernels (first use) says so, unless silenced
            model, tok = load_compressed(model_spec, device)
    seconds["load"] = time.perf_counter() - t
    phases.start("eval_data")
    windows = SourceWindows(lambda s: evaluation_windows(tok, model, evaluation, s), evaluation.sources)
    shapes = windows.shapes()
    phases.start("eval")
    t = time.perf_counter()
    from .export.packed import packed_model_size

    if stream:
        size = model_size(model)
        by_source = streamed_perplexities(sm, {s: windows(s) for s in evaluation.sources}, batch_size=evaluation.batch_size, bars=progress)
    else:
        size = packed_model_size(model) or model_size(model, saved_records(model_spec))
        by_source = windows.perplexities(model, batch_size=evaluation.batch_size, progress=progress, desc="ppl", measure=perplexity,
                                         kl=record.comparer if record else None)  # fmt: skip
    set_ppl(size, by_source)
    seconds["eval"] = time.perf_counter() - t
    score_tasks(model, tok, tasks, phase="tasks", phases=phases, seconds=seconds, figures=size, show_progress=progress)
    rep = Report(model=model_spec, recipe={}, baseline=base, compressed=size, seconds=seconds)
    rep.evaluation = evaluation_record(asdict(evaluation), shapes) | tasks_record(tasks)
    if record is not None:
        set_kl(rep, record.stats)
        record.close()
        rep.evaluation["baseline_model"] = baseline
    rep.environment = {**environment(device), **({"streamed": True, "max_blocks_in_memory": sm.max_loaded} if stream else {})}
    phases.stop()
    rep.set_memory(phases)
    return rep


def _baseline_figures(spec: str, evaluation: EvalConfig, record: BaselineLogprobs | None, *, device: str, progress: bool) -> dict:
    """Size and perplexity of :func:`evaluate`'s ``baseline`` model, its log-probabilities into ``record``."""
    from .export.packed import packed_model_size

    with progress_scope(progress):
        model, tok = load_compressed(spec, device)
    windows = SourceWindows(lambda s: evaluation_windows(tok, model, evaluation, s), evaluation.sources)
    figures = packed_model_size(model) or model_size(model, saved_records(spec))
    set_ppl(figures, windows.perplexities(model, batch_size=evaluation.batch_size, progress=progress, desc="baseline ppl",
                                          kl=record.recorder if record else None))  # fmt: skip
    return figures


def _streamed_for_eval(model_spec: str, device: str) -> StreamedModel:
    where, local = models.resolve(model_spec)
    if not local:
        raise UserError(f"--stream reads the safetensors files of a local folder; {model_spec!r} is not one (download it first)")
    if (Path(where) / META_FILE).exists():
        raise UserError(
            f"--stream evaluates a model's own safetensors folder; {model_spec!r} was written by llmpress and is loaded whole "
            "(a compressed checkpoint is a fraction of the float32 model): evaluate it without --stream"
        )
    return StreamedModel(where, device=device)
