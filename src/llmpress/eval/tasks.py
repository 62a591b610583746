"""Downstream tasks through lm-evaluation-harness, on the model in memory.

``--tasks`` names tasks three ways, comma-separated: a task shipped with llmpress
(:mod:`llmpress.eval.task_files`: built from the packaged text, offline), a task YAML file
of the user's (lm-eval's format; a local ``dataset_path: json`` with
``dataset_kwargs: {data_files: ...}`` runs offline), or a task lm-eval itself ships
(its dataset comes from the Hugging Face hub or its cache). The model is handed to lm-eval's
HF adapter as the object it is (``HFLM(pretrained=model, tokenizer=...)``), so a compressed
model is scored as compressed, before anything is saved. lm-eval is an optional
dependency (``pip install 'llmpress[tasks]'``), imported only when tasks are asked for.

:func:`check_tasks` loads every task (documents included) before any model is loaded, so
an unknown name or a bad task file fails first, with one line; :func:`run_tasks` scores a
model and returns ``{task: {metric: value, metric_stderr: value, "samples": n}}``.
The test shrink's window cap (``LLMPRESS_TEST_WINDOWS``) also caps documents per task.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .. import progress, shrink
from ..arch import get_arch
from ..errors import UserError
from .task_files import LASTWORD_TASKS, write_task

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'llmpress[tasks]'"
HUB_HINT = " (its dataset comes from the Hugging Face hub: offline, point --tasks at a task file with local data)"
FEWSHOT_SEED = 1234  # lm-eval's default seed of the few-shot draw
CHUNK = 64  # requests per call to the adapter (one progress step)
BOOTSTRAP_ITERS = 1000  # draws for the standard error of aggregates without a closed form (perplexity)


@dataclass(kw_only=True, frozen=True)
class TaskConfig:
    names: tuple[str, ...]  # shipped task names, task YAML paths, lm-eval task names
    limit: int | None = None  # documents per task (None: all)
    batch_size: int = 8

    def __post_init__(self):
        if not self.names or any(not isinstance(n, str) or not n.strip() for n in self.names):
            raise UserError(f"tasks (--tasks) must be a comma-separated list of task names or task files, got {','.join(self.names)!r}")
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1):
            raise UserError(f"documents per task (--tasks-limit) must be an integer of at least 1, got {self.limit!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise UserError(f"task batch size must be an integer of at least 1, got {self.batch_size!r}")


def parse_tasks(text: str) -> tuple[str, ...]:
    """The items of a ``--tasks`` value, in order, each once."""
    return tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))


def _harness():
    """lm-eval's pieces used here, imported on first use; a clear error without the extra."""
    try:
        from lm_eval.evaluator import evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise UserError(f"--tasks needs lm-evaluation-harness, which is not installed ({e}): {INSTALL_HINT}") from None
    return evaluate, HFLM, TaskManager


def _kind(name: str) -> str:
    """``shipped``, ``file`` (a task YAML path) or ``harness`` (a name for lm-eval's own index)."""
    if name in LASTWORD_TASKS:
        return "shipped"
    if name.lower().endswith((".yaml", ".yml")) or os.sep in name or "/" in name:
        p = Path(name).expanduser()
        if not p.is_file():
            raise UserError(f"task file {name!r} not found")
        return "file"
    return "harness"


def load_tasks(cfg: TaskConfig, folder: Path) -> dict:
    """lm-eval's task dictionary (``TaskManager.load``) of ``cfg.names``; the shipped tasks'
    files are written into ``folder``. Anything that does not load is a :class:`UserError`."""
    _, _, TaskManager = _harness()
    kinds = {n: _kind(n) for n in cfg.names}
    for n in cfg.names:
        if kinds[n] == "shipped":
            write_task(n, folder)
    # lm-eval's own index (thousands of files, seconds to read) only when a name may be in it
    manager = TaskManager(include_path=str(folder), include_defaults="harness" in kinds.values())
    loaded: dict = {"tasks": {}, "groups": {}, "group_map": {}}
    for n in cfg.names:
        spec = str(Path(n).expanduser().resolve()) if kinds[n] == "file" else n
        if kinds[n] == "harness" and spec not in manager.all_tasks:
            raise UserError(
                f"unknown task {n!r}: not a task shipped with llmpress ({', '.join(LASTWORD_TASKS)}), "
                "a task YAML file, or an lm-evaluation-harness task"
            )
        try:
            with _quiet():
                one = manager.load([spec])
        except UserError:
            raise
        except Exception as e:  # lm-eval and datasets raise many types for a bad file or an unreachable dataset
            what = f"task file {n!r}" if kinds[n] == "file" else f"task {n!r}"
            raise UserError(f"{what} does not load: {type(e).__name__}: {_one_line(e)}{HUB_HINT if kinds[n] == 'harness' else ''}") from None
        for key in loaded:
            loaded[key].update(one.get(key) or {})
    return loaded


def check_tasks(cfg: TaskConfig) -> None:
    """Load every task of ``cfg`` once (documents included), before any model is loaded."""
    with tempfile.TemporaryDirectory(prefix="llmpress-tasks-") as d:
        load_tasks(cfg, Path(d))


def run_tasks(model, tokenizer, cfg: TaskConfig, *, bos: bool = False, desc: str = "tasks") -> dict[str, dict]:
    """Score ``model`` (in memory, as it is) on the tasks of ``cfg`` through lm-eval's HF
    adapter. ``bos``: prepend the BOS token (models that need it, such as Gemma); ``desc``:
    the progress bar's label (bars follow :func:`llmpress.progress.scope`).
    Returns ``{task or group: {metric: value, metric_stderr: value, "samples": n}}``."""
    evaluate, HFLM, _ = _harness()
    console = sys.stderr
    with tempfile.TemporaryDirectory(prefix="llmpress-tasks-") as d, _quiet():
        loaded = load_tasks(cfg, Path(d))
        for task in loaded["tasks"].values():
            if task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=FEWSHOT_SEED)
        # a copy: the adapter may give the tokenizer a padding token, and the caller may save this one
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=cfg.batch_size, add_bos_token=True if bos else None)
        _with_bar(lm, desc, console)
        out = evaluate(lm=lm, task_dict=loaded, limit=shrink.cap_windows(cfg.limit), bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False)
    return summarize(out)


def summarize(out: dict) -> dict[str, dict]:
    """The figures of lm-eval's results: metric names without the ``,none`` filter suffix
    (another filter keeps it), standard errors as ``METRIC_stderr`` (None where lm-eval has
    none), and the number of documents scored."""
    table: dict[str, dict] = {}
    samples = out.get("n-samples") or {}
    for name, res in (out.get("results") or {}).items():
        row: dict = {}
        for key, value in res.items():
            if "," not in key:
                continue  # name, alias, sample_len
            metric, filt = key.split(",", 1)
            row[metric if filt == "none" else key] = value if isinstance(value, (int, float)) else None  # "N/A": None
        n = (samples.get(name) or {}).get("effective")
        if n is not None:
            row["samples"] = int(n)
        table[name] = row
    return table


@contextlib.contextmanager
def _quiet():
    """lm-eval on llmpress's console: its log lines only with ``-v``, its prints and bars
    (datasets', the bootstrap's) kept and logged at INFO, no worker pools. The model's
    scoring shows llmpress's own bar (:func:`_with_bar`)."""
    lm_log = logging.getLogger("lm_eval")
    level = lm_log.level
    if logging.getLogger().getEffectiveLevel() > logging.INFO:
        lm_log.setLevel(logging.ERROR)
    saved = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"  # the bootstrap in this process, not a pool of cpu_count() workers
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            yield
    finally:
        lm_log.setLevel(level)
        if saved is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = saved
        if buf.getvalue().strip():
            log.info("lm-eval said: %s", buf.getvalue().strip()[-4000:])


def _with_bar(lm, desc: str, stderr) -> None:
    """Route ``lm``'s request methods through llmpress's progress bar (on ``stderr``, the
    console's; lm-eval's own bar off), :data:`CHUNK` requests per step."""
    for method in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        setattr(lm, method, _chunked(getattr(lm, method), f"{desc} ({method})", stderr))


def _chunked(score, label: str, stderr):
    """``score`` (an adapter's request method) called on consecutive chunks of the requests,
    one progress step each; the results come back in request order, as ``score`` returns them."""

    def call(requests, disable_tqdm: bool = False):
        out: list = []
        with contextlib.redirect_stderr(stderr), progress.bar(len(requests), label, unit="request") as b:
            for i in range(0, len(requests), CHUNK):
                chunk = requests[i : i + CHUNK]
                out.extend(score(chunk, disable_tqdm=True))
                b.update(len(chunk))
        return out

    return call


def _one_line(e: Exception) -> str:
    return "; ".join(ln.strip() for ln in str(e).splitlines() if ln.strip())[:500]


def check_run(cfg: TaskConfig | None, *, stream: bool = False, ranks: int = 1) -> None:
    """Refuse what cannot score tasks (a streamed model, several ranks), then :func:`check_tasks`
    (nothing to check without tasks)."""
    if cfg is None:
        return
    if stream:
        raise UserError("--tasks scores the model in memory through lm-evaluation-harness; not with --stream")
    if ranks > 1:
        raise UserError("--tasks runs in one process; not with several ranks (--nproc / torchrun)")
    check_tasks(cfg)


def score_tasks(model, tokenizer, cfg: TaskConfig | None, *, phase: str, phases, seconds: dict, figures: dict, show_progress: bool = True) -> None:
    """Score ``model`` on the tasks of ``cfg`` (nothing without tasks) as step ``phase``: the
    figures (:func:`run_tasks`) go to ``figures["tasks"]``, the wall time to ``seconds[phase]``,
    the memory to ``phases`` (a :class:`llmpress.eval.memory.PhaseTracker`). The BOS token is
    prepended when the model's architecture needs it (:attr:`llmpress.arch.ArchSpec.needs_bos`)."""
    if cfg is None:
        return
    try:
        bos = get_arch(model).needs_bos
    except UserError:
        bos = False
    phases.start(phase)
    t = time.perf_counter()
    with progress.scope(show_progress):
        figures["tasks"] = run_tasks(model, tokenizer, cfg, bos=bos, desc=phase.replace("_", " "))
    seconds[phase] = time.perf_counter() - t


def record(cfg: TaskConfig | None) -> dict:
    """``{"tasks": settings}`` for a report's ``evaluation`` (empty without tasks)."""
    if cfg is None:
        return {}
    from importlib.metadata import version

    return {"tasks": {"names": list(cfg.names), "limit": shrink.cap_windows(cfg.limit), "batch_size": cfg.batch_size, "lm_eval": version("lm_eval")}}
