"""The one entry point: ``compress(model, recipe, data) -> Report``, and the full pipeline."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from . import data as data_mod
from . import io_safety, models
from .arch import get_arch
from .calib import dist
from .calib.engine import EngineOptions
from .calib.engine import run as run_engine
from .calib.plan import CompressResult, Plan, build_plan
from .checkpoint import META_FILE, SAVE_FORMATS, load_compressed, save, saved_records  # noqa: F401 (the public API's save/load)
from .errors import UserError
from .eval.generate import agreement, greedy_continuations
from .eval.kl import baseline_record, set_kl
from .eval.memory import PhaseTracker, peak_gpu_mb, peak_rss_mb
from .eval.perplexity import perplexity
from .eval.reference import check_transfer, measure_reference
from .eval.reference import wanted as wanted_reference
from .eval.size import model_size
from .eval.sources import SourceWindows, evaluation_record, set_ppl
from .eval.streamed import EvalStreams
from .eval.tasks import TaskConfig, check_run, score_tasks
from .eval.tasks import record as tasks_record
from .evaluation import evaluate  # noqa: F401 (re-exported)
from .progress import scope as progress_scope
from .prune.distill import original_model, teacher_copy
from .recipe import Recipe, Stage, load_recipe
from .registry import METHODS, ModelStageOutput, ModuleRecord
from .report import Report, checkpoint_bytes
from .settings import CalibConfig, EvalConfig, at_least, bos_for, calibration_counts, calibration_windows, environment, evaluation_windows  # noqa: F401 (re-exported)
from .streamed import StreamedModel, StreamIO, check_streamable
from .weights import check_finite

log = logging.getLogger(__name__)


def _as_recipe(recipe) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Stage):
        return Recipe(stages=(recipe,))
    if isinstance(recipe, (list, tuple)) and all(isinstance(s, Stage) for s in recipe):
        return Recipe(stages=tuple(recipe))
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    return load_recipe(str(recipe))


def compress(
    model,
    recipe,
    data: torch.Tensor | None = None,
    *,
    tokenizer=None,
    calib: CalibConfig = CalibConfig(),
    engine: EngineOptions | None = None,
) -> Report:
    """Compress ``model`` in place with ``recipe`` and return a report.

    ``model``: an HF causal LM (or a spec for :func:`llmpress.models.load`).
    ``recipe``: a Recipe, a list of stages, a preset name or a YAML path.
    ``data``: calibration token windows [n, L]; by default drawn from the packaged text
    with ``calib`` (needs ``tokenizer``) when some stage gathers statistics.
    """
    if isinstance(model, str):
        model, tokenizer = models.load(model)
    return _compress(model, validate(model, _as_recipe(recipe)), data, tokenizer=tokenizer, calib=calib, engine=engine)


def _compress(model, plan: Plan, data: torch.Tensor | None, *, tokenizer, calib: CalibConfig, engine: EngineOptions | None) -> Report:
    """:func:`compress` with the plan already built and checked (:func:`validate`)."""
    engine = engine or EngineOptions(batch_size=calib.batch_size)
    seconds: dict[str, float] = {}
    calib_info = {}
    if plan.needs_data and data is None:
        if tokenizer is None:
            raise UserError("this recipe needs calibration data: pass `data` (token windows) or `tokenizer`")
        t = time.perf_counter()
        data = calibration_windows(tokenizer, model, calib)
        seconds["calibration_data"] = time.perf_counter() - t
    if data is not None:
        calib_info = {**asdict(calib), "windows": int(data.shape[0]), "seqlen": int(data.shape[1])}
        counts = calibration_counts(calib)
        if sum(counts.values()) == data.shape[0]:  # windows drawn with ``calib`` (not ones passed in)
            calib_info["windows_by_source"] = counts
    t0 = time.perf_counter()
    settings: dict[str, dict] = {}  # per linear, what model-scope stages left for the stages after them
    summaries: dict[str, dict] = {}
    keep = any(getattr(st.config, "keeps_original", False) for _, st in plan.model_stages)  # a distill stage's teacher
    with original_model(teacher_copy(model, 1) if keep else None):
        for i, st in plan.model_stages:  # model-wide transforms first, in recipe order
            if settings and getattr(st.config, "reshapes_model", False):  # they name linears by their block index
                raise UserError(f"recipe stage {i} ({st.method}) removes structures after a stage that left per-layer settings: put it first")
            t = time.perf_counter()
            with progress_scope(engine.progress):  # model-scope methods' bars follow the engine's switch
                out = METHODS[st.method].apply(model, plan.spec, data, st)
            seconds[f"stage{i}:{st.method}"] = time.perf_counter() - t
            if isinstance(out, ModelStageOutput):
                for name, kv in out.per_linear.items():
                    settings.setdefault(name, {}).update(kv)
                if out.summary:
                    summaries[f"stage{i}:{st.method}"] = out.summary
    if any(getattr(st.config, "reshapes_model", False) for _, st in plan.model_stages):
        plan = build_plan(model, plan.recipe, reshaped=True)  # blocks, heads or channels removed: the later stages act on the smaller model
    result = run_engine(model, plan, data, engine, settings)
    seconds.update(result.seconds)
    seconds["compress_total"] = time.perf_counter() - t0
    report = Report(
        model=getattr(model, "llmpress_source", getattr(model.config, "_name_or_path", "?")),
        recipe=plan.recipe.to_dict(),
        compressed=model_size(model, result.records),
        seconds=seconds,
        calibration=calib_info,
        layers={n: _record_summary(r) for n, r in result.records.items()},
        stages=summaries,
    )
    report.result = CompressResult(
        records=result.records, act_quant=tuple(n for n, r in result.records.items() if r.act_args is not None), stages=summaries
    )
    report.peak_rss_mb = peak_rss_mb()
    report.peak_gpu_mb = peak_gpu_mb()
    return report


def needs_calibration(recipe) -> bool:
    """Whether some stage of ``recipe`` gathers statistics from calibration data."""
    return any(METHODS[s.method].needs or METHODS[s.method].scope != "module" for s in _as_recipe(recipe).stages)  # = Plan.needs_data


def validate(model: nn.Module, recipe: Recipe) -> Plan:
    """Check a recipe against a model before touching any weight (empty targets, group
    sizes, statistics outside the blocks, finite weights); returns the plan that
    :func:`compress` executes (:func:`llmpress.calib.plan.build_plan`)."""
    plan = build_plan(model, _as_recipe(recipe))
    check_finite(model)
    return plan


def _record_summary(r: ModuleRecord) -> dict:
    return {
        "methods": r.methods,
        "shape": [r.out_features, r.in_features],
        "weights": r.weight_args.describe() if r.weight_args else None,
        "weight_args": r.weight_args.to_dict() if r.weight_args else None,
        "activations": r.act_args.describe() if r.act_args else None,
        "bits_per_weight": round(r.bits_per_weight(), 4),
        "sparsity": r.sparsity,
        **r.notes,
    }


def _prepare_out(out: str | None, overwrite: bool) -> Path | None:
    """The output folder, refused now if it could not be written at the end (see :mod:`llmpress.io_safety`)."""
    if out is None:
        return None
    return io_safety.check_out(out, overwrite)


def run_pipeline(
    model_spec: str,
    recipe,
    *,
    out: str | None = None,
    json_path: str | None = None,
    calib: CalibConfig = CalibConfig(),
    evaluation: EvalConfig | None = EvalConfig(),
    device: str = "cpu",
    overwrite: bool = False,
    engine: EngineOptions | None = None,
    save_format: str = "packed",
    resume: bool = False,
    stream: bool = False,
    tasks: TaskConfig | None = None,
) -> Report:
    """Load, evaluate the baseline, compress, evaluate again, save: what `llmpress compress` does.

    Everything checkable is checked before the model loads (recipe, settings, output
    folder, text files) or right after, before the baseline evaluation (the recipe
    against the model, finite weights, enough tokens for the windows). The output
    folder is locked for the whole run (:mod:`llmpress.io_safety`). With ``out``, each
    finished block is kept beside it (``.NAME.resume``, removed once the checkpoint is
    saved) and ``resume`` continues a killed run after its last finished block
    (:mod:`llmpress.calib.resume`). ``stream``: the model is never whole in memory; its
    blocks are read, compressed and written one at a time (:mod:`llmpress.streamed`).
    ``tasks``: downstream tasks scored before and after (:mod:`llmpress.eval.tasks`).
    """
    if save_format not in SAVE_FORMATS:
        raise UserError(f"save format {save_format!r} unknown; expected one of {', '.join(SAVE_FORMATS)}")
    recipe = _as_recipe(recipe)  # validate before any heavy work
    if out is not None:
        from .export.runtime_state import check_save_format

        check_save_format(recipe, save_format)
    if stream:
        check_streamable(recipe, dist.current().world)
    dist.check_ranks(recipe, dist.current().world)
    out_path = _prepare_out(out, overwrite)
    engine = _with_checkpoints(engine or EngineOptions(batch_size=calib.batch_size), recipe, out_path, resume)
    io_safety.check_file_out(json_path)
    io_safety.check_work_folder(engine.offload_dir if engine else None)
    # a missing or empty text file fails now, even if unused
    data_mod.check_sources([s for s, _ in calib.mix] + list(evaluation.sources if evaluation is not None else ()))
    check_run(tasks, stream=stream, ranks=dist.current().world)  # an unknown task or a bad task file fails now
    first = dist.current().rank == 0  # with several ranks (torchrun) only the first one writes
    with io_safety.OutputLock(out=out_path) if out_path is not None and first else contextlib.nullcontext():
        if stream:
            return _stream_pipeline(model_spec, recipe, out_path=out_path, json_path=json_path, calib=calib, evaluation=evaluation,
                                    device=device, overwrite=overwrite, engine=engine, save_format=save_format)  # fmt: skip
        return _pipeline(
            model_spec, recipe, out_path=out_path, json_path=json_path, calib=calib, evaluation=evaluation,
            device=device, overwrite=overwrite, engine=engine, save_format=save_format, tasks=tasks,
        )  # fmt: skip


def _with_checkpoints(engine: EngineOptions, recipe: Recipe, out_path: Path | None, resume: bool) -> EngineOptions:
    """Block checkpoints beside ``out`` when the recipe allows them (refused with ``resume``
    when it does not, or without ``out``)."""
    from .calib.resume import check_resumable

    if resume and out_path is None:
        raise UserError("--resume needs --out: the finished blocks are kept beside the output folder")
    try:
        check_resumable(recipe, dist.current().world)
    except UserError:
        if resume:
            raise
        return engine
    if out_path is None:
        return engine
    return dataclasses.replace(engine, checkpoint_dir=str(io_safety.resume_path(out_path)), resume=resume)


def _pipeline(
    model_spec: str, recipe: Recipe, *, out_path: Path | None, json_path: str | None, calib: CalibConfig,
    evaluation: EvalConfig | None, device: str, overwrite: bool, engine: EngineOptions | None, save_format: str, tasks: TaskConfig | None,
) -> Report:  # fmt: skip
    group = dist.current()  # data-parallel ranks (torchrun): windows shared out, only rank 0 writes
    measure = functools.partial(perplexity, group=group)
    progress = engine.progress if engine else True
    seconds: dict[str, float] = {}
    phases = PhaseTracker()  # peak RSS per phase; everything before this line is "startup"
    phases.start("load")
    t = time.perf_counter()
    model, tok = models.load(model_spec, device=device)
    plan = validate(model, recipe)  # group sizes, empty targets, finite weights: fail before the baseline evaluation
    seconds["load"] = time.perf_counter() - t
    calib_data = None
    if plan.needs_data:  # too little text fails now, not after the baseline evaluation
        t = time.perf_counter()
        calib_data = calibration_windows(tok, model, calib)
        seconds["calibration_data"] = time.perf_counter() - t
    baseline: dict = model_size(model)
    windows = reference = None
    record = baseline_record(evaluation, engine.offload_dir if engine else None)  # None without evaluation or KL
    if evaluation is not None:
        phases.start("eval_data")
        t = time.perf_counter()
        windows = SourceWindows(lambda s: evaluation_windows(tok, model, evaluation, s), evaluation.sources)
        shapes = windows.shapes()  # too little text in any source fails before the baseline evaluation
        seconds["eval_data"] = time.perf_counter() - t
        phases.start("baseline_eval")
        t = time.perf_counter()
        set_ppl(baseline, windows.perplexities(model, batch_size=evaluation.batch_size, progress=progress, desc="baseline ppl", measure=measure,
                                               kl=record.recorder if record else None))  # fmt: skip
        seconds["baseline_eval"] = time.perf_counter() - t
        calib_sources = tuple(s for s, _ in calib.mix)
        if wanted_reference(recipe, windows.sources, calib_sources):  # the data-free counterpart, while the weights are the original ones
            phases.start("reference_eval")
            t = time.perf_counter()
            reference = measure_reference(model, recipe, windows, calib_sources=calib_sources, batch_size=evaluation.batch_size,
                                          progress=progress, blocks=get_arch(model).blocks, measure=measure)  # fmt: skip
            seconds["reference_eval"] = time.perf_counter() - t
    score_tasks(model, tok, tasks, phase="baseline_tasks", phases=phases, seconds=seconds, figures=baseline, show_progress=progress)
    _generations(model, tok, evaluation, baseline, phases=phases, seconds=seconds, phase="baseline_generate")
    phases.start("compress")
    report = _compress(model, plan, calib_data, tokenizer=tok, calib=calib, engine=engine)
    report.model = model_spec
    report.baseline = baseline
    report.seconds = {**seconds, **report.seconds}
    if windows is not None:
        phases.start("compressed_eval")
        t = time.perf_counter()
        by_source = windows.perplexities(model, batch_size=evaluation.batch_size, progress=progress, desc="compressed ppl", measure=measure,
                                         kl=record.comparer if record else None)  # fmt: skip
        set_ppl(report.compressed, by_source)
        report.seconds["compressed_eval"] = time.perf_counter() - t
        report.evaluation = evaluation_record(asdict(evaluation), shapes)
        if record is not None:
            set_kl(report, record.stats)
            record.close()
        report.reference = reference
        check_transfer(report, tuple(src for src, _ in calib.mix))
    score_tasks(model, tok, tasks, phase="compressed_tasks", phases=phases, seconds=report.seconds, figures=report.compressed, show_progress=progress)
    _generations(model, tok, evaluation, report.compressed, phases=phases, seconds=report.seconds, phase="compressed_generate", before=baseline)
    report.evaluation.update(tasks_record(tasks))
    report.environment = environment(device)
    if out_path is not None and group.rank == 0:
        phases.start("save")
        t = time.perf_counter()
        save(model, tok, out_path, report=report, overwrite=overwrite, format=save_format)
        report.seconds["save"] = time.perf_counter() - t
        if engine is not None and engine.checkpoint_dir:  # saved: the finished blocks are no longer needed
            shutil.rmtree(engine.checkpoint_dir, ignore_errors=True)
        report.compressed["checkpoint_bytes"] = checkpoint_bytes(out_path)
    phases.stop()
    report.set_memory(phases)
    report.peak_gpu_mb = peak_gpu_mb()
    if json_path and group.rank == 0:
        report.write_json(json_path)
    group.barrier()  # the other ranks leave once the checkpoint is written
    return report


def _generations(model, tok, evaluation: EvalConfig | None, figures: dict, *, phases, seconds: dict, phase: str, before: dict | None = None) -> None:
    """Greedy continuations of the fixed prompts into ``figures["generations"]`` (and, after
    compression, their agreement with ``before``'s); nothing without evaluation or with 0 tokens."""
    if evaluation is None or not evaluation.generate_tokens:
        return
    phases.start(phase)
    t = time.perf_counter()
    figures["generations"] = greedy_continuations(model, tok, new_tokens=evaluation.generate_tokens, bos=bos_for(tok, model))
    if before is not None and "generations" in before:
        figures["generation_agreement"] = agreement(before["generations"], figures["generations"])
    seconds[phase] = time.perf_counter() - t


def _stream_pipeline(
    model_spec: str, recipe: Recipe, *, out_path: Path | None, json_path: str | None, calib: CalibConfig,
    evaluation: EvalConfig | None, device: str, overwrite: bool, engine: EngineOptions, save_format: str,
) -> Report:  # fmt: skip
    """:func:`run_pipeline` with the blocks streamed from the model's safetensors files
    (:mod:`llmpress.streamed`): baseline and compressed perplexity in the same pass."""
    from .export.sharded import ShardedWriter  # the checkpoint writers load when a run saves (not on import)

    phases = PhaseTracker()
    phases.start("load")
    t = time.perf_counter()
    where, local = models.resolve(model_spec)
    if not local:
        raise UserError(f"--stream reads the safetensors files of a local folder; {model_spec!r} is not one (download it first)")
    sm = StreamedModel(where, device=device)
    model, tok = sm.model, models.load_tokenizer(sm.folder)
    plan = validate(model, recipe)
    seconds = {"load": time.perf_counter() - t}
    calib_data = calibration_windows(tok, model, calib) if plan.needs_data else None
    evals = shapes = None
    work = tempfile.TemporaryDirectory(prefix="llmpress-eval-", dir=engine.offload_dir)  # evaluation activations on disk
    if evaluation is not None:
        phases.start("eval_data")
        by_source = {s: evaluation_windows(tok, model, evaluation, s) for s in evaluation.sources}
        shapes = {s: tuple(int(d) for d in w.shape) for s, w in by_source.items()}
        evals = EvalStreams(model, sm.spec, by_source, batch_size=evaluation.batch_size, folder=Path(work.name),
                            kl=baseline_record(evaluation, work.name))  # fmt: skip
    phases.start("compress")
    with work, io_safety.atomic_folder(out_path, overwrite=overwrite) if out_path else contextlib.nullcontext() as tmp:
        writer = ShardedWriter(tmp, save_format, len(sm.layers) + 1) if tmp is not None else None
        io = StreamIO(sm, writer=writer, evals=evals)
        report = _compress(model, plan, calib_data, tokenizer=tok, calib=calib, engine=dataclasses.replace(engine, blocks=io))
        report.model, report.baseline = model_spec, model_size(model)
        report.seconds = {**seconds, **report.seconds, **io.seconds}
        if evals is not None:
            set_ppl(report.baseline, evals.baseline)
            set_ppl(report.compressed, evals.compressed())
            report.evaluation = evaluation_record(asdict(evaluation), shapes)
            if evals.kl is not None:
                set_kl(report, evals.kl.stats)
            check_transfer(report, tuple(src for src, _ in calib.mix))
        report.environment = {**environment(device), "streamed": True, "max_blocks_in_memory": sm.max_loaded,
                              "block_seconds": [round(x, 3) for x in io.block_seconds]}  # fmt: skip
        if writer is not None:
            phases.start("save")
            writer.finish(model, tok, report.result.records, sm.spec.blocks, {"report": report.to_dict()})
    if out_path is not None:
        if engine.checkpoint_dir:  # saved: the finished blocks are no longer needed
            shutil.rmtree(engine.checkpoint_dir, ignore_errors=True)
        report.compressed["checkpoint_bytes"] = checkpoint_bytes(out_path)
    phases.stop()
    report.set_memory(phases)
    if json_path:
        report.write_json(json_path)
    return report
