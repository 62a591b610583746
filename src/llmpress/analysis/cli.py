"""The ``llmpress analyze`` subcommand (parser and handler; the CLI owns the console)."""

from __future__ import annotations

import argparse


def _layers(v: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in v.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got {v!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("expected at least one layer")
    return out


def _positive(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {v!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def add_parser(sub) -> argparse.ArgumentParser:
    a = sub.add_parser(
        "analyze",
        help="where and why a model is hard to quantize: outliers, super weights, interventions, HTML report",
        description="Find massive activations, channel-wise outliers, LLM.int8() outlier features and super weights; "
        "measure the attention sinks (attention mass on token 0 per layer and head); "
        "measure per-layer quantization difficulty and what removing outliers does to perplexity; "
        "write a self-contained HTML report, a JSON file and PNGs.",
    )
    a.add_argument("model", help="packaged alias (smollm2-135m, gemma3-270m), local HF folder, or hub id")
    a.add_argument("--out", help="output folder for report.html, analysis.json and img/ (default: print the summary only)")
    a.add_argument("--windows", type=_positive, default=8, help="test windows analyzed and used for the perplexities (default 8)")
    a.add_argument("--seqlen", type=_positive, default=512, help="tokens per window (default 512)")
    a.add_argument(
        "--data", default="wiki", help="text: wiki, news, code (packaged) or a .txt/.jsonl path; a comma list (wiki,code) shares the windows equally"
    )
    a.add_argument("--batch-size", type=_positive, default=4, help="windows per forward pass (default 4)")
    a.add_argument("--layers", type=_layers, help="layers of the 3D plots, e.g. 2,11,29 (default: chosen from the findings)")
    a.add_argument("--no-interventions", action="store_true", help="skip the perplexity interventions (fastest)")
    a.add_argument("--no-attention", action="store_true", help="skip the attention-sink view (one forward pass less)")
    a.add_argument(
        "--features-k", type=_positive, help="dimensions removed in the outlier-feature intervention (default: the detected ones, at most 8)"
    )
    a.add_argument("--massive-eta", type=float, default=300.0, help="massive activation: |a| > ETA x mean |a| of its layer (default 300)")
    a.add_argument("--massive-gamma", type=float, default=50.0, help="massive activation: and |a| > GAMMA (default 50)")
    a.add_argument("--channel-eta", type=float, default=3.0, help="channel-wise outlier: |channel mean| > ETA x std + mean |a| (default 3)")
    a.add_argument("--channel-beta", type=float, default=0.6, help="channel-wise outlier: and channel std < BETA (default 0.6)")
    a.add_argument("--int8-threshold", type=float, default=6.0, help="LLM.int8() outlier feature magnitude (default 6)")
    a.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    a.add_argument("--no-progress", action="store_true", help="no progress bars or progress lines")
    a.add_argument("-v", "--verbose", action="store_true", help="log what each step does (INFO level)")
    return a


def run(args) -> int:
    from .detect import Thresholds
    from .pipeline import AnalysisConfig
    from .pipeline import run as run_analysis
    from .report import console_summary

    th = Thresholds(
        massive_eta=args.massive_eta,
        massive_gamma=args.massive_gamma,
        channel_eta=args.channel_eta,
        channel_beta=args.channel_beta,
        int8_magnitude=args.int8_threshold,
    )
    cfg = AnalysisConfig(
        windows=args.windows,
        seqlen=args.seqlen,
        source=args.data,
        batch_size=args.batch_size,
        layers_3d=args.layers,
        thresholds=th,
        interventions=not args.no_interventions,
        attention=not args.no_attention,
        features_k=args.features_k,
        plots=bool(args.out),
        progress=not args.no_progress,
    )
    an = run_analysis(args.model, args.out, cfg, args.device)
    print()
    print(console_summary(an))
    return 0
