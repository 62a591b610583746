"""The analysis pipeline: collect, detect, search super weights, intervene, plot.

``analyze(model, tokenizer, cfg)`` returns an :class:`Analysis` (a JSON-able summary,
the images, the raw collected statistics); ``run(model_spec, out, cfg)`` loads the
model, analyzes it and writes the HTML report, the JSON file and the images.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .. import api, models
from .. import data as data_mod
from ..arch import get_arch
from ..errors import UserError
from .collect import INT8_SITES, SITES, Collected, capture, collect, weight_stats
from .detect import Thresholds
from .interventions import DEFAULT_TOP1_PROMPT, run_interventions
from .sinks import analyze_sinks
from .superweight import DEFAULT_PROMPT, find_super_weights, prompt_ids

log = logging.getLogger(__name__)

MIN_FRAC = 0.5  # a (position, channel) or a channel "is" an outlier when flagged in >= half the sequences


@dataclass(kw_only=True)
class AnalysisConfig:
    windows: int = 8  # evaluation windows analyzed (and used for the intervention perplexities)
    seqlen: int = 512
    source: str = "wiki"  # text: wiki, news or a file path
    batch_size: int = 4
    layers_3d: tuple[int, ...] | None = None  # layers of the 3D surfaces (default: chosen from the findings)
    tokens_3d: int = 64  # tokens shown in the 3D surfaces
    thresholds: Thresholds = field(default_factory=Thresholds)
    interventions: bool = True
    attention: bool = True  # the attention-sink view (one more forward pass)
    super_weight_prompt: str = DEFAULT_PROMPT
    top1_prompt: str = DEFAULT_TOP1_PROMPT
    features_k: int | None = None  # dims removed in the outlier-feature intervention (default: the detected ones, at most 8)
    random_seeds: int = 2
    plots: bool = True
    progress: bool = True
    sites: tuple[str, ...] | None = None  # hook sites (default: every one in collect.SITES)

    def __post_init__(self):
        if self.windows < 1:
            raise UserError(f"windows must be at least 1, got {self.windows}")
        if self.seqlen < 2:
            raise UserError(f"seqlen must be at least 2, got {self.seqlen}")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.features_k is not None and self.features_k < 1:
            raise UserError(f"features_k must be at least 1, got {self.features_k}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers_3d"] = list(self.layers_3d) if self.layers_3d else None
        return d


@dataclass(kw_only=True)
class Analysis:
    summary: dict
    collected: Collected
    images: dict[str, dict] = field(default_factory=dict)  # name -> {title, caption, png}


# ------------------------------------------------------------------ findings


def _r(v, nd=4):
    if isinstance(v, float):
        return float(f"{v:.{nd}g}") if v == v and abs(v) != float("inf") else (None if v != v else v)
    return v


def massive_findings(col: Collected, site: str = "resid") -> dict:
    st = col.site(site)
    layers = sorted(st)
    per_layer = []
    pairs: dict[tuple[int, int], dict] = {}
    for li in layers:
        s = st[li]
        ents = [e for e in s.massive_entries() if e["frac_seqs"] >= MIN_FRAC]
        sun = [e for e in s.massive_entries("sun") if e["frac_seqs"] >= MIN_FRAC]
        per_layer.append(
            {
                "layer": li,
                "absmax": s.absmax,
                "median_abs": s.median_abs,
                "max_over_median": s.absmax / s.median_abs if s.median_abs else None,
                "n_massive": len(ents),
                "n_sun": len(sun),
                "massive": [{k: _r(v) for k, v in e.items()} for e in ents[:8]],
            }
        )
        for e in ents:
            p = pairs.setdefault((e["pos"], e["channel"]), {"pos": e["pos"], "channel": e["channel"], "layers": [], "max_abs": 0.0, "by_layer": {}})
            p["layers"].append(li)
            p["max_abs"] = max(p["max_abs"], e["max_abs"])
            p["by_layer"][li] = e["mean"]
    first_eta = next((r["layer"] for r in per_layer if r["n_massive"]), None)
    first_sun = next((r["layer"] for r in per_layer if r["n_sun"]), None)
    top = None
    for li in layers:
        for v, seq, pos, ch in st[li].top[:1]:
            if top is None or abs(v) > abs(top["value"]):
                top = {"value": v, "layer": li, "seq": seq, "pos": pos, "channel": ch, "median_abs": st[li].median_abs}
    if top:
        top["ratio_to_median"] = abs(top["value"]) / top["median_abs"] if top["median_abs"] else None
    pair_list = sorted(pairs.values(), key=lambda p: -p["max_abs"])
    for p in pair_list:
        peak = p["max_abs"]
        p["from_layer_half_peak"] = next((li for li in sorted(p["by_layer"]) if abs(p["by_layer"][li]) >= 0.5 * peak), None)
        p["by_layer"] = {str(k): _r(v) for k, v in sorted(p["by_layer"].items())}
    # channels ranked by their peak magnitude across layers (the next ones after the top channel)
    peak_ch = torch.stack([st[li].ch_absmax for li in layers]).max(0) if layers else None
    ranked = []
    if peak_ch is not None:
        order = torch.argsort(peak_ch.values, descending=True).tolist()
        for c in order[:8]:
            li = layers[int(peak_ch.indices[c])]
            ranked.append({"channel": c, "peak": float(peak_ch.values[c]), "layer": li, "pos": int(st[li].ch_arg_pos[c])})
    top_ch = top["channel"] if top else None
    nxt = [r for r in ranked if r["channel"] != top_ch][:5]
    return {
        "site": site,
        "first_layer_eta_rule": first_eta,
        "first_layer_sun_rule": first_sun,
        "top": top,
        "pairs": pair_list[:12],
        "channels_by_peak": ranked,
        "next_channels": [r["channel"] for r in nxt],
        "per_layer": per_layer,
    }


def massive_by_site(col: Collected) -> dict:
    out = {}
    for site, st in col.stats.items():
        layers = [li for li in sorted(st) if any(e["frac_seqs"] >= MIN_FRAC for e in st[li].massive_entries())]
        best = None
        for li in sorted(st):
            ents = st[li].massive_entries()
            if ents and (best is None or ents[0]["max_abs"] > best["max_abs"]):
                best = {**{k: _r(v) for k, v in ents[0].items()}, "layer": li}
        out[site] = {"layers": layers, "largest": best}
    return out


def channel_findings(col: Collected) -> dict:
    out = {}
    for site, st in col.stats.items():
        per_layer = {}
        freq: dict[int, int] = {}
        for li in sorted(st):
            s = st[li]
            frac = s.ch_outlier_seqs.float() / max(s.n_seqs, 1)
            chans = (frac >= MIN_FRAC).nonzero().flatten().tolist()
            if not chans:
                continue
            mean, std, mabs = s.channel_mean(), s.channel_std(), s.channel_meanabs()
            tot_abs = float(s.ch_abs.sum() / max(s.n * s.channels, 1))
            rows = [
                {
                    "channel": c,
                    "mean": _r(float(mean[c])),
                    "std": _r(float(std[c])),
                    "ratio_to_mean_abs": _r(float(mabs[c]) / tot_abs if tot_abs else 0.0),
                    "frac_seqs": _r(float(frac[c])),
                }
                for c in chans
            ]
            rows.sort(key=lambda r: -(r["ratio_to_mean_abs"] or 0))
            per_layer[str(li)] = rows
            for c in chans:
                freq[c] = freq.get(c, 0) + 1
        top = sorted(freq.items(), key=lambda kv: -kv[1])[:10]
        out[site] = {"n_layers": len(per_layer), "channels_by_layers": [{"channel": c, "layers": n} for c, n in top], "per_layer": per_layer}
    return out


def norm_trace_findings(col: Collected, per_layer: int = 3) -> dict:
    """Where a channel outlier at a norm's output comes from: input, standardization or gamma.

    For each norm feeding q/k/v or gate/up and each layer: the channels flagged as
    channel-wise outliers at the norm output (else the 3 with the largest |mean|),
    their |mean| relative to the tensor's mean |x| before the norm, after x/rms(x) and
    after the scale, with gamma and gamma's percentile among the channels.
    """
    out = {}
    for role, gammas in col.norm_gamma.items():
        names = (f"{role}_norm_in", f"{role}_norm_std", "qkv_in" if role == "attn" else "gate_up_in")
        sts = [col.site(n) for n in names]
        if any(not s for s in sts):
            continue
        rows = []
        for li in sorted(sts[2]):
            so = sts[2][li]
            frac = so.ch_outlier_seqs.float() / max(so.n_seqs, 1)
            flagged = (frac >= MIN_FRAC).nonzero().flatten().tolist()
            rel = []
            for s in (sts[0][li], sts[1][li], so):
                tot = float(s.ch_abs.sum() / max(s.n * s.channels, 1))
                rel.append(s.channel_mean().abs() / tot if tot else torch.zeros(s.channels))
            chans = flagged or torch.argsort(rel[2], descending=True)[:per_layer].tolist()
            g = gammas[li].abs()
            pct = (g[None, :] <= g[:, None]).float().mean(1)  # percentile rank of each |gamma|
            for c in sorted(chans, key=lambda c: -float(rel[2][c]))[:per_layer]:
                rows.append(
                    {
                        "layer": li,
                        "channel": c,
                        "flagged": c in flagged,
                        "rel_in": _r(float(rel[0][c])),
                        "rel_std": _r(float(rel[1][c])),
                        "rel_out": _r(float(rel[2][c])),
                        "gamma": _r(float(gammas[li][c])),
                        "gamma_percentile": _r(float(pct[c])),
                        "gamma_gain": _r(float(rel[2][c] / rel[1][c]) if float(rel[1][c]) else float("inf")),
                    }
                )
        out[role] = rows
    return out


def int8_findings(col: Collected) -> dict:
    th = col.thresholds
    out = {}
    trackers = {"all": col.int8_all, **col.int8}
    for name, tr in trackers.items():
        s = tr.summary()
        feats = tr.features(th.int8_layer_frac, th.int8_seq_frac)
        rank = tr.ranking()
        # then the remaining dimensions by their peak magnitude at the tracked sites
        sites = INT8_SITES if name == "all" else (name,)
        peaks = [st.ch_absmax for site in sites for st in col.site(site).values()]
        if peaks:
            seen = set(rank)
            rank = rank + [c for c in torch.argsort(torch.stack(peaks).amax(0), descending=True).tolist() if c not in seen]
        out[name] = {
            "features": feats,
            "n_layers_tracked": tr.n_layers,
            "n_positions": tr.n_positions,
            "details": [
                {"channel": c, "layer_frac": _r(float(s["layer_frac"][c])), "seq_frac": _r(float(s["seq_frac"][c])), "hits": int(s["hits"][c])}
                for c in (feats or rank)[:16]
            ],
            "ranking": rank[:32],
        }
    return out


def difficulty_findings(col: Collected, wstats: dict) -> dict:
    act = {}
    for site, st in col.stats.items():
        act[site] = [{"layer": li, **{k: _r(v) for k, v in st[li].difficulty().items()}} for li in sorted(st)]
    weights = {
        role: [({k: _r(v) if not isinstance(v, list) else v for k, v in d.items()} if d else None) for d in rows]
        for role, rows in wstats["layers"].items()
    }
    flat = [(site, r) for site, rows in act.items() for r in rows if r["max_over_median"] is not None]
    hardest = sorted(flat, key=lambda sr: -(sr[1]["max_over_median"] or 0))[:8]
    wflat = [(role, i, d) for role, rows in weights.items() for i, d in enumerate(rows) if d]
    whard = sorted(wflat, key=lambda t: -(t[2]["max_over_median"] or 0))[:8]
    return {
        "activations": act,
        "weights": weights,
        "hardest_activations": [{"site": s, **r} for s, r in hardest],
        "hardest_weights": [{"role": role, "layer": i, **d} for role, i, d in whard],
    }


def choose_layers(col: Collected, mf: dict, n: int = 4) -> list[int]:
    L = col.n_layers
    cands = []
    if mf.get("first_layer_eta_rule") is not None:
        cands.append(mf["first_layer_eta_rule"])
    for p in mf.get("pairs", [])[:1]:
        if p.get("from_layer_half_peak") is not None:
            cands.append(p["from_layer_half_peak"])
    if mf.get("top"):
        cands.append(mf["top"]["layer"])
    cands += [L - 1, 1 if L > 1 else 0, L // 2]
    out = []
    for c in cands:
        if 0 <= c < L and c not in out:
            out.append(c)
    return sorted(out[:n])


# ------------------------------------------------------------------ pipeline


def _sources(cfg: AnalysisConfig) -> list[str]:
    return [s for s, _ in data_mod.parse_sources(cfg.source, shares=False, what="analysis data (--data)")]


def analysis_windows(tokenizer, model, cfg: AnalysisConfig) -> tuple[torch.Tensor, dict[str, int]]:
    """``cfg.windows`` test windows, shared equally among the sources of ``cfg.source`` (``wiki,code``:
    largest remainder, earlier sources first), concatenated in that order; and the count per source."""
    sources = _sources(cfg)
    parts = {}
    for s, n in zip(sources, data_mod.mix_counts([1.0] * len(sources), cfg.windows)):
        if n:
            parts[s] = api.evaluation_windows(tokenizer, model, api.EvalConfig(source=s, seqlen=cfg.seqlen, max_windows=n))
    return torch.cat(list(parts.values())), {s: int(w.shape[0]) for s, w in parts.items()}


def _interventions(model, tokenizer, windows, col: Collected, summary: dict, cfg: AnalysisConfig) -> dict:
    feats = summary["int8_features"]["all"]
    # detected features first, then the most frequent |x| >= 6 dims, then the largest ones
    dims = feats["features"] + [c for c in feats["ranking"] if c not in set(feats["features"])]
    k = cfg.features_k or (min(len(feats["features"]), 8) if feats["features"] else min(4, len(dims)))
    out = run_interventions(
        model,
        tokenizer,
        windows,
        col,
        summary["super_weights"]["super_weights"],
        dims,
        k=k,
        random_seeds=cfg.random_seeds,
        batch_size=cfg.batch_size,
        prompt=cfg.top1_prompt,
        progress=cfg.progress,
        sources=summary["windows_by_source"],
    )
    out["features_detected"] = bool(feats["features"])
    return out


def analyze(model: nn.Module, tokenizer, cfg: AnalysisConfig | None = None, windows: torch.Tensor | None = None) -> Analysis:
    """Analyze ``model`` on ``windows`` (default: ``cfg.windows`` evaluation windows of the test text)."""
    cfg = cfg if cfg is not None else AnalysisConfig()
    spec = get_arch(model)
    seconds: dict[str, float] = {}
    th = cfg.thresholds
    t = time.perf_counter()
    by_source = None
    if windows is None:
        windows, by_source = analysis_windows(tokenizer, model, cfg)
    seconds["data"] = time.perf_counter() - t
    t = time.perf_counter()
    col = collect(model, windows, th, cfg.batch_size, sites=cfg.sites, progress=cfg.progress)
    seconds["collect"] = time.perf_counter() - t
    t = time.perf_counter()
    wstats = weight_stats(model, spec)
    mf = massive_findings(col)
    summary: dict = {
        "model": getattr(model, "llmpress_source", None) or getattr(model.config, "_name_or_path", None) or type(model).__name__,
        "family": spec.family,
        "n_layers": col.n_layers,
        "hidden": col.hidden,
        "windows": int(windows.shape[0]),
        "windows_by_source": by_source,  # None when the caller passed the windows
        "seqlen": int(windows.shape[1]),
        "config": cfg.to_dict(),
        "thresholds": th.to_dict(),
        "sites": {s: SITES[s] for s in col.stats},
        "massive": mf,
        "massive_by_site": massive_by_site(col),
        "channel_outliers": channel_findings(col),
        "norm_trace": norm_trace_findings(col),
        "int8_features": int8_findings(col),
        "difficulty": difficulty_findings(col, wstats),
    }
    seconds["detect"] = time.perf_counter() - t
    if cfg.attention:
        t = time.perf_counter()
        summary["attention_sinks"] = analyze_sinks(model, windows, col, mf, cfg.batch_size, cfg.progress)
        seconds["attention"] = time.perf_counter() - t
    t = time.perf_counter()
    sw_ids = prompt_ids(tokenizer, model, cfg.super_weight_prompt)
    search = find_super_weights(model, sw_ids, th)
    search["prompt"] = cfg.super_weight_prompt
    search["post_norm_note"] = (
        f"{spec.family} normalizes the MLP output ({', '.join(spec.post_norms)}) before the residual add: "
        "the down projection's output need not spike even when the residual stream does"
        if spec.post_norms
        else None
    )
    summary["super_weights"] = search
    seconds["super_weights"] = time.perf_counter() - t
    if cfg.interventions:
        t = time.perf_counter()
        summary["interventions"] = _interventions(model, tokenizer, windows, col, summary, cfg)
        seconds["interventions"] = time.perf_counter() - t
    an = Analysis(summary=summary, collected=col)
    if cfg.plots:
        t = time.perf_counter()
        _plots(model, windows, an, wstats, cfg)
        seconds["plots"] = time.perf_counter() - t
    summary["seconds"] = seconds
    return an


def _plots(model, windows, an: Analysis, wstats: dict, cfg: AnalysisConfig) -> None:
    from . import plots

    col, s = an.collected, an.summary
    mf = s["massive"]
    layers = list(cfg.layers_3d) if cfg.layers_3d else choose_layers(col, mf)
    bad = [li for li in layers if not 0 <= li < col.n_layers]
    if bad:
        raise UserError(f"layers {bad} out of range: the model has layers 0..{col.n_layers - 1}")
    s["layers_3d"] = layers
    img = an.images
    cap = capture(model, windows[:1], layers, ("resid", "qkv_in", "down_in"))
    T = min(cfg.tokens_3d, windows.shape[1])
    for site, title in (("resid", "residual stream"), ("qkv_in", "q/k/v input (attention norm output)"), ("down_in", "down_proj input")):
        for li in layers:
            if li in cap[site]:
                img[f"surface_{site}_L{li}"] = {
                    "title": f"{title}, layer {li}",
                    "caption": f"|activation| over the first {T} tokens x every channel of sequence 0",
                    "png": plots.surface3d(cap[site][li], f"{site}, layer {li}", T),
                }
    positions = [0, 1] + [p["pos"] for p in mf["pairs"][:6] if p["pos"] not in (0, 1)]
    positions = list(dict.fromkeys(positions))[:5]
    img["top_magnitudes"] = {
        "title": "Top magnitudes across layers",
        "caption": "residual stream: mean over sequences of the top-1/2/3 |x| and the median |x| per layer (left); max |x| at tracked token positions (right)",
        "png": plots.top_magnitudes(col, "resid", positions),
    }
    img["channel_heatmaps"] = {
        "title": "Per-channel max heat maps",
        "caption": "max |x| of every channel at every layer (log color); vertical lines are channel-wise outliers / massive channels",
        "png": plots.channel_heatmaps(col),
    }
    img["weight_outliers"] = {
        "title": "Weight outliers: Wq, Wk, Wv across layers",
        "caption": "max |w| of every input column (log color); vertical lines are input channels whose weights are systematically large or small, often the activation outlier channels (compare with the heat maps above)",
        "png": plots.weight_outliers(wstats["column_absmax"]),
    }
    hl = mf["top"]["layer"] if mf.get("top") else col.n_layers // 2
    img["histograms"] = {
        "title": f"Histograms (log scale), layer {hl}",
        "caption": "counts of log10 |x| at each site of one layer",
        "png": plots.histograms(col, hl),
    }
    for role, rows in s["norm_trace"].items():
        if not rows:
            continue
        best = max(rows, key=lambda r: r["rel_out"] or 0)
        chans = [r["channel"] for r in rows if r["layer"] == best["layer"]]
        png = plots.norm_trace(col, role, best["layer"], chans)
        if png:
            img[f"norm_trace_{role}"] = {
                "title": f"Channel outliers through the {role} norm, layer {best['layer']}",
                "caption": "mean |x| per channel before the norm, after standardization, after the scale, and |gamma|",
                "png": png,
            }
    img["difficulty"] = {
        "title": "Quantization difficulty per layer",
        "caption": "max/median ratio and median effective int8 levels per channel under one per-tensor scale (256 = every channel uses the full grid)",
        "png": plots.difficulty_plot(s["difficulty"]["activations"], wstats["layers"]),
    }
    img["super_weight_search"] = {
        "title": "Super weight search",
        "caption": "max |x| into and |y| out of every down projection, per search iteration (each iteration zeroes one more weight)",
        "png": plots.superweight_profile(s["super_weights"]),
    }
    if "attention_sinks" in s:
        img["attention_sinks"] = {
            "title": "Attention mass on token 0",
            "caption": f"mean attention probability every query at position >= {s['attention_sinks']['min_query']} gives to key 0, per layer and head (mean over queries and windows)",
            "png": plots.sink_heatmap(s["attention_sinks"]["mass0"]),
        }


def run(model_spec: str, out: str | None = None, cfg: AnalysisConfig | None = None, device: str = "cpu") -> Analysis:
    """Load ``model_spec``, analyze it, write ``report.html``, ``analysis.json`` and PNGs to ``out``."""
    from .report import write_outputs

    cfg = cfg if cfg is not None else AnalysisConfig()
    data_mod.check_sources(_sources(cfg))  # a malformed list or a missing file fails before the model loads
    t = time.perf_counter()
    model, tok = models.load(model_spec, device=device)
    get_arch(model)
    load_s = time.perf_counter() - t
    an = analyze(model, tok, cfg)
    an.summary["model"] = model_spec
    an.summary["seconds"] = {"load": load_s, **an.summary["seconds"]}
    if out:
        an.summary["outputs"] = write_outputs(an, Path(out))
    return an
