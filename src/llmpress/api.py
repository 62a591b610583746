"""The one entry point: ``compress(model, recipe, data) -> Report``, and the full pipeline."""
from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn

from . import data as data_mod
from . import models
from .arch import get_arch, get_module, set_module
from .calib.engine import EngineOptions, plan, run as run_engine
from .errors import UserError
from .eval.memory import PhaseTracker, peak_gpu_mb, peak_rss_mb
from .eval.perplexity import perplexity
from .eval.size import model_size
from .recipe import Recipe, Stage, load_recipe
from .registry import METHODS, ModuleRecord, get_method
from .report import Report, checkpoint_bytes, normalize_permissions, write_atomic
from .runtime.act_quant import ActQuantLinear
from .quant.args import QuantArgs

log = logging.getLogger(__name__)
META_FILE = "llmpress.json"


@dataclass(kw_only=True, frozen=True)
class CalibConfig:
    source: str = "wiki"  # "wiki", "news", or a text/JSONL file path
    n_samples: int = 128
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 8


@dataclass(kw_only=True, frozen=True)
class EvalConfig:
    source: str = "wiki"
    seqlen: int = 512
    max_windows: int | None = 64
    batch_size: int = 1  # windows per forward: 4 was ~10% faster on CPU (2: ~6%) and ~65 MB more peak RSS on SmolLM2


def _bos(tokenizer, model) -> int | None:
    try:
        needs = get_arch(model).needs_bos
    except UserError:
        needs = False
    return tokenizer.bos_token_id if needs else None


def calibration_windows(tokenizer, model, cfg: CalibConfig = CalibConfig()) -> torch.Tensor:
    stream = data_mod.token_stream(cfg.source, "calib", tokenizer)
    return data_mod.calib_windows(stream, cfg.n_samples, cfg.seqlen, cfg.seed, _bos(tokenizer, model))


def evaluation_windows(tokenizer, model, cfg: EvalConfig = EvalConfig()) -> torch.Tensor:
    stream = data_mod.token_stream(cfg.source, "test", tokenizer)
    return data_mod.eval_windows(stream, cfg.seqlen, cfg.max_windows, _bos(tokenizer, model))


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
    recipe = _as_recipe(recipe)
    spec = get_arch(model)
    validate(model, recipe)
    engine = engine or EngineOptions(batch_size=calib.batch_size)
    seconds: dict[str, float] = {}
    needs_data = any(METHODS[s.method].needs or METHODS[s.method].scope != "module" for s in recipe.stages)
    calib_info = {}
    if needs_data and data is None:
        if tokenizer is None:
            raise UserError("this recipe needs calibration data: pass `data` (token windows) or `tokenizer`")
        t = time.perf_counter()
        data = calibration_windows(tokenizer, model, calib)
        seconds["calibration_data"] = time.perf_counter() - t
    if data is not None:
        calib_info = {**asdict(calib), "windows": int(data.shape[0]), "seqlen": int(data.shape[1])}
    t0 = time.perf_counter()
    for i, st in enumerate(recipe.stages):  # model-wide transforms first, in recipe order
        m = METHODS[st.method]
        if m.scope == "model":
            t = time.perf_counter()
            m.apply(model, spec, data, st)
            seconds[f"stage{i}:{st.method}"] = time.perf_counter() - t
    try:
        result = run_engine(model, spec, recipe, data, engine)
    finally:
        from .prune.owl import ATTR as _owl_attr

        for mod in model.modules():  # per-module sparsity offsets live for one compress() only
            if hasattr(mod, _owl_attr):
                delattr(mod, _owl_attr)
    seconds.update(result.seconds)
    seconds["compress_total"] = time.perf_counter() - t0
    report = Report(
        model=getattr(model, "llmpress_source", getattr(model.config, "_name_or_path", "?")),
        recipe=recipe.to_dict(),
        compressed=model_size(model, result.records),
        seconds=seconds,
        calibration=calib_info,
        layers={n: _record_summary(r) for n, r in result.records.items()},
    )
    model.llmpress_records = result.records  # type: ignore[attr-defined]
    report.peak_rss_mb = peak_rss_mb()
    report.peak_gpu_mb = peak_gpu_mb()
    return report


def validate(model: nn.Module, recipe: Recipe) -> None:
    """Check a recipe against a model before touching any weight (group sizes, empty targets)."""
    spec = get_arch(model)
    targets = plan(model, spec, recipe)
    for i, st in enumerate(recipe.stages):
        if METHODS[st.method].scope != "model" and not any(
            st.matches(n, n.startswith(spec.blocks + ".")) for n, m in model.named_modules() if isinstance(m, nn.Linear)
        ):
            raise UserError(f"recipe stage {i} ({st.method}) matches no linear layer: targets {list(st.targets)}, ignore {list(st.ignore)}")
    for name, sts in targets.items():
        mod = get_module(model, name)
        for _, st in sts:
            for f in fields(st.config):
                qa = getattr(st.config, f.name)
                if isinstance(qa, QuantArgs) and qa.granularity == "group" and mod.in_features % qa.group_size:
                    raise UserError(
                        f"layer {name}: {f.name} group_size {qa.group_size} does not divide the input dimension {mod.in_features}"
                    )


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


def _environment(device) -> dict:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }


def _prepare_out(out: str | None, overwrite: bool) -> Path | None:
    if out is None:
        return None
    p = Path(out).expanduser()
    if p.exists() and not overwrite:
        raise UserError(f"output folder {str(p)!r} exists; pass --overwrite to replace it")
    if p.exists() and not p.is_dir():
        raise UserError(f"output path {str(p)!r} exists and is not a folder")
    return p


SAVE_FORMATS = ("packed", "hf-fakequant")


def save(model: nn.Module, tokenizer, out: Path, *, report: Report | None = None, overwrite: bool = False, format: str = "packed") -> Path:
    """Save the compressed model.

    ``format="packed"`` (default): the packed checkpoint of :mod:`llmpress.export.packed`
    (low-bit codes, scales, zero points, masks; :func:`load_compressed` rebuilds it with
    runtime modules). ``"hf-fakequant"``: an HF safetensors folder of the dequantized
    weights + llmpress.json (loads in plain transformers, full size).
    Written into a temporary sibling folder and renamed at the end: an interrupted save
    leaves nothing at ``out``.
    """
    if format not in SAVE_FORMATS:
        raise UserError(f"save format {format!r} unknown; expected one of {', '.join(SAVE_FORMATS)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, ActQuantLinear)]
    try:
        if format == "packed":
            from .export.packed import write_packed

            records = getattr(model, "llmpress_records", None) or {}
            write_packed(model, tokenizer, tmp, records, {"report": report.to_dict() if report else None})
        else:
            for n, m in wrapped:  # plain Linear names on disk, so transformers loads the folder
                set_module(model, n, m.linear)
            model.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            meta = {
                "format": "llmpress-fakequant-v1",
                "activation_quant": {n: m.args.to_dict() for n, m in wrapped},
                "report": report.to_dict() if report else None,
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=repr))
        normalize_permissions(tmp)  # mkdtemp and safetensors make private files; outputs are ordinary
        if out.exists():
            if not overwrite:
                raise UserError(f"output folder {str(out)!r} exists; pass --overwrite to replace it")
            trash = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for n, m in wrapped:
            set_module(model, n, m)
    return out


def load_compressed(path: str, device: str = "cpu", backend: str = "auto", dtype: torch.dtype | None = None):
    """Load a folder written by :func:`save`, or any model :func:`llmpress.models.load` takes.

    Packed checkpoints are rebuilt with runtime modules: ``backend="auto"`` uses the CPU
    low-bit kernels where they apply, ``"dequant"`` the exact dequantize-then-matmul
    fallback (outputs equal the fake-quantized model's). ``hf-fakequant`` folders get
    their dynamic activation quantization back.
    """
    from .export.packed import FORMAT, load_packed, read_manifest

    if Path(path).is_dir() and (read_manifest(path) or {}).get("format") == FORMAT:
        return load_packed(path, device=device, dtype=dtype, backend=backend)
    model, tok = models.load(path, device=device, **({"dtype": dtype} if dtype else {}))
    meta_path = Path(path) / META_FILE
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        for n, a in (meta.get("activation_quant") or {}).items():
            set_module(model, n, ActQuantLinear(get_module(model, n), QuantArgs.from_dict(a)))
    return model, tok


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
) -> Report:
    """Load, evaluate the baseline, compress, evaluate again, save: what `llmpress compress` does."""
    if save_format not in SAVE_FORMATS:
        raise UserError(f"save format {save_format!r} unknown; expected one of {', '.join(SAVE_FORMATS)}")
    recipe = _as_recipe(recipe)  # validate before any heavy work
    out_path = _prepare_out(out, overwrite)
    for source in (calib.source, evaluation.source if evaluation is not None else "wiki"):
        if source not in ("wiki", "news"):  # a missing or empty text file fails now, even if unused
            data_mod.read_text_file(source)
    progress = engine.progress if engine else True
    seconds: dict[str, float] = {}
    phases = PhaseTracker()  # peak RSS per phase; everything before this line is "startup"
    phases.start("load")
    t = time.perf_counter()
    model, tok = models.load(model_spec, device=device)
    validate(model, recipe)  # group sizes, empty targets: fail before the baseline evaluation
    seconds["load"] = time.perf_counter() - t
    baseline: dict = model_size(model)
    windows = None
    if evaluation is not None:
        phases.start("eval_data")
        t = time.perf_counter()
        windows = evaluation_windows(tok, model, evaluation)
        seconds["eval_data"] = time.perf_counter() - t
        phases.start("baseline_eval")
        t = time.perf_counter()
        baseline["ppl"] = perplexity(model, windows, evaluation.batch_size, progress, "baseline ppl")
        seconds["baseline_eval"] = time.perf_counter() - t
    phases.start("compress")
    report = compress(model, recipe, tokenizer=tok, calib=calib, engine=engine)
    report.model = model_spec
    report.baseline = baseline
    report.seconds = {**seconds, **report.seconds}
    if windows is not None:
        phases.start("compressed_eval")
        t = time.perf_counter()
        report.compressed["ppl"] = perplexity(model, windows, evaluation.batch_size, progress, "compressed ppl")
        report.seconds["compressed_eval"] = time.perf_counter() - t
        report.evaluation = {**asdict(evaluation), "windows": int(windows.shape[0]), "tokens_scored": int(windows.shape[0] * (windows.shape[1] - 1))}
    report.environment = _environment(device)
    if out_path is not None:
        phases.start("save")
        t = time.perf_counter()
        save(model, tok, out_path, report=report, overwrite=overwrite, format=save_format)
        report.seconds["save"] = time.perf_counter() - t
        report.compressed["checkpoint_bytes"] = checkpoint_bytes(out_path)
    phases.stop()
    report.set_memory(phases)
    report.peak_gpu_mb = peak_gpu_mb()
    if json_path:
        report.write_json(json_path)
    return report


def evaluate(model_spec: str, evaluation: EvalConfig = EvalConfig(), *, device: str = "cpu", progress: bool = True) -> Report:
    """Perplexity, size and bits of a model or a folder saved by llmpress."""
    phases = PhaseTracker()
    phases.start("load")
    t = time.perf_counter()
    model, tok = load_compressed(model_spec, device)
    seconds = {"load": time.perf_counter() - t}
    phases.start("eval_data")
    windows = evaluation_windows(tok, model, evaluation)
    phases.start("eval")
    t = time.perf_counter()
    from .export.packed import packed_model_size

    size = packed_model_size(model) or model_size(model, _saved_records(model_spec))
    size["ppl"] = perplexity(model, windows, evaluation.batch_size, progress, "ppl")
    seconds["eval"] = time.perf_counter() - t
    rep = Report(model=model_spec, recipe={}, compressed=size, seconds=seconds)
    rep.evaluation = {**asdict(evaluation), "windows": int(windows.shape[0])}
    rep.environment = _environment(device)
    phases.stop()
    rep.set_memory(phases)
    return rep


def _saved_records(path: str) -> dict[str, ModuleRecord]:
    """Bits accounting of a saved folder, rebuilt from its report's per-layer summary."""
    meta = Path(path) / META_FILE
    if not meta.exists():
        return {}
    rep = (json.loads(meta.read_text()).get("report") or {})
    out = {}
    for name, info in (rep.get("layers") or {}).items():
        r = ModuleRecord(name=name, out_features=info["shape"][0], in_features=info["shape"][1])
        if info.get("weight_args"):
            r.weight_args = QuantArgs.from_dict(info["weight_args"])
        out[name] = r
    return out
