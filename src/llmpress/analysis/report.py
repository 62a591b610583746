"""Outputs of an analysis: a self-contained HTML report, a JSON file, PNGs, a console summary.

The HTML embeds every image as base64 and loads nothing from the network (no scripts,
no fonts, no stylesheets from elsewhere): it opens offline and can be mailed as is.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import torch

from ..io_safety import write_atomic
from . import sinks_report

FMT = "{:.4g}"


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def _clean(o):
    """NaN/inf -> None so the JSON is standard."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, torch.Tensor):
        return _clean(o.tolist())
    return o


def to_json(an) -> str:
    """The summary plus the per-channel maxima of every site and layer (every number)."""
    col = an.collected
    d = dict(an.summary)
    d["per_channel_absmax"] = {
        site: {str(li): [float(f"{v:.4g}") for v in st.ch_absmax.tolist()] for li, st in sorted(sts.items())} for site, sts in col.stats.items()
    }
    d["per_position_absmax"] = {
        site: {str(li): [float(f"{v:.4g}") for v in st.pos_absmax.tolist()] for li, st in sorted(sts.items())}
        for site, sts in col.stats.items()
        if site == "resid"
    }
    d["norm_gamma"] = {role: [[float(f"{v:.4g}") for v in g.tolist()] for g in gs] for role, gs in col.norm_gamma.items()}
    d["images"] = {k: {"title": v["title"], "caption": v["caption"], "file": f"img/{k}.png"} for k, v in an.images.items()}
    return json.dumps(_clean(d), indent=1, default=_json_default) + "\n"


def write_outputs(an, out: Path) -> dict:
    """Write report.html, analysis.json and img/*.png into ``out`` (each file atomically)."""
    out = Path(out)
    (out / "img").mkdir(parents=True, exist_ok=True)
    for name, im in an.images.items():
        write_atomic(out / "img" / f"{name}.png", im["png"])
    paths = {"html": str(out / "report.html"), "json": str(out / "analysis.json"), "images": str(out / "img")}
    an.summary["outputs"] = paths
    write_atomic(out / "analysis.json", to_json(an).encode())
    write_atomic(out / "report.html", to_html(an).encode())
    return paths


class _Saved:
    """An analysis read back from its folder: enough to render the HTML again."""

    def __init__(self, summary: dict, images: dict):
        self.summary = summary
        self.images = images


def rerender(out: Path) -> Path:
    """Write ``report.html`` again from a folder's ``analysis.json`` and ``img/`` (no model run):
    for a report template that changed after the numbers were computed."""
    out = Path(out)
    data = json.loads((out / "analysis.json").read_text())
    images = {}
    for name, meta in (data.get("images") or {}).items():
        png = out / meta["file"]
        if png.exists():
            images[name] = {"title": meta["title"], "caption": meta["caption"], "png": png.read_bytes()}
    write_atomic(out / "report.html", to_html(_Saved(data, images)).encode())
    return out / "report.html"


# ------------------------------------------------------------------ text


def _f(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return FMT.format(v)
    return str(v)


def headline(s: dict) -> list[str]:
    """The findings in a few sentences (shared by the console and the HTML)."""
    lines = []
    mf = s["massive"]
    top = mf.get("top")
    if top:
        lines.append(
            f"Largest activation: {_f(top['value'])} in the residual stream at layer {top['layer']}, token {top['pos']}, channel {top['channel']} "
            f"({_f(top['ratio_to_median'])}x the median |h| of {_f(top['median_abs'])})."
        )
    if mf.get("pairs"):
        p = mf["pairs"][0]
        lines.append(
            f"Massive activation (|x| > {s['thresholds']['massive_eta']:g} x mean|x| and > {s['thresholds']['massive_gamma']:g}) at token {p['pos']}, channel {p['channel']}: "
            f"layers {sinks_report.ranges(p['layers'])}, peak {_f(p['max_abs'])}, at half its peak or more from layer {p['from_layer_half_peak']} on."
        )
        lines.append(
            f"First layer with massive activations: {mf['first_layer_eta_rule']} (eta/gamma rule), {mf['first_layer_sun_rule']} (Sun et al.: > {s['thresholds']['sun_min']:g} and >= {s['thresholds']['sun_ratio']:g}x median)."
        )
    else:
        lines.append("No massive activation in the residual stream (eta/gamma rule).")
    if mf.get("next_channels"):
        lines.append(f"Next channels by peak magnitude: {', '.join(str(c) for c in mf['next_channels'])}.")
    co = s["channel_outliers"]
    for site in ("qkv_in", "gate_up_in", "resid"):
        if site in co and co[site]["channels_by_layers"]:
            top_c = ", ".join(f"{r['channel']} ({r['layers']} layers)" for r in co[site]["channels_by_layers"][:4])
            lines.append(f"Channel-wise outliers at {site}: in {co[site]['n_layers']} layers; most frequent channels {top_c}.")
    f8 = s["int8_features"]["all"]
    if f8["features"]:
        lines.append(
            f"LLM.int8() outlier features (|x| >= {s['thresholds']['int8_magnitude']:g}, >= 25% of layers, >= 6% of positions) at the q/k/v and gate/up inputs: {f8['features'][:12]}."
        )
    else:
        lines.append("No LLM.int8() outlier feature at the q/k/v and gate/up inputs.")
    sws = s["super_weights"]["super_weights"]
    if sws:
        lines.append(
            "Super weight(s): "
            + "; ".join(
                f"{w['module']}[{w['row']}, {w['col']}] = {_f(w['weight'])} (output spike {_f(w['output'])} at token {w['token']})" for w in sws
            )
            + "."
        )
    else:
        lines.append(
            "No super weight: no down_proj output spike."
            + (f" ({s['super_weights']['post_norm_note']})" if s["super_weights"].get("post_norm_note") else "")
        )
    hard = s["difficulty"]["hardest_activations"][:3]
    if hard:
        lines.append(
            "Hardest activations for per-tensor int8: "
            + "; ".join(
                f"{h['site']} L{h['layer']} (max/median {_f(h['max_over_median'])}, median channel uses {_f(h['eff_levels_median'])} of 256 levels)"
                for h in hard
            )
            + "."
        )
    return lines + sinks_report.headline(s)


def implications(s: dict) -> list[str]:
    """What the findings mean for quantization (derived from the numbers, not generic advice)."""
    out = []
    act = s["difficulty"]["activations"]
    top = s["massive"].get("top")
    if s["massive"].get("pairs") and top:
        worst = {}
        for site in ("resid", "down_in", "qkv_in"):
            rows = [r for r in act.get(site, []) if r["layer"] == top["layer"]]
            if rows:
                worst[site] = rows[0]["eff_levels_median"]
        lv = ", ".join(f"{k} {_f(v)}" for k, v in worst.items())
        line = (
            f"One element sets the range: with a per-tensor int8 scale at layer {top['layer']} the median channel keeps only ({lv}) of 256 levels. "
            "Per-token scales isolate the massive token; rotations (QuaRot/SpinQuant) spread it."
        )
        ivr = (s.get("interventions") or {}).get("rows", [])
        zero = [r for r in ivr if r["name"].startswith("massive->zero")]
        mean = [r for r in ivr if r["name"].startswith("massive->mean")]
        if zero and mean:
            zs = ", ".join(f"{_f(r['ppl_ratio'])}x ({r['name'].split(' ', 1)[1]})" for r in zero)
            ms = ", ".join(f"{_f(r['ppl_ratio'])}x ({r['name'].split(' ', 1)[1]})" for r in mean)
            ratio = lambda r: float("inf") if r.get("ppl_ratio") is None else r["ppl_ratio"]  # noqa: E731 (None: inf in JSON)
            worst_zero, worst_mean = max(map(ratio, zero)), max(map(ratio, mean))
            if worst_zero > 1.5 and worst_zero > 1.5 * worst_mean:
                line += f" Clipping them is not the answer: zeroing them multiplies perplexity by {zs}; setting them to their mean by {ms}: they work as a fixed bias whose exact value matters little."
            else:
                line += f" Zeroing them multiplies perplexity by {zs}; setting them to their mean by {ms}."
        out.append(line)
    rows = [r for r in s["norm_trace"].get("attn", []) + s["norm_trace"].get("mlp", []) if r["flagged"]]
    if rows:
        by_gamma = sum(1 for r in rows if (r["gamma_gain"] or 0) > 1.5 or (r["gamma_percentile"] or 0) > 0.95)
        out.append(
            f"{len(rows)} (layer, channel) channel-wise outliers at norm outputs; {by_gamma} of them amplified by the norm's scale gamma (gain > 1.5 or top-5% gamma). "
            "They are consistent across tokens, so per-channel smoothing (SmoothQuant/AWQ) can fold them into the following weights."
        )
    sws = s["super_weights"]["super_weights"]
    if sws:
        out.append(
            f"Keep the super weight(s) in full precision: {len(sws)} scalar(s) "
            + ", ".join(f"{w['module']}[{w['row']}, {w['col']}]" for w in sws)
            + "; round-to-nearest with a per-row scale would also crush the other weights of that row."
        )
    hw = s["difficulty"]["hardest_weights"][:1]
    if hw:
        h = hw[0]
        out.append(
            f"Hardest weight matrix for a per-tensor scale: W{h['role']} of layer {h['layer']} (max/median {_f(h['max_over_median'])}, kurtosis {_f(h['kurtosis'])}); per-channel or group scales fix most of it."
        )
    return out


def intervention_table(s: dict) -> list[list[str]]:
    iv = s.get("interventions")
    if not iv:
        return []
    texts = list(iv["rows"][0].get("ppl_by_source") or {})
    rows = [["intervention", "ppl", "ratio", *[f"{t} ppl (x)" for t in texts], "top-1 next token", "p(top-1)", "p(original top-1)"]]
    for r in iv["rows"]:
        per = [f"{_f(r['ppl_by_source'][t])} ({_f(r['ratio_by_source'][t])}x)" for t in texts]
        rows.append(
            [r["name"], _f(r["ppl"]), _f(r.get("ppl_ratio")), *per, repr(r["top1"]), _f(r["top1_prob"]), _f(r.get("ref_prob", r["top1_prob"]))]
        )
    return rows


def _top1_col(tab: list[list[str]]) -> int:
    return tab[0].index("top-1 next token")


def _texts(s: dict) -> str:
    """' of wiki 3, code 3' when the windows came from several texts, else ''."""
    by = s.get("windows_by_source") or {}
    return " of " + ", ".join(f"{k} {n}" for k, n in by.items()) if len(by) > 1 else ""


def console_summary(an) -> str:
    s = an.summary
    out = [
        f"llmpress analyze {s['model']} ({s['family']}, {s['n_layers']} layers, hidden {s['hidden']}; {s['windows']} windows x {s['seqlen']} tokens{_texts(s)})",
        "",
    ]
    out += [f"- {line}" for line in headline(s)]
    tab = intervention_table(s)
    if tab:
        out += ["", f"interventions (perplexity on the same {s['windows']} windows; prompt {s['interventions']['prompt']!r}):"]
        w = [max(len(r[i]) for r in tab) for i in range(len(tab[0]))]
        for j, r in enumerate(tab):
            out.append("  ".join(c.ljust(w[i]) if i in (0, _top1_col(tab)) else c.rjust(w[i]) for i, c in enumerate(r)))
            if j == 0:
                out.append("-" * (sum(w) + 2 * (len(w) - 1)))
    if s.get("outputs"):
        out += ["", f"report: {s['outputs']['html']}", f"json:   {s['outputs']['json']}"]
    return "\n".join(out)


# ------------------------------------------------------------------ HTML

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1200px;color:#222;line-height:1.4;padding:0 16px}
h1{font-size:24px;margin-bottom:4px}h2{font-size:19px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
h3{font-size:15px;margin-bottom:4px}table{border-collapse:collapse;margin:8px 0;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}td.l,th.l{text-align:left}
.meta{color:#666;font-size:13px}.find li{margin:3px 0}figure{margin:12px 0;display:inline-block;vertical-align:top}
figcaption{font-size:12px;color:#555;max-width:900px}img{max-width:100%;border:1px solid #eee}
.grid figure{width:48%;margin-right:1%}.note{background:#f8f8e8;border-left:3px solid #cc4;padding:6px 10px;font-size:13px}
"""


def _table(rows: list[list], left: tuple[int, ...] = (0,)) -> str:
    if not rows:
        return ""
    h = "".join(f"<th class='l'>{html.escape(str(c))}</th>" if i in left else f"<th>{html.escape(str(c))}</th>" for i, c in enumerate(rows[0]))
    body = "".join(
        "<tr>"
        + "".join(f"<td class='l'>{html.escape(_f(c))}</td>" if i in left else f"<td>{html.escape(_f(c))}</td>" for i, c in enumerate(r))
        + "</tr>"
        for r in rows[1:]
    )
    return f"<table><tr>{h}</tr>{body}</table>"


def _img(im: dict) -> str:
    b64 = base64.b64encode(im["png"]).decode()
    return f"<figure><img alt='{html.escape(im['title'])}' src='data:image/png;base64,{b64}'><figcaption><b>{html.escape(im['title'])}.</b> {html.escape(im['caption'])}</figcaption></figure>"


def to_html(an) -> str:
    """The self-contained HTML report: findings, then one section per kind of outlier."""
    s, imgs = an.summary, an.images
    parts = _html_intro(s) + _html_interventions(s) + _html_massive(s, imgs) + sinks_report.html_section(s, imgs, table=_table, img=_img)
    parts += _html_channels(s, imgs) + _html_int8(s) + _html_super_weights(s, imgs) + _html_difficulty(s, imgs)
    secs = ", ".join(f"{k} {v:.1f}s" for k, v in s.get("seconds", {}).items())
    parts.append(f"<p class='meta'>Wall time: {html.escape(secs)}. Every number is in analysis.json.</p></body></html>")
    return "\n".join(parts)


def _html_intro(s: dict) -> list[str]:
    """Head, title, the findings and what they mean."""
    return [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>llmpress analysis: {html.escape(str(s['model']))}</title><style>{CSS}</style></head><body>",
        f"<h1>Where and why {html.escape(str(s['model']))} is hard to quantize</h1>",
        f"<p class='meta'>{html.escape(s['family'])}, {s['n_layers']} layers, hidden {s['hidden']}; {s['windows']} windows of {s['seqlen']} tokens{html.escape(_texts(s))} "
        f"({html.escape(str(s['config']['source']))} text, test split). Layers and channels are 0-based.</p>",
        "<h2>Findings</h2><ul class='find'>" + "".join(f"<li>{html.escape(line)}</li>" for line in headline(s)) + "</ul>",
        "<h3>What it means for quantization</h3><ul class='find'>" + "".join(f"<li>{html.escape(line)}</li>" for line in implications(s)) + "</ul>",
    ]


def _html_interventions(s: dict) -> list[str]:
    """What happens when outliers are removed (when the analysis ran the interventions)."""
    parts: list[str] = []
    tab = intervention_table(s)
    if tab:
        iv = s["interventions"]
        parts.append("<h2>What happens if outliers are removed</h2>")
        parts.append(f"<p>Perplexity on the same windows, and the next token after the prompt <code>{html.escape(iv['prompt'])}</code>.</p>")
        parts.append(_table(tab, left=(0, _top1_col(tab))))
        parts.append(
            "<ul class='find'>"
            + "".join(f"<li><b>{html.escape(r['name'])}</b>: {html.escape(r['description'])}</li>" for r in iv["rows"][1:])
            + "</ul>"
        )
        if not iv.get("features_detected", True) and iv.get("feature_dims"):
            parts.append(
                "<p class='note'>No dimension meets the LLM.int8() outlier-feature criteria; the feature intervention removes the dimensions with the most |x| &ge; 6 hits (then the largest peak magnitudes) instead.</p>"
            )
    return parts


def _html_massive(s: dict, imgs: dict) -> list[str]:
    """Massive activations: the rule, the flagged (token, channel) pairs, per layer and site."""
    th = s["thresholds"]
    parts: list[str] = []
    mf = s["massive"]
    parts.append("<h2>Massive activations</h2>")
    parts.append(
        f"<p>An element A<sub>ij</sub> of one sequence's matrix is massive when |A<sub>ij</sub>| &gt; {th['massive_eta']:g} &middot; mean(|A|) and |A<sub>ij</sub>| &gt; {th['massive_gamma']:g}; "
        f"Sun et al.'s rule: |A<sub>ij</sub>| &gt; {th['sun_min']:g} and &ge; {th['sun_ratio']:g}&times; the median |A|. A (token, channel) pair is listed when flagged in at least half of the sequences.</p>"
    )
    rows = [["token", "channel", "layers", "peak |x|", "from layer (>= half peak)"]]
    for p in mf["pairs"][:10]:
        rows.append([p["pos"], p["channel"], sinks_report.ranges(p["layers"]), p["max_abs"], p["from_layer_half_peak"]])
    parts.append(_table(rows))
    rows = [["layer", "max |x|", "median |x|", "max / median", "massive (eta/gamma)", "massive (Sun)"]]
    for r in mf["per_layer"]:
        rows.append([r["layer"], r["absmax"], r["median_abs"], r["max_over_median"], r["n_massive"], r["n_sun"]])
    parts.append("<details><summary>residual stream per layer</summary>" + _table(rows) + "</details>")
    rows = [["site", "layers with massive activations", "largest: token", "channel", "max |x|", "at layer"]]
    for site, r in s["massive_by_site"].items():
        b = r["largest"] or {}
        rows.append([site, sinks_report.ranges(r["layers"]), b.get("pos"), b.get("channel"), b.get("max_abs"), b.get("layer")])
    parts.append("<h3>Every site</h3>" + _table(rows))
    parts.append("<div class='grid'>" + "".join(_img(imgs[k]) for k in imgs if k.startswith("surface_resid")) + "</div>")
    for k in ("top_magnitudes", "histograms"):
        if k in imgs:
            parts.append(_img(imgs[k]))
    return parts


def _html_channels(s: dict, imgs: dict) -> list[str]:
    """Channel-wise outliers and where the norm makes them."""
    th = s["thresholds"]
    parts: list[str] = []
    parts.append("<h2>Channel-wise outliers</h2>")
    parts.append(
        f"<p>Channel i of a sequence's matrix A is a channel-wise outlier when |mean(A<sub>i</sub>)| &gt; {th['channel_eta']:g} &middot; std(A) + mean(|A|) and std(A<sub>i</sub>) &lt; {th['channel_beta']:g} "
        "(mean and std over the tokens; listed when flagged in at least half of the sequences).</p>"
    )
    rows = [["site", "layers with outliers", "most frequent channels (layers)"]]
    for site, r in s["channel_outliers"].items():
        rows.append([site, r["n_layers"], ", ".join(f"{c['channel']} ({c['layers']})" for c in r["channels_by_layers"][:6])])
    parts.append(_table(rows, left=(0, 2)))
    parts.append("<div class='grid'>" + "".join(_img(imgs[k]) for k in imgs if k.startswith("surface_qkv_in")) + "</div>")
    if "channel_heatmaps" in imgs:
        parts.append(_img(imgs["channel_heatmaps"]))
    parts.append(
        "<h3>Where they come from: the norm</h3><p>Channel |mean| relative to the tensor's mean |x|: before the norm, after x/rms(x), after the scale &gamma;. "
        "&gamma; gain = after scale / after standardization; a channel whose gain is far above 1 is made an outlier by &gamma; (a high percentile); one already large before the norm comes from the residual stream (W<sub>out</sub> of earlier layers).</p>"
    )
    for role, rows_ in s["norm_trace"].items():
        rows = [["layer", "channel", "flagged", "before norm", "after std", "after scale", "gamma", "gamma pct", "gamma gain"]]
        strong = sorted(rows_, key=lambda r: -(r["rel_out"] or 0))[:12]
        for r in strong:
            rows.append(
                [
                    r["layer"],
                    r["channel"],
                    "yes" if r["flagged"] else "",
                    r["rel_in"],
                    r["rel_std"],
                    r["rel_out"],
                    r["gamma"],
                    r["gamma_percentile"],
                    r["gamma_gain"],
                ]
            )
        parts.append(f"<h3>{role} norm (strongest 12)</h3>" + _table(rows))
        if f"norm_trace_{role}" in imgs:
            parts.append(_img(imgs[f"norm_trace_{role}"]))
    return parts


def _html_int8(s: dict) -> list[str]:
    """LLM.int8() outlier features."""
    th = s["thresholds"]
    parts: list[str] = []
    parts.append("<h2>LLM.int8() outlier features</h2>")
    parts.append(
        f"<p>A hidden dimension with |x| &ge; {th['int8_magnitude']:g} in at least {100 * th['int8_layer_frac']:g}% of the layers and at least {100 * th['int8_seq_frac']:g}% of the sequence positions, "
        "tracked at the inputs of q/k/v and gate/up (each counts as a layer).</p>"
    )
    for name, r in s["int8_features"].items():
        rows = [["channel", "layer fraction", "position fraction", "hits"]] + [
            [d["channel"], d["layer_frac"], d["seq_frac"], d["hits"]] for d in r["details"][:10]
        ]
        label = "both sites" if name == "all" else name
        parts.append(f"<h3>{html.escape(label)}: {len(r['features'])} feature(s) {html.escape(str(r['features'][:16]))}</h3>" + _table(rows))
    return parts


def _html_super_weights(s: dict, imgs: dict) -> list[str]:
    """Super weights found at the down projections."""
    parts: list[str] = []
    sw = s["super_weights"]
    parts.append("<h2>Super weights</h2>")
    parts.append(
        f"<p>Prompt <code>{html.escape(sw['prompt'])}</code>; at every down projection Y = X W<sup>T</sup> the output spike gives the row, the input spike at the same token the column; "
        "the weight is zeroed and the search repeats until the largest activation is gone.</p>"
    )
    rows = [["module", "row", "column", "weight", "token", "output spike", "input spike", "share of output"]]
    for w in sw["super_weights"]:
        rows.append([w["module"], w["row"], w["col"], w["weight"], w["token"], w["output"], w["input"], w["share"]])
    parts.append(_table(rows) if len(rows) > 1 else "<p>None found.</p>")
    stops = [it.get("stop") for it in sw["iterations"] if it.get("stop")]
    if stops:
        parts.append(f"<p class='meta'>Search stopped: {html.escape(stops[-1])}.</p>")
    if sw.get("post_norm_note"):
        parts.append(f"<p class='note'>{html.escape(sw['post_norm_note'])}.</p>")
    if "super_weight_search" in imgs:
        parts.append(_img(imgs["super_weight_search"]))
    return parts


def _html_difficulty(s: dict, imgs: dict) -> list[str]:
    """Quantization difficulty of activations and weights."""
    parts: list[str] = []
    d = s["difficulty"]
    parts.append(
        "<h2>Quantization difficulty</h2><p>Effective int8 levels of a channel under one per-tensor scale: 2<sup>8</sup> &middot; m<sub>i</sub> / m (m<sub>i</sub> the channel's max |x|, m the tensor's). "
        "Activations: channels = hidden dimensions; weights: channels = output rows. Kurtosis is Pearson's (3 for a Gaussian).</p>"
    )
    rows = [["site", "layer", "max |x|", "max / median", "median eff. levels", "channels < 16 levels", "kurtosis"]]
    for h in d["hardest_activations"]:
        rows.append(
            [h["site"], h["layer"], h["absmax"], h["max_over_median"], h["eff_levels_median"], h["frac_channels_under_16_levels"], h["kurtosis"]]
        )
    parts.append("<h3>Hardest activations</h3>" + _table(rows))
    rows = [["weight", "layer", "max |w|", "at [row, col]", "max / median", "median eff. levels", "rows < 16 levels", "kurtosis"]]
    for h in d["hardest_weights"]:
        rows.append(
            [
                f"W{h['role']}",
                h["layer"],
                h["absmax"],
                f"[{h['argmax_row']}, {h['argmax_col']}]",
                h["max_over_median"],
                h["eff_levels_median"],
                h["frac_channels_under_16_levels"],
                h["kurtosis"],
            ]
        )
    parts.append("<h3>Hardest weights</h3>" + _table(rows))
    for k in ("difficulty", "weight_outliers"):
        if k in imgs:
            parts.append(_img(imgs[k]))
    other = [k for k in imgs if k.startswith("surface_down_in")]
    if other:
        parts.append("<h3>down_proj inputs</h3><div class='grid'>" + "".join(_img(imgs[k]) for k in other) + "</div>")
    return parts
