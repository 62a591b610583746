"""Command line: `llmpress compress|eval|recipes`. The CLI owns the console."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from . import bitplan, progress
from .analysis import cli as analysis_cli
from .errors import UserError


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda (same code path)")
    p.add_argument("--eval-windows", type=_windows, default=64, help="test windows for perplexity (an integer or 'all'; default 64)")
    p.add_argument("--seqlen", type=_at_least(2), default=512, help="tokens per window (default 512; 2048 selectable)")
    p.add_argument(
        "--eval-data",
        default="wiki",
        help="perplexity text: wiki, news, code (packaged) or a .txt/.jsonl path; several comma-separated (wiki,news,code): one perplexity each (default: wiki)",
    )
    p.add_argument(
        "--tasks",
        help="downstream tasks through lm-evaluation-harness (pip install 'llmpress[tasks]'), comma-separated: "
        "llmpress_wiki_lastword, llmpress_news_lastword (shipped, offline), task YAML files, or lm-eval task names",
    )
    p.add_argument("--tasks-limit", type=_at_least(1), help="with --tasks: at most this many documents per task (default: all)")
    p.add_argument(
        "--kl-windows",
        type=_at_least(0),
        default=8,
        help="of each source's test windows, the first N also scored for KL divergence and top-1 agreement with the baseline "
        "(its log-probabilities wait on disk: N x seqlen x vocab x 2 bytes; 0: off; default 8)",
    )
    p.add_argument(
        "--generate-tokens",
        type=_at_least(0),
        default=24,
        help="compress: greedy tokens after each of a few fixed prompts, before and after compression, in the report (0: off; default 24)",
    )
    p.add_argument("--json", dest="json_path", help="write the report as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or progress lines (errors and warnings still print)")
    p.add_argument("-v", "--verbose", action="store_true", help="log what each step does (INFO level)")


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (no usage block), like every other llmpress error."""

    def error(self, message: str):
        self.exit(2, f"llmpress: error: {message} (see `{self.prog} --help`)\n")


def _at_least(low: int):
    """An argparse type: an integer of at least ``low``."""

    def parse(v: str) -> int:
        try:
            n = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {v!r}") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {n}")
        return n

    parse.__name__ = f"integer >= {low}"
    return parse


def _windows(v: str):
    if v == "all":
        return None
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'all', got {v!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def _version() -> str:
    """The installed distribution's version (what pip reports), else the package's own."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llmpress")
    except PackageNotFoundError:  # running from a source tree that was never installed
        from . import __version__

        return __version__


def recipes_table(rows: list[tuple[str, str]], line_width: int | None = None) -> str:
    """Preset names in a column as wide as the longest name, then the descriptions;
    with ``line_width`` (a terminal's) a long description wraps under its own column."""
    import textwrap

    width = max((len(name) for name, _ in rows), default=0)
    out = []
    for name, desc in rows:
        if line_width and line_width - width - 2 >= 30:
            lines = textwrap.wrap(desc, line_width - width - 2) or [""]
            out.append(f"{name:<{width}}  {lines[0]}".rstrip())
            out += [" " * (width + 2) + ln for ln in lines[1:]]
        else:
            out.append(f"{name:<{width}}  {desc}".rstrip())
    return "\n".join(out)


def _add_calib(p: argparse.ArgumentParser, default: str | None) -> None:
    """The calibration-data arguments (`compress`, `plan-bits`)."""
    p.add_argument(
        "--calib-data",
        default=default,
        help="calibration text: wiki, news, code (packaged) or a .txt/.jsonl path, or a mix: wiki,news (equal shares) or wiki:0.75,news:0.25 (default: wiki)",
    )
    p.add_argument("--calib-samples", type=_at_least(1), default=128, help="calibration windows drawn from --calib-data (default 128)")
    p.add_argument("--calib-seqlen", type=_at_least(2), default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration window draw (default 0)")
    p.add_argument("--batch-size", type=_at_least(1), default=8, help="calibration windows per forward pass")


def _add_plan_bits(sub) -> None:
    """The `plan-bits` subcommand's arguments (:mod:`llmpress.bitplan`)."""
    p = sub.add_parser("plan-bits", help="mixed precision: pick each linear's bits under an average bits-per-weight budget, write the recipe")
    p.add_argument("model", help="packaged alias (smollm2-135m, gemma3-270m), local HF folder, or hub id")
    p.add_argument("--budget", type=float, required=True, help="average bits per weight of the block linears, scales included (e.g. 3.25)")
    p.add_argument("--candidates", default="w2g64,w3g64,w4g64,w8g64", help="settings to choose from (default w2g64,w3g64,w4g64,w8g64)")
    p.add_argument("--base", default="gptq-w4g64", help="recipe whose quantizing stages are split per setting (default gptq-w4g64)")
    p.add_argument("--solver", choices=bitplan.SOLVERS, default="auto", help="error per setting after rtn, gptq or blockwise; auto: the base's")
    p.add_argument("--measure", choices=bitplan.MEASURES, default="layer", help="each setting's error on the linear's own output or its block's")
    p.add_argument("--measure-windows", type=_at_least(1), default=16, help="--measure block: windows the blocks are re-run on (default 16)")
    p.add_argument("--weighting", choices=bitplan.WEIGHTINGS, default="auto",
                   help="fisher: each layer's output error weighted by the loss's squared gradient per output channel; fisher-token: "
                        "per channel and per token; none: summed as it is; auto (default): fisher-token with post-norms (gemma), else fisher")  # fmt: skip
    p.add_argument("--out", required=True, help="the recipe YAML written (atomically)")
    _add_calib(p, default="wiki")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or progress lines")
    p.add_argument("-v", "--verbose", action="store_true", help="log what each step does (INFO level)")


def _cmd_plan_bits(args) -> int:
    from . import api, models
    from .io_safety import check_file_out, write_atomic

    base = bitplan.check_request(args.base, args.candidates, args.budget)  # everything checkable before the model loads
    check_file_out(args.out, "--out")
    calib = api.CalibConfig(source=args.calib_data, n_samples=args.calib_samples, seqlen=args.calib_seqlen, seed=args.seed,
                            batch_size=args.batch_size)  # fmt: skip
    model, tok = models.load(args.model, device=args.device)
    windows = api.calibration_windows(tok, model, calib)
    plan = bitplan.plan_bits(model, windows, base=base, candidates=args.candidates, budget=args.budget, solver=args.solver,
                             batch_size=args.batch_size, weighting=args.weighting, measure=args.measure,
                             measure_windows=args.measure_windows)  # fmt: skip
    write_atomic(Path(args.out), plan.recipe.to_yaml())
    print(f"llmpress plan-bits {args.model} --budget {args.budget:g} (solver {plan.solver}, measure {args.measure}, weighting {plan.weighting})")
    print(plan.table())
    print(f"recipe: {args.out}  (llmpress compress {args.model} --recipe {args.out})")
    return 0


def _add_compress(sub) -> None:
    """The `compress` subcommand's arguments."""
    c = sub.add_parser("compress", help="compress a model with a recipe, evaluate before/after, save")
    c.add_argument("model", help="packaged alias (smollm2-135m, gemma3-270m), local HF folder, or hub id")
    c.add_argument("--recipe", required=True, help="preset name (see `llmpress recipes`) or YAML file")
    c.add_argument("--out", help="output folder (written atomically)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    _add_calib(c, default=None)
    c.add_argument(
        "--no-true-sequential",
        dest="true_sequential",
        action="store_false",
        help="gather all of a block's statistics before compressing any of its linears (default: group by group, in data-flow order)",
    )
    c.add_argument("--offload-dir", help="keep block activations on disk in this folder")
    c.add_argument(
        "--resume",
        action="store_true",
        help="continue a killed run with the same command after its last finished block (kept beside --out as .NAME.resume)",
    )
    c.add_argument(
        "--stream",
        action="store_true",
        help="never hold the whole model: read each block's weights from the folder's safetensors files when it is compressed, "
        "write it to --out right after (peak memory: embeddings + head + one block + activations)",
    )
    c.add_argument(
        "--nproc",
        type=_at_least(1),
        default=1,
        help="data-parallel calibration on N local processes (torch.distributed; the same result as one; or launch with torchrun)",
    )
    c.add_argument("--no-eval", action="store_true", help="skip the perplexity evaluations")
    c.add_argument(
        "--format",
        dest="save_format",
        choices=("packed", "hf-fakequant"),
        default="packed",
        help="packed: low-bit checkpoint for `llmpress.load_compressed` / export (default); hf-fakequant: dequantized HF folder",
    )
    _add_common(c)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="llmpress", description="Compress causal LMs and report what it cost.")
    ap.add_argument("--version", action="version", version=f"%(prog)s {_version()}", help="print the installed llmpress version and exit")
    sub = ap.add_subparsers(dest="command", required=True)

    _add_compress(sub)

    e = sub.add_parser("eval", help="perplexity, size and bits of a model or a compressed folder")
    e.add_argument("model", help="folder written by `llmpress compress --out`, or any model `compress` accepts")
    e.add_argument(
        "--stream",
        action="store_true",
        help="a model folder larger than memory: one decoder block read at a time (not for checkpoints written by llmpress)",
    )
    e.add_argument(
        "--kv",
        action="append",
        metavar="POLICY",
        help="long-text evaluation with a KV-cache policy, token by token (repeatable): full, kivi:2, kivi:4, sinks:4,1020, "
        "window:1024, h2o:256,256, sinks:4,1020+kivi:4 (docs/kvcache.md)",
    )
    e.add_argument(
        "--baseline",
        metavar="MODEL",
        help="also evaluate this reference model (the full-precision one) first, on the same windows: its perplexity, and KL "
        "divergence and top-1 agreement against it",
    )
    e.add_argument("--tokens", type=_at_least(2), default=4096, help="with --kv: tokens in the evaluated stream (default 4096)")
    e.add_argument("--kv-chunk", type=_at_least(1), default=1, help="with --kv: tokens fed per step (default 1: token by token)")
    e.add_argument("--passkey", action="store_true", help="with --kv: also a key planted early in the text, asked for at the end")
    _add_common(e)

    x = sub.add_parser("export", help="convert a packed checkpoint to a format other tools load")
    x.add_argument("checkpoint", help="folder written by `llmpress compress --out`")
    x.add_argument(
        "--format",
        dest="export_format",
        choices=("compressed-tensors", "gguf"),
        default="compressed-tensors",
        help="compressed-tensors: what llm-compressor writes; transformers and vLLM load it. "
        "gguf: one file for llama.cpp / ollama (Llama and Gemma 3 models; Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 and K-quant grids such as the *-q4_0 and *-q4_k_m presets', exactly)",
    )
    x.add_argument("--out", required=True, help="output folder (gguf: output file), written atomically")
    x.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="dtype of scales and unquantized tensors (auto: as stored; vLLM wants bfloat16 or float16). "
        "gguf: unquantized tensors (auto: float16 for 2-D weights, float32 for norms, as llama.cpp; float32 or float16 for all)",
    )
    x.add_argument("--overwrite", action="store_true", help="replace an existing output folder")

    b = sub.add_parser("bench", help="serving speed and memory: compressed checkpoints against fp32 and bf16, one run")
    b.add_argument("models", nargs="+", metavar="MODEL_OR_DIR", help="packed checkpoints (and/or the baseline model)")
    b.add_argument("--baseline", help="the uncompressed model (default: the one the checkpoints were made from)")
    b.add_argument("--prefill-tokens", type=int, default=512, help="prompt length of the prefill measurement (default 512)")
    b.add_argument("--decode-tokens", type=int, default=128, help="tokens generated per decode measurement (default 128)")
    b.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="decode batch sizes (default 1 8)")
    b.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are reported (default 3)")
    b.add_argument("--no-layers", action="store_true", help="skip the per-layer kernel table")
    b.add_argument("--no-memory-probe", action="store_true", help="skip the per-variant subprocesses measuring peak RSS")
    b.add_argument("--json", dest="json_path", help="write the results as JSON here")
    b.add_argument("--no-progress", action="store_true", help="no progress lines (the results table still prints)")
    b.add_argument("-v", "--verbose", action="store_true", help="log what each step does (INFO level)")

    sub.add_parser("recipes", help="list the preset recipes")
    analysis_cli.add_parser(sub)
    _add_plan_bits(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    root = logging.getLogger()
    saved = list(root.handlers), root.level  # restored on exit: an in-process caller keeps its logging
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING, format="%(levelname)s %(name)s: %(message)s", force=True
    )
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own bars cover the long steps
        # the library logs its notices, the command line shows them; --no-progress: every bar and notice
        with progress.show_notes(), progress.scope(not getattr(args, "no_progress", False)):
            return _dispatch(args)
    except UserError as e:
        if _rank() == 0:  # every rank meets the same refusal: one line, from the first
            print(f"llmpress: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmpress: interrupted; no output was written", file=sys.stderr)
        return 130
    finally:
        for h in root.handlers:
            if h not in saved[0]:
                h.close()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def _rank() -> int:
    from .calib import dist

    return dist.current().rank


def _one_line(e: Exception) -> str:
    return "; ".join(ln.strip() for ln in str(e).splitlines() if ln.strip())


def eval_config(args):
    """The evaluation settings of a parsed `compress` / `eval` command line."""
    from . import api

    return api.EvalConfig(source=args.eval_data, seqlen=args.seqlen, max_windows=args.eval_windows, kl_windows=args.kl_windows,
                          generate_tokens=args.generate_tokens)  # fmt: skip


def task_config(args):
    """The downstream tasks of a parsed `compress` / `eval` command line (None without --tasks)."""
    if args.tasks is None:
        if args.tasks_limit is not None:
            raise UserError("--tasks-limit applies to --tasks; no tasks were given")
        return None
    from .eval.tasks import TaskConfig, parse_tasks

    return TaskConfig(names=parse_tasks(args.tasks), limit=args.tasks_limit)


def compress_options(args) -> dict:
    """Keyword arguments of :func:`llmpress.api.run_pipeline` for a parsed `compress` command line."""
    from . import api
    from .calib.engine import EngineOptions

    calib = api.CalibConfig(
        source="wiki" if args.calib_data is None else args.calib_data,
        n_samples=args.calib_samples,
        seqlen=args.calib_seqlen,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    engine = EngineOptions(
        batch_size=args.batch_size, true_sequential=args.true_sequential, offload_dir=args.offload_dir, progress=not args.no_progress
    )
    return dict(
        model_spec=args.model,
        recipe=args.recipe,
        out=args.out,
        json_path=args.json_path,
        calib=calib,
        evaluation=None if args.no_eval else eval_config(args),
        device=args.device,
        overwrite=args.overwrite,
        engine=engine,
        save_format=args.save_format,
        resume=args.resume,
        stream=args.stream,
        tasks=task_config(args),
    )


def _export(args) -> int:
    if args.export_format == "gguf":
        from .export.gguf import export_gguf, summary

        out = export_gguf(args.checkpoint, args.out, dtype=args.dtype, overwrite=args.overwrite)
        print(f"exported {args.checkpoint} as gguf: {out} (tensors by type: {summary(out)})")
        return 0
    from .export.compressed_tensors import export_compressed_tensors

    out = export_compressed_tensors(args.checkpoint, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"exported {args.checkpoint} as {args.export_format}: {out}")
    return 0


def _dispatch(args) -> int:
    from . import api

    if args.command == "analyze":
        return analysis_cli.run(args)
    if args.command == "plan-bits":
        return _cmd_plan_bits(args)
    if args.command == "recipes":
        from .recipe import load_recipe, presets

        wrap = shutil.get_terminal_size().columns if sys.stdout.isatty() else None  # a pipe gets one line per preset
        print(recipes_table([(name, load_recipe(name).description) for name in presets()], wrap))
        return 0
    if args.command == "export":
        return _export(args)
    if args.command == "bench":
        return _cmd_bench(args)
    if args.command == "compress":
        from .calib import dist

        if args.nproc > 1 and not dist.launched():
            from . import launch

            if args.stream:
                from .streamed import check_streamable

                check_streamable(api._as_recipe(args.recipe), args.nproc)  # refused once, before any process starts
            dist.check_ranks(api._as_recipe(args.recipe), args.nproc)  # likewise

            return launch.spawn(args.nproc, launch.without_nproc(args.argv), main)
        group, args.device = dist.init_from_env(args.device)
        if group.rank > 0:  # rank 0 prints and writes
            with progress.scope(False):
                api.run_pipeline(**compress_options(args))
            return 0
        if args.calib_data is not None and not api.needs_calibration(args.recipe):
            from .data import check_sources, parse_sources

            # a malformed list, or a missing or empty file in it, is an error, not this warning
            check_sources([s for s, _ in parse_sources(args.calib_data, shares=True, what="calibration data (--calib-data)")])
            print(f"llmpress: warning: --calib-data {args.calib_data} is not used: recipe {args.recipe} gathers no calibration data", file=sys.stderr)
        report = api.run_pipeline(**compress_options(args))
        print(f"\nllmpress compress {args.model} --recipe {args.recipe}")
        print(report.table())
        for line in (report.reference or {}).get("warnings", []):
            print(f"llmpress: warning: {line}", file=sys.stderr)
        if args.out:
            print(f"saved: {args.out}")
        if args.json_path:
            print(f"report: {args.json_path}")
        return 0
    if args.command == "eval":
        return _cmd_eval(args)
    raise AssertionError(args.command)


def _cmd_eval(args) -> int:
    from . import api

    if args.kv:
        from .eval.kvstream import evaluate_kv

        if args.stream or args.baseline:
            raise UserError(f"--kv evaluates a model in memory on its own; not with {'--stream' if args.stream else '--baseline'}")
        if args.tasks:
            raise UserError("--tasks is not evaluated with --kv; run them in separate commands")
        out = evaluate_kv(args.model, args.kv, tokens=args.tokens, source=args.eval_data.split(",")[0], chunk=args.kv_chunk,
                          passkey_check=args.passkey, device=args.device, progress=not args.no_progress)  # fmt: skip
        if args.json_path:
            from .report import write_atomic

            write_atomic(Path(args.json_path), json.dumps(out, indent=2))
        print(json.dumps(out["policies"], indent=2))
        return 0
    tasks = task_config(args)
    report = api.evaluate(args.model, evaluation=eval_config(args), device=args.device, progress=not args.no_progress, stream=args.stream,
                          baseline=args.baseline, tasks=tasks)  # fmt: skip
    if args.json_path:
        report.write_json(args.json_path)
    if tasks:  # the table first: what follows it is one JSON object
        print(report.task_table())
    keys = ("ppl", "ppl_by_source", "bits_per_weight", "size_mb", "n_params", *(k + s for k in ("kl", "kl_p99", "top1") for s in ("", "_by_source")))
    keys += ("tasks",) if tasks else ()
    shown = {k: report.compressed[k] for k in keys if k in report.compressed}
    if report.baseline:
        shown["baseline_ppl_by_source"] = report.baseline["ppl_by_source"]
    print(json.dumps(shown, indent=2))
    return 0


def _cmd_bench(args) -> int:
    from . import bench

    cfg = bench.BenchConfig(
        prefill_tokens=args.prefill_tokens,
        decode_tokens=args.decode_tokens,
        batches=tuple(args.batches),
        repeats=args.repeats,
        layer_kernels=not args.no_layers,
        memory_probe=not args.no_memory_probe,
    )
    result = bench.run(args.models, args.baseline, cfg, progress=lambda m: progress.note(f"bench: {m}"))
    print(bench.table(result))
    if args.json_path:
        from .report import write_atomic

        write_atomic(Path(args.json_path), json.dumps(result, indent=2, default=repr))
        print(f"results: {args.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
